"""Per-tensor parameters, written as mergekit writes them.

A parameter's value may be a *setting*: a gradient over the layers (a list read at
t = layer / (layers − 1), numbers interpolated linearly), or conditions such as
``[{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]`` where the first condition
whose filter is a substring of the tensor's name gives the value. The core resolves them per
tensor (``recipe/tensors.rs``); this module only checks their shape and normalises them to lists
of ``{"filter", "value"}``.

In :func:`weightweave.merge` and :func:`weightweave.weave` a bare list of numbers stays what it
was (one value per fine-tune), so a shared setting there is a condition mapping or a list of them
(``density={"value": [0.2, 0.8]}`` is a gradient); a per-model list may hold settings
(``density=[[{"filter": "mlp", "value": 0.3}, {"value": 0.6}], 0.5]``).
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

from ._rust import ParamError

#: A value as an error message shows it: bounded in depth and length, so a hostile value (nested
#: thousands deep, millions long) cannot make the message itself fail or grow.
_repr = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 80, 80
_shown = _repr.repr

#: Conditions in one setting and values in one gradient: far beyond any published config, and a
#: bound on what a hostile recipe can make every tensor evaluate.
MAX_CONDITIONS = 256
MAX_STEPS = 4096


def _is_list(v: object) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, (str, bytes))


def is_conditional(v: object) -> bool:
    """A condition mapping, or a non-empty list of them: a shared per-tensor setting."""
    return isinstance(v, Mapping) or (_is_list(v) and len(v) > 0 and all(isinstance(e, Mapping) for e in v))  # type: ignore[arg-type]


def is_per_model_settings(v: object) -> bool:
    """A per-model list at least one of whose entries is a setting (a mapping or a list)."""
    return _is_list(v) and not is_conditional(v) and any(isinstance(e, Mapping) or _is_list(e) for e in v)  # type: ignore[attr-defined]


def _scalar(name: str, v: object) -> bool | int | float | str:
    from .job import _f32_checked, _is_number

    if isinstance(v, (bool, str)):
        return v
    if _is_number(v):
        return v if isinstance(v, int) else _f32_checked(name, float(v))  # type: ignore[arg-type]
    raise ParamError(f"{name}: expected a number, bool or string, got {_shown(v)}")


def _value(name: str, v: object) -> Any:
    if _is_list(v):
        if not v:
            raise ParamError(f"{name}: an empty gradient has no value")
        if len(v) > MAX_STEPS:  # type: ignore[arg-type]
            raise ParamError(f"{name}: a gradient of {len(v)} values, more than the {MAX_STEPS} allowed")  # type: ignore[arg-type]
        return [_scalar(f"{name}[{i}]", x) for i, x in enumerate(v)]  # type: ignore[attr-defined]
    return _scalar(name, v)


def conditions(name: str, v: object) -> list[dict[str, Any]]:
    """``v`` as conditions: one value, a gradient list, a condition mapping, or a list of them."""
    if isinstance(v, Mapping):
        v = [v]
    if not is_conditional(v):
        return [{"filter": None, "value": _value(name, v)}]
    if len(v) > MAX_CONDITIONS:  # type: ignore[arg-type]
        raise ParamError(f"{name}: {len(v)} conditions, more than the {MAX_CONDITIONS} allowed")  # type: ignore[arg-type]
    out = []
    for i, c in enumerate(v):  # type: ignore[arg-type]
        bad = sorted(str(k) for k in set(c) - {"value", "filter", "slice", "module"})
        if bad:
            raise ParamError(f"{name}[{i}]: '{bad[0]}' is not part of a condition (value, filter, slice, module)")
        if "value" not in c:
            raise ParamError(f"{name}[{i}]: a condition needs a value")
        f = c.get("filter")
        if f is not None and not isinstance(f, str):
            raise ParamError(f"{name}[{i}].filter must be a string (a part of tensor names), got {_shown(f)}")
        cond = {"filter": f, "value": _value(f"{name}[{i}].value", c["value"])}
        if c.get("slice") is not None:
            k = c["slice"]
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < 2**31:
                raise ParamError(f"{name}[{i}].slice must be the index of an output slice, got {_shown(k)}")
            cond["slice"] = k
        if c.get("module") is not None:
            k = c["module"]
            if not isinstance(k, (str, int)) or isinstance(k, bool) or (isinstance(k, int) and not 0 <= k < 2**31):
                raise ParamError(f"{name}[{i}].module must name one of the modules, got {_shown(k)}")
            cond["module"] = k
        out.append(cond)
    return out


def _per_model(name: str, v: object) -> list[dict[str, Any]]:
    """One model's setting; an empty list is none (the parameter's default, if it has one)."""
    return [] if _is_list(v) and not v else conditions(name, v)


def split(params: dict[str, Any], weights: object, lam: object) -> tuple[object, object, dict[str, Any] | None]:
    """Takes the per-tensor settings out of ``params`` (in place), ``weights`` and ``lam``;
    returns (weights, lam, per_tensor) with what is left of the first two. ``params["modules"]``
    (taken out too) names the model's modules (``modules.py``): each runs its gradients over its
    own layers, and a condition's ``module`` scopes it to one."""
    modules = _modules(params.pop("modules", None))
    shared: dict[str, Any] = {}
    per_model: dict[str, Any] = {}
    for k in list(params):
        v = params[k]
        if is_conditional(v):
            shared[k] = conditions(k, params.pop(k))
        elif is_per_model_settings(v):
            per_model[k] = [_per_model(f"{k}[{i}]", e) for i, e in enumerate(params.pop(k))]
    if is_conditional(weights):
        raise ParamError("weights are per model: a list with one entry (a number or a setting) per fine-tune")
    if is_per_model_settings(weights):
        per_model["weights"] = [_per_model(f"weights[{i}]", e) for i, e in enumerate(weights)]  # type: ignore[arg-type]
        weights = None
    if is_conditional(lam):
        shared["lam"] = conditions("lam", lam)
        lam = None
    if not shared and not per_model:
        return weights, lam, None
    names = [m["name"] for m in modules]
    for k, s in [*shared.items(), *((k, s) for k, per in per_model.items() for s in per)]:
        for c in s:
            m = c.get("module")
            if isinstance(m, str):
                if m not in names:
                    raise ParamError(f"{k}: a condition of module '{m}', not one of the modules given "
                                     f"({', '.join(names) or 'none'})")  # fmt: skip
                c["module"] = names.index(m)
            elif m is not None and m >= len(names):
                raise ParamError(f"{k}: a condition of module {m}, of {len(names)} modules given")
    return weights, lam, {"shared": shared, "per_model": per_model, **({"modules": modules} if modules else {})}


def _modules(v: object) -> list[dict[str, Any]]:
    """``modules``: ``[{"name": str, "prefixes": [str, ...], "layered": bool, "pins": [[prefix, t], ...]},
    ...]`` (``layered`` true and ``pins`` none unless given)."""
    if v is None:
        return []
    if not _is_list(v) or len(v) > 64:  # type: ignore[arg-type]
        raise ParamError("modules must be a list of up to 64 {'name', 'prefixes', 'layered', 'pins'}")
    out = []
    for i, m in enumerate(v):  # type: ignore[arg-type]
        keys = {"name", "prefixes", "layered", "pins"}
        ok = isinstance(m, Mapping) and set(m) <= keys and isinstance(m.get("name"), str)
        ps = m.get("prefixes") if ok else None  # type: ignore[union-attr]
        ok = ok and _is_list(ps) and 0 < len(ps) <= 256 and all(isinstance(p, str) and p for p in ps)  # type: ignore[arg-type]
        pins = m.get("pins", []) if ok else None  # type: ignore[union-attr]
        ok = ok and _is_list(pins) and len(pins) <= 256 and all(  # type: ignore[arg-type]
            _is_list(x) and len(x) == 2 and isinstance(x[0], str) and x[0] and not isinstance(x[1], bool)
            and isinstance(x[1], (int, float)) and 0 <= x[1] <= 1 for x in pins)  # type: ignore[union-attr]  # fmt: skip
        if not ok or not isinstance(m.get("layered", True), bool):  # type: ignore[union-attr]
            raise ParamError(f"modules[{i}] must be {{'name': str, 'prefixes': [str, ...], 'layered': bool, "
                             f"'pins': [[prefix, t], ...]}}, got {_shown(m)}")  # fmt: skip
        out.append({"name": m["name"], "prefixes": list(ps), "layered": m.get("layered", True),  # type: ignore[index,union-attr,arg-type]
                    "pins": [(x[0], float(x[1])) for x in pins]})  # type: ignore[union-attr]
    return out


def split_slices(params: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Takes ``slices`` out of ``params``: the output's layers as layer ranges of the inputs, a
    list of ``{"len": n, "lanes": [[input, start], ...]}`` (input 0 the base, i the i-th model;
    lane 0 the base's), what a mergekit config's ``slices`` compile to."""
    sl = params.pop("slices", None)
    if sl is None:
        return None
    if not _is_list(sl) or not sl or len(sl) > 1 << 16:
        raise ParamError("slices must be a non-empty list of {'len', 'lanes'}")
    out = []
    for i, s in enumerate(sl):
        ok = isinstance(s, Mapping) and set(s) == {"len", "lanes"} and _is_list(s["lanes"])
        ok = ok and all(_is_list(x) and len(x) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and
                                                            0 <= v < 2**31 for v in x) for x in s["lanes"])  # fmt: skip
        if not ok or not isinstance(s["len"], int) or isinstance(s["len"], bool) or not 0 < s["len"] < 2**31:
            form = "{'len': layers, 'lanes': [[input, first layer], ...]}"
            raise ParamError(f"slices[{i}] must be {form}, got {_shown(s)}")
        out.append({"len": s["len"], "lanes": [list(x) for x in s["lanes"]]})
    return out
