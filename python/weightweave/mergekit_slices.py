"""mergekit's ``slices`` as weightweave runs them: the keys mergekit's schema knows, slices that
equal whole models (the ``models`` form), and any other slicing as lanes the core assembles
(``source/slices.rs``): layers stacked, repeated or moved, merged per slice."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .recipe import _conditions, _ignored, _local, _mapping

#: Methods whose slices may merge different numbers of models (a spare lane at weight 0 adds
#: exactly nothing to their weighted sums, signs and normalisations).
_PAD_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear")


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
    if len(parsed[-1][0]["sources"]) > len(parsed[0][0]["sources"]):
        # mergekit 0.1.5 plans the weights after the layers with the last slice's models zipped
        # to as many as the first slice has: it drops the rest there. Not emulated.
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
    # The models of the first slice (its sources as listed) give the weights before the layers,
    # the last slice's those after them (mergekit's planner): each vocabulary tensor is realigned
    # over its own slice's models.
    ends = [[x["model"] for x in parsed[k][0]["sources"]] for k in (0, -1)]
    return out, {"inputs": inputs, "slices": spec, "ends": ends}
