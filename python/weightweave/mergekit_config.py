"""mergekit configs: a mapping with ``merge_method``, run with mergekit 0.1.5's semantics
(``compat="mergekit"``): its methods and parameters with their defaults and precedence, its
slices (``mergekit_slices.py``) and modules (``modules.py``), its arithmetic in a bf16/f16
``dtype``, its tokenizers; plus our ``weave:`` block and ``precision``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .job import as_bool
from .mergekit_slices import _PAD_METHODS, _general_slices, _identity_slices, _known_condition_keys, _known_slice_keys
from .recipe import (
    ParamError,
    Recipe,
    RecipeError,
    RecipeWarning,
    _conditions,
    _fail,
    _ignored,
    _local,
    _mapping,
    _model_entry,
    _number,
    _plain,
    _reference,
    _same,
    _weave_block,
)

_GTA = ("required", {"normalize", "rescale", "int8_mask", "lambda"}, {"weight", "density"}, True)
_SPEC = {
    # method: (base_model, shared parameters, per-model parameters, weight required) as in
    # mergekit 0.1.5's parameter specs.
    "linear": ("optional", {"normalize"}, {"weight"}, True),
    "task_arithmetic": _GTA, "ties": _GTA, "dare_ties": _GTA, "dare_linear": _GTA,
    "breadcrumbs": (*_GTA[:2], {"weight", "density", "gamma"}, True),
    "breadcrumbs_ties": (*_GTA[:2], {"weight", "density", "gamma"}, True),
    "della": (*_GTA[:2], {"weight", "density", "epsilon"}, True),
    "della_linear": (*_GTA[:2], {"weight", "density", "epsilon"}, True),
    "slerp": ("required", {"t"}, set(), False),
    "nearswap": ("required", {"t"}, set(), False),
    "nuslerp": ("optional", {"nuslerp_row_wise", "nuslerp_flatten"}, {"weight"}, True),
    "multislerp": ("optional", {"normalize_weights", "eps"}, {"weight"}, True),
    "passthrough": ("none", set(), {"scale"}, False),
    "model_stock": ("required", {"filter_wise"}, set(), False),
    "sce": ("required", {"int8_mask", "select_topk"}, set(), False),
    "ram": ("required", {"epsilon"}, set(), False),
    "ramplus_tl": ("required", {"epsilon", "r", "alpha"}, set(), False),
    "karcher": ("optional", {"max_iter", "tol"}, set(), False),
    "arcee_fusion": ("required", set(), set(), False),
}  # fmt: skip

#: mergekit's merge methods this tool reproduces.
MERGEKIT_METHODS = tuple(_SPEC)
_MK_FLAGS = {"normalize", "rescale", "int8_mask", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights",
             "filter_wise"}  # fmt: skip
_MK_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}
_MK_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64",
              "fp32": "f32", "bf16": "bf16", "fp16": "f16", "f32": "f32", "f16": "f16"}  # fmt: skip
_MK_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
           "weave", "slices", "tokenizer", "chat_template", "name", "modules", "precision"}  # fmt: skip


def _blockers(d: Mapping[str, Any]) -> list[str]:
    """The mergekit features of config ``d`` that weightweave does not run yet, each named with
    where it is used."""
    out = []
    if "slices" in d:
        out.append("'slices' whose sources have unequal lengths, that have no source of base_model, or whose "
                   f"slices merge different numbers of sources with {d.get('merge_method')} (run for "
                   f"{', '.join(_PAD_METHODS)}, unless the last slice has more sources than the first: mergekit "
                   "then merges the weights after the layers from only as many of its models; each slice "
                   "merges base_model's layers and others)")  # fmt: skip
    if "modules" in d:
        out.append("'modules' beside 'models' or 'slices' (mergekit takes exactly one of the three)")
    method = d.get("merge_method")
    if not isinstance(method, str) or method not in MERGEKIT_METHODS:
        out.append(f"merge_method '{method}', not one weightweave runs (supported: {', '.join(MERGEKIT_METHODS)})")
    return out




#: mergekit's task-arithmetic family: computed in the config's dtype when it is bf16 or f16.
_GTA_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties")
#: Methods whose arithmetic in bf16/f16 is emulated.
_ARITH_METHODS = (*_GTA_METHODS, "model_stock", "sce", "nuslerp", "arcee_fusion", "karcher", "nearswap", "ram",
                  "ramplus_tl", "multislerp")
#: Methods whose result mergekit leaves in f32 whatever the dtype (an f32 tensor in their
#: arithmetic promotes it): with no out_dtype, mergekit writes their model in f32.
_F32_RESULT = ("arcee_fusion", "ramplus_tl")
#: Methods mergekit computes in a bf16/f16 dtype whose arithmetic is not emulated (they compute in
#: f32 here and round once): a run says so, as its model is not mergekit's bit for bit.
_F32_ONLY = ("della", "della_linear")


def _arith(d: Mapping[str, Any], where: str, method: str, kwargs: dict[str, Any], inputs: list[str]) -> None:
    """mergekit loads the tensors in the config's ``dtype`` and computes in it, rounding after
    every torch operation. The inputs are rounded to a bf16 or f16 ``dtype`` as they are read
    (``_load_dtype``); with it (and the output in the same dtype) the methods whose arithmetic is
    emulated compute as mergekit does (``arith``), mergekit's ``lambda`` included. Without a
    ``dtype`` mergekit computes in the dtype the inputs are stored in: so do we, when every
    floating tensor of every input is stored in one of bf16, f16. ``precision: f32`` (ours) keeps
    the f32 arithmetic instead (the inputs are still loaded in the dtype)."""
    precision = d.get("precision", "dtype")
    if precision not in ("dtype", "f32"):
        raise _fail(where, f"precision must be 'dtype' (mergekit's arithmetic) or 'f32', got {precision!r}")
    dt = _MK_DTYPES.get(d["dtype"]) if isinstance(d.get("dtype"), str) else None
    if dt in ("bf16", "f16"):
        kwargs["_load_dtype"] = dt
    if d.get("dtype") is None and precision == "dtype" and method in (*_ARITH_METHODS, *_F32_ONLY):
        dt = _stored_dtype(inputs)
        if dt is not None and "out_dtype" not in kwargs and method in _ARITH_METHODS:
            kwargs["out_dtype"] = dt
    if precision == "dtype" and method in _F32_ONLY and dt in ("bf16", "f16"):
        import warnings

        warnings.warn(f"{where + ': ' if where else ''}mergekit computes {method} in {dt}, rounding after every "
                      f"operation; weightweave computes it in f32 and rounds once, so elements can differ from "
                      f"mergekit's model by a {dt} rounding step (emulated for: {', '.join(_ARITH_METHODS)}). "
                      "'precision: f32' asks for f32 and silences this", RecipeWarning, stacklevel=4)  # fmt: skip
    # The emulation rounds the result to dt, but arcee_fusion's and ramplus_tl's, which mergekit
    # leaves in f32.
    out = kwargs.get("out_dtype")
    if precision == "f32" or method not in _ARITH_METHODS or dt not in ("bf16", "f16") or (
            out != dt and (method in _F32_RESULT, out) != (True, "f32")):
        return
    kwargs["arith"] = dt
    if method in _GTA_METHODS and "lam" in kwargs and "weave" not in d:
        kwargs["lambda"] = kwargs.pop("lam")


def _modules_of(d: Mapping[str, Any], where: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The modules of the config's architecture, read from the base model's config.json (else the
    first model's), as mergekit reads it; (None, arch) for a model of one module."""
    ref = d.get("base_model")
    if ref is None:
        firsts: list[object] = []
        if isinstance(d.get("models"), list) and d["models"]:
            firsts.append(d["models"][0])
        if isinstance(d.get("slices"), list) and d["slices"] and isinstance(d["slices"][0], Mapping):
            firsts.extend((d["slices"][0].get("sources") or [None])[:1])
        if isinstance(d.get("modules"), Mapping):
            firsts.extend((m.get("models") or [None])[0] for m in d["modules"].values() if isinstance(m, Mapping)
                          and isinstance(m.get("models"), list))  # fmt: skip
        ref = next((e.get("model") for e in firsts if isinstance(e, Mapping)), None)
    if not isinstance(ref, str):
        return None, None
    from .modules import architecture, table

    path = ref.partition("+")[0] if "+" in ref and not os.path.exists(ref) else ref
    try:
        path = _local(where, "base_model", path)
    except RecipeError:
        return None, None  # reported where the model is read
    return table(path), architecture(path)


def _stored_dtype(paths: list[str]) -> str | None:
    """The one dtype (bf16 or f16) every floating tensor of these inputs is stored in, else None
    (a mix, another dtype, or inputs that cannot be inspected: the merge reports those)."""
    from . import _rust

    found = set()
    for p in dict.fromkeys(paths):
        try:
            tensors = _rust.inspect(p)["tensors"]
        except Exception:  # noqa: BLE001 - the merge itself reports an unreadable model
            return None
        found |= {t["dtype"] for t in tensors if t["dtype"] in ("F16", "BF16", "F32", "F64")}
        if len(found) > 1:
            return None
    return {"BF16": "bf16", "F16": "f16"}.get(found.pop()) if len(found) == 1 else None


def _mergekit(d: Mapping[str, Any], where: str) -> Recipe:
    """A mergekit config, run with mergekit's semantics."""
    # mergekit's schema ignores keys it does not know; so do we, aloud.
    unknown = sorted(str(k) for k in set(d) - _MK_TOP)
    _ignored(where, unknown, "not a key of mergekit's config")
    d = {k: v for k, v in d.items() if k in _MK_TOP}
    d = _known_condition_keys(d, where)
    mods, arch = _modules_of(d, where)
    if "modules" in d and not ("models" in d or "slices" in d):
        from .modules import flatten

        d = flatten(d, where, mods, arch, _fail, _ignored, _PAD_METHODS)
    elif mods is not None and "slices" in d and "models" not in d:
        raise _fail(where, f"'slices' of {arch}, a model of modules ({', '.join(m['name'] for m in mods)}): mergekit "
                           "slices such a model only under 'modules:', and so does weightweave; merge whole models "
                           "with 'models'")  # fmt: skip
    layout = None
    if "slices" in d and "models" not in d:
        d = _known_slice_keys(d, where)
        d = _identity_slices(d, where)
        if "slices" in d:
            d, layout = _general_slices(d, where)
    blockers = _blockers(d)
    if blockers:
        # Every unsupported feature at once: a config rarely has just one.
        what = "a feature" if len(blockers) == 1 else f"{len(blockers)} features"
        raise _fail(where, f"this config uses {what} weightweave does not run yet: " + "; ".join(blockers))
    method = d["merge_method"]
    if not isinstance(method, str) or method not in MERGEKIT_METHODS:
        raise _fail(where, f"merge_method: '{method}' is not one weightweave runs (supported: "
                           f"{', '.join(MERGEKIT_METHODS)})")  # fmt: skip
    base_rule, shared_keys, per_model_keys, weight_required = _SPEC[method]
    shared = _mapping(where, "parameters", d.get("parameters"))
    unknown = sorted(set(shared) - shared_keys - per_model_keys)
    its = ", ".join(sorted(shared_keys | per_model_keys)) or "none"
    _ignored(where, [f"parameters.{k}" for k in unknown], f"not a parameter of mergekit's {method} (its: {its})")
    shared = {k: v for k, v in shared.items() if k not in unknown}
    base = d.get("base_model")
    base_ref = _reference(where, "base_model", base) if base is not None else None
    base = base_ref[0] if base_ref is not None else None
    if base_rule == "none" and base is not None:
        raise _fail(where, f"base_model: mergekit's {method} takes a single model and no base_model")
    entries = d.get("models")
    if not isinstance(entries, list) or not entries:
        raise _fail(where, "'models' must be a non-empty list")
    models, scopes, order = [], [], []
    loras: list[tuple[int, str, str, str]] = []
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or "model" not in e:
            raise _fail(where, f"models[{i}] must be a mapping with 'model'")
        _ignored(where, [f"models[{i}].{k}" for k in sorted(set(e) - {"model", "parameters"})],
                 "not a key of a model entry")  # fmt: skip
        applied: list[tuple[str, str]] = []
        path = _model_entry(where, f"models[{i}].model", e["model"], base_ref, applied)
        ps = _mapping(where, f"models[{i}].parameters", e.get("parameters"))
        bad = sorted(set(ps) - per_model_keys)
        its = ", ".join(sorted(per_model_keys)) or "none"
        _ignored(where, [f"models[{i}].parameters.{k}" for k in bad],
                 f"not a per-model parameter of mergekit's {method} (its: {its})")  # fmt: skip
        ps = {k: v for k, v in ps.items() if k not in bad}
        order.append((path, e["model"]))
        if method != "linear" and base_ref is not None and _same(_reference(where, "", e["model"]), base_ref):
            continue  # mergekit takes no task vector from the base model
        # mergekit's precedence: the model's own setting, then the config's.
        scopes.append({k: [(f"{at}.{k}", sc[k]) for at, sc in ((f"models[{i}].parameters", ps), ("parameters", shared))
                           if k in sc] for k in per_model_keys})  # fmt: skip
        models.append(path)
        if applied:
            loras.append((len(models), *applied[0], str(e["model"])))  # input 0 is the base
    if not models:
        raise _fail(where, "'models' lists only the base model")
    if base is None and loras and loras[0][0] == 1:
        loras.insert(0, (0, *loras[0][1:]))  # the first model stands in as the base (input 0)
    if base_ref is not None and base_ref[1] is not None:
        loras.insert(0, (0, *base_ref, str(d["base_model"])))
    params: dict[str, Any] = {}
    pt_shared: dict[str, Any] = {}
    pt_model: dict[str, Any] = {}
    if base is None:
        if base_rule == "required":
            raise _fail(where, f"base_model is required by {method}")
        if method in ("nuslerp", "multislerp"):
            params["relative"] = False  # mergekit interpolates the models' values themselves
        base = models[0]
    elif method == "karcher":
        params["with_base"] = True  # the base model is one of the points averaged
    for k in sorted(shared_keys):
        if k not in shared:
            continue
        name = "lam" if k == "lambda" else k
        if not _plain(shared[k]):
            pt_shared[name] = _conditions(where, f"parameters.{k}", shared[k])
        elif k in _MK_FLAGS:
            try:
                params[k] = as_bool(f"parameters.{k}", shared[k])
            except ParamError as e:
                raise _fail(where, str(e)) from None
        else:
            params[name] = _number(where, f"parameters.{k}", shared[k])
    for k in sorted(per_model_keys):
        name = "weights" if k == "weight" else k
        given = [sc[k] for sc in scopes]
        if method == "task_arithmetic" and k == "density":
            # mergekit 0.1.5 declares density for its whole task-arithmetic family (default 1.0),
            # and task_arithmetic, which does not sparsify, never reads it.
            _ignored(where, sorted({at for g in given for at, _ in g}), "task_arithmetic does not sparsify")
            continue
        if k == "weight" and weight_required:
            missing = next((i for i, g in enumerate(given) if not g), None)
            if missing is not None:
                raise _fail(where, f"models[{missing}]: parameters.weight is required by mergekit's {method}")
        if not any(given):
            continue
        if all(_plain(v) for g in given for _, v in g):
            vals = [_number(where, g[0][0], g[0][1]) if g else None for g in given]
            if None in vals:
                if k not in _MK_DEFAULTS:
                    raise _fail(where, f"parameters.{k}: given for some models and not others")
                vals = [_MK_DEFAULTS[k] if v is None else v for v in vals]
            params[name] = vals
            continue
        default = [{"filter": None, "value": _MK_DEFAULTS[k]}] if k in _MK_DEFAULTS else []
        pt_model[name] = [[c for key, v in g for c in _conditions(where, key, v)] + default for g in given]
    if "weights" in params and not weight_required:
        del params["weights"]
    weights = params.pop("weights", None)
    kwargs: dict[str, Any] = {"method": method, "compat": "mergekit", **params}
    if weights is not None:
        kwargs["weights"] = weights
    # Settings go on in the API's own forms: a list of conditions, or one list per model.
    kwargs.update(pt_shared)
    kwargs.update(pt_model)
    out_dtype = d.get("out_dtype", d.get("dtype"))
    if out_dtype is not None:
        if not isinstance(out_dtype, str) or out_dtype not in _MK_DTYPES:
            raise _fail(where, f"dtype '{out_dtype}' is not one of {', '.join(sorted(_MK_DTYPES))}")
        kwargs["out_dtype"] = _MK_DTYPES[out_dtype]
    if method in _F32_RESULT and d.get("out_dtype") is None:
        # mergekit writes each tensor as its method returns it unless out_dtype is given, and
        # arcee_fusion's result is f32 (its mask is), ramplus_tl's too (its λ is): mergekit's
        # model is f32.
        kwargs["out_dtype"] = "f32"
    real = None
    if layout is not None:
        real, loras = [], []
        for m in layout["inputs"]:
            applied = []
            real.append(_model_entry(where, f"slices: '{m}'", m, base_ref, applied))
            if applied:
                loras.append((len(real) - 1, *applied[0], str(m)))
        # The tokenizer's models: every input, in the order the slices name them.
        order = list(zip(real, layout["inputs"], strict=True))
    if mods is not None:
        # Each module's gradients run over its own layers (modules.py).
        kwargs["modules"] = mods
    _arith(d, where, method, kwargs, real or [base, *models])
    lam = kwargs.pop("lam", None)
    mode = "merge"
    if "weave" in d:
        if lam is not None:
            raise _fail(where, "parameters.lambda and a weave block: λ comes from the weave search space")
        kwargs.update(_weave_block(d["weave"], where))
        mode = "weave"
    elif lam is not None:
        kwargs["lam"] = lam
    tok = _tokenizer(d, where, d.get("base_model"), base if d.get("base_model") is not None else None, order)
    if tok is not None and layout is not None:
        path = dict(zip(layout["inputs"], real or [], strict=True))
        tok["ends"] = [list(dict.fromkeys(path[m] for m in end)) for end in layout["ends"]]
    if tok is not None and loras:
        raise _fail(where, f"'{loras[0][3]}' applies a LoRA to a model other than base_model, and a tokenizer is "
                           "built: not run together yet (merge the LoRA into its model first)")  # fmt: skip
    if layout is not None:
        # The lanes stand for layer ranges of the real inputs: those are what the core opens.
        assert real is not None
        kwargs["slices"] = layout["slices"]
        return Recipe(mode, real[0], real[1:] or real[:1], None, kwargs, tok, loras)
    return Recipe(mode, base, models, None, kwargs, tok, loras)


def _tokenizer(d: Mapping[str, Any], where: str, base_ref: object, base: str | None,
               order: list[tuple[str, object]]) -> dict[str, Any] | None:  # fmt: skip
    """The tokenizer mergekit would build (``tokenizer_source``, a ``tokenizer`` block), or the
    base's re-saved with ``chat_template``; None when mergekit copies the base's files as they are."""
    from .tokenizer import Spec

    block = d.get("tokenizer")
    source: object = d.get("tokenizer_source")
    spec = Spec(None)
    if block is not None:
        b = _mapping(where, "tokenizer", block)
        _ignored(where, [f"tokenizer.{k}" for k in sorted(set(b) - {"source", "tokens", "pad_to_multiple_of"})],
                 "not a key of mergekit's tokenizer block")  # fmt: skip
        source = b.get("source", "union")
        pad = b.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 < pad <= 1 << 20):
            raise _fail(where, f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
        spec.pad_to_multiple_of = pad
        tokens = _mapping(where, "tokenizer.tokens", b.get("tokens"))
        if len(tokens) > 1 << 16:
            raise _fail(where, f"tokenizer.tokens: {len(tokens)} tokens (at most 65536)")
        for t, cfg in tokens.items():
            spec.tokens[str(t)] = _token_cfg(where, f"tokenizer.tokens[{t!r}]", cfg, base)
    ct = d.get("chat_template")
    if ct is not None and not isinstance(ct, str):
        raise _fail(where, f"chat_template must be a string (a template, a name or 'auto'), got {type(ct).__name__}")
    spec.chat_template = ct or None
    if source is None and spec.chat_template is None:
        return None
    if source is not None:
        if source in ("base", "union"):
            spec.source = str(source)
        else:
            spec.source = _reference(where, "tokenizer_source", source)[0]
    paths = list(dict.fromkeys(p for p, _ in order))
    if base is not None and base not in paths:
        paths.append(base)  # mergekit plans the base last when the models do not list it
    labels = {p: str(ref) for p, ref in order}
    if base is not None:
        labels.setdefault(base, str(base_ref))
    dtype = d.get("dtype")
    return {"spec": spec, "base": base, "order": paths, "labels": labels,
            "dtype": _TORCH_DTYPES[_MK_DTYPES[dtype]] if isinstance(dtype, str) and dtype in _MK_DTYPES else None}


_TORCH_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}


def _token_cfg(where: str, key: str, cfg: object, base: str | None) -> dict[str, Any]:
    """One entry of ``tokenizer.tokens``: ``source`` (a model, ``{kind: zero}`` or ``{kind:
    model_token, model, token_id | token}``) and ``force``."""
    c = _mapping(where, key, cfg)
    try:
        out: dict[str, Any] = {"force": as_bool(f"{key}.force", c.get("force", False))}
    except ParamError as e:
        raise _fail(where, str(e)) from None
    src = c.get("source")
    if src is None:
        out["source"] = None
    elif isinstance(src, str):
        out["source"] = _reference(where, f"{key}.source", src)[0]
    else:
        m = _mapping(where, f"{key}.source", src)
        if m.get("kind") == "zero":
            out["source"] = {"kind": "zero"}
        elif m.get("kind") == "model_token":
            tid, tname = m.get("token_id"), m.get("token")
            if (tid is None) == (tname is None):
                raise _fail(where, f"{key}.source: give one of token_id or token")
            if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < 1 << 31):
                raise _fail(where, f"{key}.source.token_id must be an integer in [0, 2^31), got {tid!r}")
            out["source"] = {"kind": "model_token", "token_id": tid, "token": None if tname is None else str(tname),
                             "model": _reference(where, f"{key}.source.model", m.get("model"))[0]}  # fmt: skip
        else:
            raise _fail(where, f"{key}.source: kind must be 'zero' or 'model_token', got {m.get('kind')!r}")
    return out
