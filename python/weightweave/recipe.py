"""Recipes as files: ``weightweave run RECIPE.yaml [OUT]`` and :func:`run`.

Two schemas are read. A mapping with ``merge_method`` is a mergekit config, accepted as it is for
the methods both tools have and run with mergekit's semantics (``compat="mergekit"``), plus an
optional ``weave:`` block of ours. Anything else is our own schema (see the README). Every key
is checked before any work: a key we do not support is one :class:`RecipeError` naming it, never
ignored. Paths are taken as given (relative to the working directory, as mergekit does).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._rust import ParamError
from .job import as_bool
from .settings import conditions

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
_WEAVE_KEYS = {"lambdas", "search", "pool", "include_deltas", "seed"}
_OWN_TOP = {"base", "models", "method", "params", "mode", "lam", "lambdas", "search", "pool", "include_deltas",
            "seed", "weights", "out", "out_dtype", "shard_size", "compat", "threads", "chunk_size",
            "cluster"}  # fmt: skip
_OWN_MODEL = {"model", "weight", "density", "gamma", "ties_density"}


#: Names that are arguments of merge/weave, not method parameters: a ``params`` key never sets them.
_NOT_PARAMS = _OWN_TOP | {"overwrite", "progress", "out", "base", "models", "allow_code", "weights"}


class RecipeError(ParamError):
    """A recipe that cannot be run as written: the message names the key (and the file)."""


class RecipeWarning(UserWarning):
    """A key of a mergekit config that mergekit ignores (a mis-indented ``int8_mask``, a parameter
    the method does not take): ignored here too, and said so; or a config whose bf16/f16
    arithmetic is not emulated for its method, so its model is not mergekit's bit for bit."""


def _ignored(where: str, keys: list[str], why: str) -> None:
    if keys:
        import warnings

        what = ", ".join(f"'{k}'" for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        warnings.warn(f"{where + ': ' if where else ''}{what} ignored: {why} (mergekit ignores it too)",
                      RecipeWarning, stacklevel=4)  # fmt: skip


@dataclass
class Recipe:
    """A recipe resolved into one call of :func:`weightweave.merge` or :func:`weightweave.weave`."""

    mode: str
    base: str | None
    models: list[str]
    out: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: A tokenizer to build for the output (``tokenizer.py``): spec, base, order, dtype, labels.
    tokenizer: dict[str, Any] | None = None
    #: ``model+lora`` references on models other than the base: (input index, model, adapter,
    #: the config's reference), applied before the merge (:func:`_apply_loras`).
    loras: list[tuple[int, str, str, str]] = field(default_factory=list)


def _fail(where: str, msg: str) -> RecipeError:
    return RecipeError(f"{where}: {msg}" if where else msg)


def load(source: str | os.PathLike | Mapping[str, Any], *, allow_code: bool = False) -> Recipe:
    """Reads and validates a recipe (a YAML file path or a mapping).

    A recipe is data: nothing is imported or called because it says so. A ``pool`` of the form
    ``module:function`` is refused unless the caller passes ``allow_code=True`` (the CLI's
    ``--allow-code``); even then the module is imported only after every other key was checked.
    """
    if not isinstance(allow_code, bool):
        raise RecipeError(f"allow_code must be True or False, got {allow_code!r}")
    where = ""
    if isinstance(source, Mapping):
        data: Any = source
    elif isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        data = _read_yaml(where)
    else:
        raise RecipeError(f"a recipe is a path to a YAML file or a mapping, got {type(source).__name__}")
    if not isinstance(data, Mapping):
        raise _fail(where, f"a recipe is a mapping of keys, got {type(data).__name__}")
    bad_key = next((k for k in data if not isinstance(k, str)), None)
    if bad_key is not None:
        raise _fail(where, f"recipe keys are strings, got {bad_key!r}")
    r = _mergekit(data, where) if "merge_method" in data else _own(data, where)
    pool = r.kwargs.get("pool")
    if isinstance(pool, str) and ":" in pool:
        r.kwargs["pool"] = _code_pool(pool, where, allow_code)
    return r


def _read_yaml(path: str) -> Any:
    import yaml

    if "\0" in path:
        raise RecipeError(f"{path!r}: a recipe path cannot contain a NUL character")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_RECIPE_BYTES + 1)
        if len(text) > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: larger than {MAX_RECIPE_BYTES // 2**20} MiB: not a recipe")
        return _check_depth(path, yaml.safe_load(text))
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{path}: not valid YAML{at}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e}") from None


#: A recipe is a few kilobytes; this bounds what parsing a hostile file can cost.
MAX_RECIPE_BYTES = 16 * 2**20
#: Nesting a recipe never needs (a search point inside a list inside a mapping is 4 deep).
MAX_RECIPE_DEPTH = 32


def _check_depth(path: str, data: Any) -> Any:
    """``data`` unless it nests deeper than :data:`MAX_RECIPE_DEPTH` (walked without recursion;
    aliases are followed once per distinct node, so an alias bomb costs nothing)."""
    seen: set[int] = set()
    todo = [(data, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, Mapping | list):
            if depth > MAX_RECIPE_DEPTH:
                raise RecipeError(f"{path}: nested deeper than {MAX_RECIPE_DEPTH} levels: not a recipe")
            if id(v) in seen:
                continue
            seen.add(id(v))
            items = list(v.keys()) + list(v.values()) if isinstance(v, Mapping) else v
            todo.extend((x, depth + 1) for x in items)
    return data


def _mapping(where: str, key: str, v: object) -> dict[Any, Any]:
    """An optional mapping value (absent or null: empty)."""
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise _fail(where, f"'{key}' must be a mapping, got {v!r}")
    return dict(v)


#: A number as text: YAML 1.1 (PyYAML) reads ``1e-10`` as a string; mergekit's schema takes it as
#: the number, and so does this.
_NUMBER_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number(where: str, key: str, v: object) -> float:
    if isinstance(v, str) and len(v) < 64 and _NUMBER_TEXT.match(v.strip()):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        if not _plain(v):
            raise _fail(where, f"'{key}' must be one number here, not a per-tensor setting")
        raise _fail(where, f"'{key}' must be a number, got {v!r}")
    return float(v)


def _plain(v: object) -> bool:
    """One value, not a per-tensor setting (a gradient list or filter conditions)."""
    return not isinstance(v, (list, tuple, Mapping))


def _conditions(where: str, key: str, v: object) -> list[dict[str, Any]]:
    """A mergekit setting as conditions (a bare list is a gradient over the layers)."""
    try:
        return conditions(key, v)
    except ParamError as e:
        raise _fail(where, str(e)) from None


def _local(where: str, key: str, v: object) -> str:
    """A model reference: a local checkpoint, or a hub id found in (or downloaded into) the Hugging
    Face cache (``hub.py``); no LoRA '+' suffixes."""
    if isinstance(v, Mapping):
        raise _fail(where, f"'{key}' must be a path string; structured model references are not supported")
    if not isinstance(v, str) or not v:
        raise _fail(where, f"'{key}' must be a path, got {v!r}")
    if "+" in v and not os.path.exists(v):
        raise _fail(where, f"'{key}': '{v}' applies a LoRA with '+', which only a model entry of a mergekit "
                           "config may do")  # fmt: skip
    if not os.path.exists(v):
        from . import hub

        if hub.looks_like_hub_id(v):
            try:
                return hub.resolve(v, f"'{key}'")
            except ParamError as e:
                raise _fail(where, str(e)) from None
        raise _fail(where, f"'{key}': '{v}' does not exist")
    return v


def _reference(where: str, key: str, v: object) -> tuple[str, str | None]:
    """A model reference of a mergekit config: (the model's path, the PEFT LoRA adapter that
    ``model+lora`` applies to it, or None)."""
    if not isinstance(v, str) or "+" not in v or os.path.exists(v):
        return _local(where, key, v), None
    model, _, lora = v.partition("+")
    m = _local(where, key, model)
    adapter = _local(where, key, lora)
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise _fail(where, f"'{key}': '{lora}' holds no adapter_config.json: not a PEFT LoRA adapter")
    if os.path.isfile(os.path.join(m, "adapter_config.json")):
        raise _fail(where, f"'{key}': '{model}' is itself a LoRA adapter: '{v}' applies a LoRA to a model")
    return m, adapter


def _same(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    """Whether two references name the same model (and the same adapter on it)."""
    real = lambda p: None if p is None else os.path.realpath(p)  # noqa: E731
    return real(a[0]) == real(b[0]) and real(a[1]) == real(b[1])


def _model_entry(where: str, key: str, v: object, base: tuple[str, str | None] | None,
                 loras: list[tuple[str, str]] | None = None) -> str:  # fmt: skip
    """The path of a model reference that weightweave opens. ``model+lora`` on the plain base
    model: the adapter, read as a fine-tune of the base (θ_base + ΔW, out of core). On any other
    model (or on a base that has its own LoRA): the model, with (model, adapter) appended to
    ``loras``: the adapter is applied to it before the merge, as mergekit does
    (:func:`_apply_loras`); where ``loras`` is None (a tokenizer source) the model's own files are
    what is read."""
    m, adapter = _reference(where, key, v)
    if adapter is None:
        return m
    if base is not None and _same((m, None), base):
        return adapter
    if loras is not None:
        loras.append((m, adapter))
    return m


def _apply_loras(loras: list[tuple[int, str, str, str]], work: str,
                 progress: Callable[[int, int], object] | None = None) -> list[tuple[int, str, str]]:  # fmt: skip
    """Each ``model+lora`` on a model other than the base, as mergekit builds it before merging
    (PEFT's merge_and_unload, saved in the model's dtype): θ_model + ΔW, rounded once to the
    model's dtype, written into ``work`` by our own out-of-core merge (the adapter as a fine-tune
    of its model, λ = 1), reported through ``progress`` as the main merge is. Returns the
    overlays that lay it over the model's input; errors about them name the config's reference."""
    from . import api

    overlays, built = [], {}
    for idx, model, adapter, label in loras:
        out = built.get((model, adapter))
        if out is None:
            out = built[model, adapter] = os.path.join(work, f"lora-{len(built)}.safetensors")
            try:
                api.merge(model, [adapter], out, method="task_arithmetic", lam=1.0, progress=progress)
            except Exception as e:
                # The same error, saying which of the config's references it came from.
                try:
                    wrapped = type(e)(f"applying the LoRA of '{label}': {e}")
                except Exception:  # noqa: BLE001 - an exception type that takes other arguments
                    raise e from None
                raise wrapped from None
        overlays.append((idx, out, f"'{label}' (the LoRA applied to its model)"))
    return overlays


def _weave_block(block: object, where: str) -> dict[str, Any]:
    if not isinstance(block, Mapping):
        raise _fail(where, "'weave' must be a mapping (lambdas, search, pool, include_deltas, seed)")
    bad = sorted(set(block) - _WEAVE_KEYS)
    if bad:
        raise _fail(where, f"weave.{bad[0]}: not a key of the weave block ({', '.join(sorted(_WEAVE_KEYS))})")
    out = {k: block[k] for k in block}
    if "pool" in out:
        out["pool"] = _pool(out["pool"], where)
    return out


def _pool(v: object, where: str) -> str:
    """A pool name, or ``module:function`` naming a function pool (resolved later, and only with
    ``allow_code``)."""
    if not isinstance(v, str):
        raise _fail(where, f"'pool' must be a name or 'module:function', got {v!r}")
    return v


def _code_pool(v: str, where: str, allow_code: bool) -> Callable[..., Any]:
    """Imports the function pool ``module:function`` — only because the caller typed
    ``allow_code``: a recipe file alone never makes weightweave import or run code."""
    if not allow_code:
        raise _fail(where, f"pool '{v}' names Python code; a recipe file is data and never runs code by itself. "
                           "To run it, pass --allow-code (CLI) or allow_code=True (ww.run), or call "
                           "ww.weave(..., pool=function) from Python")  # fmt: skip
    mod, _, attr = v.partition(":")
    if not mod or not attr or not all(p.isidentifier() for p in mod.split(".")) or not attr.isidentifier():
        raise _fail(where, f"pool '{v}' is not of the form module:function")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise _fail(where, f"pool '{v}': cannot import it ({e})") from None
    if not callable(fn):
        raise _fail(where, f"pool '{v}' is not callable")
    return fn


def _blockers(d: Mapping[str, Any]) -> list[str]:
    """The mergekit features of config ``d`` that weightweave does not run yet, each named with
    where it is used."""
    out = []
    if "slices" in d:
        out.append("'slices' whose sources have unequal lengths, that have no source of base_model, or whose "
                   f"slices merge different numbers of sources with {d.get('merge_method')} (run for "
                   f"{', '.join(_PAD_METHODS)}; each slice merges base_model's layers and others)")  # fmt: skip
    if "modules" in d:
        out.append("'modules' beside 'models' or 'slices' (mergekit takes exactly one of the three)")
    method = d.get("merge_method")
    if not isinstance(method, str) or method not in MERGEKIT_METHODS:
        out.append(f"merge_method '{method}', not one weightweave runs (supported: {', '.join(MERGEKIT_METHODS)})")
    return out


def _layer_count(path: str) -> int | None:
    """A model's layer count as mergekit reads it (``num_hidden_layers`` of its config.json, or of
    its ``text_config``); for a checkpoint without one, the largest layer index in its names + 1."""
    import json

    cfg = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if cfg and os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                c = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            c = {}
        for d in (c, c.get("text_config") if isinstance(c, dict) else None):
            n = d.get("num_hidden_layers") if isinstance(d, dict) else None
            if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                return n
    from . import _rust

    try:
        names = [t["name"] for t in _rust.inspect(path)["tensors"]]
    except Exception:  # noqa: BLE001 - the merge itself reports an unreadable model
        return None
    firsts = [next((int(c) for c in n.split(".") if c.isdigit() and len(c) < 9), None) for n in names]
    found = [i for i in firsts if i is not None]
    return max(found) + 1 if found else None


def _known_condition_keys(d: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The config with every parameter's conditions reduced to mergekit's keys (``value``,
    ``filter``): another key (the older ``pattern``) is ignored aloud, as mergekit's schema ignores
    it, and that condition then matches every tensor."""
    dropped: list[str] = []

    def clean(ps: object, at: str) -> object:
        if not isinstance(ps, Mapping):
            return ps
        out = {}
        for k, v in ps.items():
            if isinstance(v, list) and any(isinstance(c, Mapping) for c in v):
                dropped.extend(f"{at}.{k}[{i}].{x}" for i, c in enumerate(v) if isinstance(c, Mapping)
                               for x in c if x not in ("value", "filter"))  # fmt: skip
                v = [{x: y for x, y in c.items() if x in ("value", "filter")} if isinstance(c, Mapping) else c
                     for c in v]  # fmt: skip
            out[k] = v
        return out

    def entries(items: list[Any], at: str) -> list[Any]:
        """Model entries or slice sources, each with its parameters cleaned."""
        return [{**e, "parameters": clean(e["parameters"], f"{at}[{i}].parameters")}
                if isinstance(e, Mapping) and "parameters" in e else e for i, e in enumerate(items)]  # fmt: skip

    d = dict(d)
    if "parameters" in d:
        d["parameters"] = clean(d["parameters"], "parameters")
    if isinstance(d.get("models"), list):
        d["models"] = entries(d["models"], "models")
    if isinstance(d.get("slices"), list):
        sl = []
        for k, one in enumerate(d["slices"]):
            if isinstance(one, Mapping):
                one = dict(one)
                if "parameters" in one:
                    one["parameters"] = clean(one["parameters"], f"slices[{k}].parameters")
                if isinstance(one.get("sources"), list):
                    one["sources"] = entries(one["sources"], f"slices[{k}].sources")
            sl.append(one)
        d["slices"] = sl
    _ignored(where, sorted(set(dropped)), "not a key of a mergekit condition (value, filter): the condition matches "
                                          "every tensor")  # fmt: skip
    return d


def _known_slice_keys(d: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """``slices`` without the keys mergekit's schema does not have (a source's ``revision``),
    ignored aloud as mergekit ignores them; its own keys stay, to be run or refused."""
    sl = d.get("slices")
    if not isinstance(sl, list):
        return d
    dropped, out = [], []
    for k, one in enumerate(sl):
        if not isinstance(one, Mapping):
            return d
        one = dict(one)
        known = ("sources", "parameters", "base_model", "residual_weight")
        dropped += [f"slices[{k}].{x}" for x in one if x not in known]
        one = {x: v for x, v in one.items() if x in known}
        if isinstance(one.get("sources"), list):
            srcs = []
            for i, src in enumerate(one["sources"]):
                if isinstance(src, Mapping):
                    dropped += [f"slices[{k}].sources[{i}].{x}" for x in src if x not in ("model", "layer_range",
                                                                                           "parameters")]  # fmt: skip
                    src = {x: v for x, v in src.items() if x in ("model", "layer_range", "parameters")}
                srcs.append(src)
            one["sources"] = srcs
        out.append(one)
    _ignored(where, dropped, "not a key of a mergekit slice or source")
    return {**d, "slices": out}


def _identity_slices(d: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """``slices`` that take every layer of every model in place (mergekit's most published form:
    one slice, each source's ``layer_range`` [0, N)) as the ``models`` form they equal: the
    sources' parameters become the models', and the slice's come before the config's (mergekit's
    scope order). Any other slicing is left for the caller to refuse."""
    sl = d.get("slices")
    if not isinstance(sl, list) or len(sl) != 1 or not isinstance(sl[0], Mapping):
        return d
    one = sl[0]
    if set(one) - {"sources", "parameters"} or not isinstance(one.get("sources"), list) or not one["sources"]:
        return d
    models = []
    for i, src in enumerate(one["sources"]):
        if not isinstance(src, Mapping) or set(src) - {"model", "layer_range", "parameters"}:
            return d
        r, m = src.get("layer_range"), src.get("model")
        if not (isinstance(r, list) and len(r) == 2 and r[0] == 0 and isinstance(r[1], int) and isinstance(m, str)):
            return d
        path = _local(where, f"slices[0].sources[{i}].model", m.partition("+")[0] if "+" in m
                      and not os.path.exists(m) else m)  # fmt: skip
        if _layer_count(path) != r[1]:
            return d
        models.append({"model": m, **({"parameters": src["parameters"]} if src.get("parameters") else {})})
    out = {k: v for k, v in d.items() if k != "slices"}
    out["models"] = models
    top = _mapping(where, "parameters", d.get("parameters"))
    own = _mapping(where, "slices[0].parameters", one.get("parameters"))
    if own:
        # The slice's setting first, then the config's: one list of conditions.
        out["parameters"] = dict(top) | {
            k: _conditions(where, f"slices[0].parameters.{k}", v)
            + (_conditions(where, f"parameters.{k}", top[k]) if k in top else [])
            for k, v in own.items()
        }
    return out


def _general_slices(d: Mapping[str, Any], where: str) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    """Any other ``slices``: layers stacked, repeated or moved (passthrough frankenmerges), as
    lanes the core assembles (``source/slices.rs``): lane 0 the base's source in each slice (the
    single source without a base_model), then the others in order, as many in every slice. The
    config comes back with one ``models`` entry per lane, whose settings (and the slices') hold
    only in their slice; with them the real inputs and the lanes."""
    sl, base_ref = d.get("slices"), d.get("base_model")
    if not isinstance(sl, list) or not sl:
        return d, None
    inputs: list[str] = [] if base_ref is None else [base_ref]

    def idx(m: str) -> int:
        if m not in inputs:
            inputs.append(m)
        return inputs.index(m)

    method = d.get("merge_method")
    pad = method in _PAD_METHODS
    parsed = []
    for one in sl:
        if not isinstance(one, Mapping) or set(one) - {"sources", "parameters"}:
            return d, None
        srcs = one.get("sources")
        if not isinstance(srcs, list) or not srcs:
            return d, None
        for x in srcs:
            r = x.get("layer_range") if isinstance(x, Mapping) else None
            if (not isinstance(x, Mapping) or set(x) - {"model", "layer_range", "parameters"}
                    or not isinstance(x.get("model"), str) or not isinstance(r, list) or len(r) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in r) or not 0 <= r[0] < r[1]):
                return d, None  # fmt: skip
        if len({x["layer_range"][1] - x["layer_range"][0] for x in srcs}) != 1:
            return d, None  # mergekit: every source of a slice has as many layers
        if base_ref is None:
            if len(srcs) != 1 and method != "linear":
                return d, None
            base_src, others = srcs[0], srcs
        else:
            at_base = [x for x in srcs if x["model"] == base_ref]
            if len(at_base) != 1:
                return d, None
            base_src, others = at_base[0], [x for x in srcs if x is not at_base[0]]
            if not others and not pad:
                return d, None
        parsed.append((one, base_src, others))
    width = max(len(others) for _, _, others in parsed)
    if width == 0 or (not pad and any(len(others) != width for _, _, others in parsed)):
        return d, None
    spec, lane_params, slice_params = [], [[] for _ in range(width)], []
    # Each lane's nominal model (its first in any slice): the models entries are the lanes.
    lane_models = [next(o[j]["model"] for _, _, o in parsed if len(o) > j) for j in range(width)]
    for k, (one, base_src, others) in enumerate(parsed):
        lanes = [[idx(base_src["model"]), base_src["layer_range"][0]]]
        lanes += [[idx(x["model"]), x["layer_range"][0]] for x in others]
        # A slice that merges fewer models than another: its spare lanes read the base's layers
        # (τ = 0) with weight 0 (no share of a normalisation), which is the merge of the models it
        # names, as mergekit merges each slice's own sources.
        lanes += [lanes[0]] * (width - len(others))
        spec.append({"len": base_src["layer_range"][1] - base_src["layer_range"][0], "lanes": lanes})
        for j, x in enumerate(others):
            lane_params[j].append((k, _mapping(where, f"slices[{k}].sources.parameters", x.get("parameters"))))
        for j in range(len(others), width):
            lane_params[j].append((k, {"weight": 0.0}))
        slice_params.append((k, _mapping(where, f"slices[{k}].parameters", one.get("parameters"))))

    def scoped(scopes: list[tuple[int, dict[str, Any]]], key: str, at: str) -> list[dict[str, Any]]:
        return [c | {"slice": k} for k, ps in scopes if key in ps for c in _conditions(where, f"{at}.{key}", ps[key])]

    top = _mapping(where, "parameters", d.get("parameters"))
    keys = {k for _, ps in slice_params for k in ps}
    params = dict(top) | {
        k: scoped(slice_params, k, "slices[].parameters") + (_conditions(where, f"parameters.{k}", top[k]) if k in top
                                                               else []) for k in keys}  # fmt: skip
    entries = []
    for m, scopes in zip(lane_models, lane_params, strict=True):
        ps = {k: scoped(scopes, k, "slices[].sources[].parameters") for k in {k for _, p in scopes for k in p}}
        entries.append({"model": m, **({"parameters": ps} if ps else {})})
    out = {k: v for k, v in d.items() if k not in ("slices", "parameters")}
    out["models"] = entries
    if params:
        out["parameters"] = params
    return out, {"inputs": inputs, "slices": spec}


#: Methods whose slices may merge different numbers of models (a spare lane at weight 0 adds
#: exactly nothing to their weighted sums, signs and normalisations).
_PAD_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear")
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
        tok["fixed_rows"] = True  # vocabulary rows are not realigned under stacked slices (yet)
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


def _own(d: Mapping[str, Any], where: str) -> Recipe:
    """Our own schema: base, models (paths or {model, weight, density, ...}), method, params, and
    merge or weave options."""
    unknown = sorted(set(d) - _OWN_TOP)
    if unknown:
        hint = " (a mergekit config needs 'merge_method')" if unknown[0] in ("base_model", "merge_method") else ""
        raise _fail(where, f"'{unknown[0]}': not a recipe key (keys: {', '.join(sorted(_OWN_TOP))}){hint}")
    for k in ("models", "method"):
        if k not in d:
            raise _fail(where, f"'{k}' is required")
    if "base" not in d and d["method"] != "linear":
        raise _fail(where, "'base' is required (only linear, a model soup, can do without one)")
    base = _local(where, "base", d["base"]) if "base" in d else None
    entries = d["models"]
    if not isinstance(entries, list) or not entries:
        raise _fail(where, "'models' must be a non-empty list")
    models, per_model = [], []
    for i, e in enumerate(entries):
        if isinstance(e, Mapping):
            bad = sorted(set(e) - _OWN_MODEL)
            if bad:
                raise _fail(where, f"models[{i}].{bad[0]}: not a per-model key ({', '.join(sorted(_OWN_MODEL))})")
            if "model" not in e:
                raise _fail(where, f"models[{i}].model is required")
            models.append(_local(where, f"models[{i}].model", e["model"]))
            per_model.append({k: v if not _plain(v) else _number(where, f"models[{i}].{k}", v)
                              for k, v in e.items() if k != "model"})  # fmt: skip
        else:
            models.append(_local(where, f"models[{i}]", e))
            per_model.append({})
    params = _mapping(where, "params", d.get("params"))
    bad = next((k for k in params if not isinstance(k, str) or k in _NOT_PARAMS), None)
    if bad is not None:
        raise _fail(where, f"params: {bad!r} is not a method parameter")
    kwargs: dict[str, Any] = {"method": d["method"], **params}
    if any("weight" in p for p in per_model):
        if "weights" in d:
            raise _fail(where, "'weights' and per-model 'weight': give one of them")
        kwargs["weights"] = [p.get("weight", 1.0) for p in per_model]
    elif "weights" in d:
        kwargs["weights"] = d["weights"]
    for k in ("density", "gamma", "ties_density"):
        if any(k in p for p in per_model):
            if k in params:
                raise _fail(where, f"params.{k} and a per-model '{k}': give one of them")
            missing = [i for i, p in enumerate(per_model) if k not in p]
            if missing:
                raise _fail(where, f"models[{missing[0]}]: '{k}' is set for some models but not this one")
            kwargs[k] = [p[k] for p in per_model]
    weave_keys = {"lambdas", "search", "pool", "include_deltas"} & set(d)
    mode = d.get("mode", "weave" if weave_keys else "merge")
    if not isinstance(mode, str) or mode not in ("merge", "weave"):
        raise _fail(where, f"mode must be merge or weave, got {mode!r}")
    if mode == "merge" and weave_keys:
        raise _fail(where, f"'{sorted(weave_keys)[0]}' belongs to mode: weave")
    if mode == "weave" and "lam" in d:
        raise _fail(where, "'lam' belongs to mode: merge (weave takes lambdas or search)")
    for k in ("lam", "lambdas", "search", "include_deltas", "seed", "out_dtype", "shard_size", "compat", "threads",
              "chunk_size", "cluster"):  # fmt: skip
        if k in d:
            kwargs[k] = d[k]
    if "pool" in d:
        kwargs["pool"] = _pool(d["pool"], where)
    out = d.get("out")
    if out is not None and not isinstance(out, str):
        raise _fail(where, f"'out' must be a path, got {out!r}")
    return Recipe(mode, base, models, out, kwargs)


def run(
    recipe: str | os.PathLike | Mapping[str, Any],
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], object] | None = None,
    threads: int | None = None,
    chunk_size: int | None = None,
    allow_code: bool = False,
    cluster: str | None = None,
):
    """Runs a recipe (a YAML path or a mapping, in our schema or mergekit's) and returns the
    :class:`~weightweave.Report`. ``out`` overrides the recipe's ``out``; one of them is needed;
    ``cluster`` (``"ray"``, ``"ray:ADDRESS"``) the recipe's ``cluster``.
    ``allow_code=True`` lets a ``pool: module:function`` key import and call that function
    (never the default: a recipe from a stranger must not run code).

    Raises:
        RecipeError: for a key that is unsupported, mistyped or missing, before any work.
        WeaveError: as :func:`weightweave.merge`.
    """
    from . import api

    r = load(recipe, allow_code=allow_code)
    target = out if out is not None else r.out
    if target is None:
        raise RecipeError("no output: give OUT (or 'out' in the recipe)")
    kw = dict(r.kwargs)
    for k, v in (("threads", threads), ("chunk_size", chunk_size), ("cluster", cluster)):
        if v is not None:
            kw[k] = v
    fn = api.weave if r.mode == "weave" else api.merge
    try:
        if r.tokenizer is None and not r.loras:
            return fn(r.base, r.models, target, overwrite=overwrite, progress=progress, **kw)
        from . import vocabulary

        with vocabulary.workdir(target) as work:
            if r.loras:
                kw["_overlays"] = _apply_loras(r.loras, work, progress)
            if r.tokenizer is not None:
                from . import tokenizer

                kw.update(tokenizer.prepare(r.tokenizer, [r.base, *r.models], work))
            return fn(r.base, r.models, target, overwrite=overwrite, progress=progress, **kw)
    except RecipeError:
        raise
    except (TypeError, ParamError) as e:
        # A value of the recipe the API refused: the same error, naming the recipe.
        raise RecipeError(f"{os.fspath(recipe) if not isinstance(recipe, Mapping) else 'recipe'}: {e}") from None
