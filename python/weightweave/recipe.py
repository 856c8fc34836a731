"""Recipes as files: ``weightweave run RECIPE.yaml [OUT]`` and :func:`run`.

Two schemas are read. A mapping with ``merge_method`` is a mergekit config, accepted as it is for
the methods both tools have and run with mergekit's semantics (``compat="mergekit"``,
``mergekit_config.py``), plus an optional ``weave:`` block of ours. Anything else is our own
schema (see the README). Every key is checked before any work: a key we do not support is one
:class:`RecipeError` naming it, never ignored. Paths are taken as given (relative to the working
directory, as mergekit does).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._rust import ParamError
from .settings import conditions

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
    if "merge_method" in data:
        from .mergekit_config import _mergekit

        r = _mergekit(data, where)
    else:
        r = _own(data, where)
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
