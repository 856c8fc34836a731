"""Arguments → the one validated ``job`` mapping every Rust entry point takes: numbers checked
against the f32 arithmetic, Λ parsed from its text forms, search spaces and pools normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._rust import ParamError

POOLS = ("mean", "random", "magmax")
COMPATS = ("paper", "mergekit")

#: A search space: a grid (value lists by name, their Cartesian product in the given order) or a
#: list of points (each a dict setting ``lam`` and any numeric parameter, or ``weights``).
SearchArg = Mapping[str, Any] | Sequence[Mapping[str, Any]]
#: A pool: a name, or a function of one block of A* (float32, shape (N, n)) returning n values.
PoolArg = str | Callable[[Any], Any]


MAX_LAMBDAS = 2**20


def parse_lambdas(spec: object) -> list[float]:
    """Λ from ``"start:stop:step"`` (both ends included, never past ``stop``), ``"0.2,0.5,1"``,
    or a sequence of numbers.

    Raises:
        ParamError: naming what is wrong, before anything large is built.
    """
    if isinstance(spec, str):
        return _parse_lambda_text(spec)
    if isinstance(spec, (bytes, Mapping)) or not isinstance(spec, Sequence | range) and not _is_array(spec):
        raise ParamError(
            f"lambdas must be a sequence of numbers or a string such as '0.1:1.0:0.1' or '0.2,0.5,1', "
            f"got {type(spec).__name__}"
        )
    if len(spec) > MAX_LAMBDAS:  # type: ignore[arg-type]
        raise ParamError(f"lambdas: {len(spec)} values, more than the {MAX_LAMBDAS} allowed")  # type: ignore[arg-type]
    out = []
    for i, x in enumerate(spec):  # type: ignore[arg-type]
        if isinstance(x, bool) or not isinstance(x, int | float) and not _is_number(x):
            raise ParamError(f"lambdas[{i}]: expected a number, got {x!r}")
        out.append(_f32_checked(f"lambdas[{i}]", float(x)))
    return out


def _is_array(v: object) -> bool:
    """An array of at least one dimension (a 0-d array has neither a length nor items)."""
    return hasattr(v, "__len__") and hasattr(v, "__iter__") and hasattr(v, "dtype") and getattr(v, "ndim", 1) >= 1


def _is_number(v: object) -> bool:
    import numbers

    return isinstance(v, numbers.Real)


F32_MAX = 3.4028234663852886e38


def _f32_checked(name: str, v: float) -> float:
    """``v`` when it is finite and an f32 can hold it (all arithmetic is f32)."""
    if v != v or abs(v) == float("inf"):
        raise ParamError(f"{name}: {v} is not finite")
    if abs(v) > F32_MAX:
        raise ParamError(f"{name}: {v:g} is beyond the f32 range of the arithmetic (about 3.4e38)")
    return v


def _parse_lambda_text(spec: str) -> list[float]:
    form = "use start:stop:step, or comma-separated values"
    try:
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3:
                raise ParamError(f"lambdas: '{spec}' has {len(parts)} ':'-separated parts, not 3 ({form})")
            start, stop, step = (_f32_checked("lambdas", float(x)) for x in parts)
            if step <= 0:
                raise ParamError(f"lambdas: '{spec}': the step must be positive")
            if stop < start:
                raise ParamError(f"lambdas: '{spec}': stop {stop:g} is below start {start:g}")
            # Values past stop by less than a rounding error still count as reaching it.
            span = (stop - start) / step
            if span + 1 > MAX_LAMBDAS:
                raise ParamError(f"lambdas: '{spec}' gives {span + 1:.3g} values, more than the {MAX_LAMBDAS} allowed")
            count = int(span + 1e-9) + 1
            return [round(start + i * step, 10) for i in range(count)]
        values = [x.strip() for x in spec.split(",")]
        if any(not x for x in values):
            raise ParamError(f"lambdas: '{spec}' has an empty value ({form})")
        if len(values) > MAX_LAMBDAS:
            raise ParamError(f"lambdas: {len(values)} values, more than the {MAX_LAMBDAS} allowed")
        return [_f32_checked("lambdas", float(x)) for x in values]
    except ValueError as e:
        raise ParamError(f"lambdas: cannot parse '{spec}': {e} ({form})") from None



#: The words YAML and the CLI use for booleans; any other string is refused, never truthy.
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def as_bool(name: str, v: object) -> bool:
    """``v`` as a bool: True/False (numpy's too) or the words for them; anything else (a list, an
    array, "maybe") is a ParamError, so ``"false"`` is never taken as true."""
    if isinstance(v, bool):
        return v
    if type(v).__name__ == "bool_" and type(v).__module__ == "numpy":
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise ParamError(f"{name} must be True or False, got {v!r}")


def _method(method: object) -> str:
    if not isinstance(method, str):
        raise ParamError(f"method must be a string, got {type(method).__name__}")
    return method


def _numbers(name: str, v: object) -> list[float]:
    """A list of finite f32 numbers (per-model weights, densities, a point's weight vector)."""
    if isinstance(v, (str, bytes, Mapping)) or not hasattr(v, "__iter__") or getattr(v, "ndim", 1) == 0:
        raise ParamError(f"{name} must be a sequence of numbers, got {v!r}")
    out = []
    for i, x in enumerate(v):  # type: ignore[attr-defined]
        if isinstance(x, bool) or not _is_number(x):
            raise ParamError(f"{name}[{i}]: expected a number, got {x!r}")
        out.append(_f32_checked(f"{name}[{i}]", float(x)))
    return out


def _param(name: str, v: object) -> object:
    """A method parameter: a number, bool, string, or a list of numbers (one per model)."""
    if isinstance(v, bool | str):
        return v
    if type(v).__name__ == "bool_" and type(v).__module__ == "numpy":
        return bool(v)
    if isinstance(v, int):
        return v
    if _is_number(v):
        return _f32_checked(name, float(v))  # type: ignore[arg-type]
    if isinstance(v, Sequence) or _is_array(v):
        return _numbers(name, v)
    raise ParamError(f"parameter '{name}': expected a number, bool, string or list of numbers, got {v!r}")


def _search(search: object) -> dict[str, list[Any]] | list[dict[str, Any]]:
    """A grid (name → values; ``lam`` may also be Λ text such as ``"0.1:1.0:0.1"``) or a list of
    points, validated the same way as the arguments they stand for."""
    if isinstance(search, Mapping):
        grid: dict[str, list[Any]] = {}
        for k, vals in search.items():
            if not isinstance(k, str):
                raise ParamError(f"search: names must be strings, got {k!r}")
            if k == "lam":
                grid[k] = parse_lambdas(vals) if isinstance(vals, str) else _numbers("search['lam']", vals)
                continue
            if isinstance(vals, (str, bytes)) or not isinstance(vals, Sequence) and not _is_array(vals):
                raise ParamError(f"search['{k}'] must be a list of values, got {vals!r}")
            grid[k] = [_numbers(f"search['{k}'][{i}]", x) if k == "weights" else _param(f"search['{k}'][{i}]", x)
                       for i, x in enumerate(vals)]  # fmt: skip
        return grid
    if isinstance(search, (str, bytes)) or not isinstance(search, Sequence):
        raise ParamError("search must be a dict of value lists (a grid) or a list of points (dicts)")
    points = []
    for i, p in enumerate(search):
        if not isinstance(p, Mapping):
            raise ParamError(f"search[{i}] must be a dict such as {{'lam': 0.5, 'density': 0.2}}, got {p!r}")
        points.append({k: _numbers(f"search[{i}]['weights']", v) if k == "weights" else _param(f"search[{i}]['{k}']", v)
                       for k, v in p.items()})  # fmt: skip
    return points


def _job(method: object, params: dict[str, Any], mode: str, *, lam: float | str | None = None,
         lambdas: Sequence[float] | str | None = None, pool: PoolArg = "mean", include_deltas: bool = True,
         seed: int = 0, threads: int | None = None, chunk_size: int | None = None,
         out_dtype: str | None = None, weights: Sequence[float] | str | None = None,
         search: SearchArg | None = None, compat: str | None = None,
         keep_base: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The recipe and run options, validated, as the one mapping every Rust entry point takes."""
    for name, v in (("threads", threads), ("chunk_size", chunk_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v >= 2**63):
            raise ParamError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ParamError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    from .settings import split, split_slices

    slices = split_slices(params)
    # A tokenizer built for the output by a recipe (recipe.run, tokenizer.py): not API arguments.
    overlays = params.pop("_overlays", None) or []
    tokenizer = params.pop("_tokenizer", None)
    # mergekit's dtype, which the inputs are rounded to as they are read (mergekit_config.py).
    load_dtype = params.pop("_load_dtype", None)
    weights, lam, per_tensor = split(params, weights, lam)  # type: ignore[assignment]
    metagpt = False
    if isinstance(weights, str) and weights == "metagpt":
        metagpt, weights = True, None
    if isinstance(lam, str) and lam == "metagpt":
        # MetaGPT's closed form: per-task weights from the norms, λ = 1 (SPEC).
        if mode != "merge":
            raise ParamError("lam='metagpt' is a plain merge's λ; to weave MetaGPT-weighted merges, "
                             "pass weights='metagpt'")  # fmt: skip
        if metagpt:
            raise ParamError("lam='metagpt' already sets the weights: give it, or weights='metagpt', not both")
        metagpt, lam = True, 1.0
    if metagpt and weights is not None:
        raise ParamError("MetaGPT sets the weights (λ_t = ‖τ_t‖² / Σ‖τ_k‖²): give weights or metagpt, not both")
    if lam is not None:
        if isinstance(lam, bool) or not _is_number(lam):
            raise ParamError(f"lam must be a number or 'metagpt', got {lam!r}")
        lam = _f32_checked("lam", float(lam))
    lines = _lines(params)
    if weights is not None:
        if isinstance(weights, (str, bytes, Mapping)) or not hasattr(weights, "__iter__") or getattr(
            weights, "ndim", 1
        ) == 0:
            raise ParamError(f"weights must be a sequence of numbers, one per fine-tuned model, got {weights!r}")
        weights = _numbers("weights", weights)
    if not isinstance(pool, str) and not callable(pool):
        raise ParamError(f"pool must be one of {', '.join(POOLS)} or a function, got {pool!r}")
    if out_dtype is not None and not isinstance(out_dtype, str):
        raise ParamError(f"out_dtype must be a string such as 'bf16', got {out_dtype!r}")
    if keep_base is not None and (not isinstance(keep_base, str) or not keep_base):
        raise ParamError(f"keep_base must be a regular expression such as '^classifier\\.', got {keep_base!r}")
    if compat is not None and (not isinstance(compat, str) or compat not in COMPATS):
        raise ParamError(f"compat must be one of {', '.join(COMPATS)}, got {compat!r}")
    for k, v in params.items():
        params[k] = _param(k, v)
    if search is not None and lambdas is not None:
        raise ParamError("give lambdas or search, not both (lambdas is the grid {'lam': lambdas})")
    return {
        "method": _method(method),
        "params": params,
        "mode": mode,
        "lam": lam,
        "lambdas": None if lambdas is None else parse_lambdas(lambdas),
        "pool": pool,
        "include_deltas": as_bool("include_deltas", include_deltas),
        "seed": seed,
        "threads": threads,
        "chunk_size": chunk_size,
        "out_dtype": out_dtype,
        "weights": weights,
        "search": None if search is None else _search(search),
        "compat": compat,
        "metagpt": metagpt,
        "lines": lines,
        "per_tensor": per_tensor,
        "slices": slices,
        "overlays": overlays,
        "tokenizer": tokenizer,
        "load_dtype": load_dtype,
        "keep_base": keep_base,
    }


#: LiNeS's options, taken out of the method parameters.
LINES_KEYS = ("lines", "lines_alpha", "lines_blocks")


def _lines(params: dict[str, Any]) -> dict[str, Any] | None:
    """Pops LiNeS's options off ``params``: None when LiNeS is off, else its α (None: the paper's
    rule) and L (None: from the names)."""
    on = as_bool("lines", params.pop("lines", False))
    alpha = params.pop("lines_alpha", None)
    blocks = params.pop("lines_blocks", None)
    if not on:
        if alpha is not None or blocks is not None:
            raise ParamError("lines_alpha and lines_blocks are LiNeS's: pass lines=True to scale by depth")
        return None
    if isinstance(alpha, str) and alpha == "auto":
        alpha = None
    if alpha is not None:
        if isinstance(alpha, bool) or not _is_number(alpha):
            raise ParamError(f"lines_alpha must be a number or 'auto', got {alpha!r}")
        alpha = _f32_checked("lines_alpha", float(alpha))
    if blocks is not None and (not isinstance(blocks, int) or isinstance(blocks, bool) or not 2 <= blocks < 2**31):
        raise ParamError(f"lines_blocks must be an integer of at least 2, got {blocks!r}")
    return {"alpha": alpha, "blocks": blocks}


