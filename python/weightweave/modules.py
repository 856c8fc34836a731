"""mergekit's modules: the parts of a model that mergekit plans apart.

A vision-language model is a text decoder, a vision tower and a projector between them; T5 is an
encoder, a decoder and shared embeddings. mergekit 0.1.5 knows these architectures from its own
architecture files and merges each module on its own: a layer gradient runs over the module's own
layers (a vision tower of 32 blocks beside a decoder of 28 layers: block 31 is t = 1, and so is
layer 27), and a ``modules:`` config gives each module its own models and parameters.

Here a module is the set of tensors whose names start with one of its prefixes (the longest prefix
wins, so ``visual.merger.`` is the projector inside ``visual.``); the core reads gradients per
module and scopes conditions to a module (``recipe/tensors.rs``). :data:`ARCHITECTURES` lists the
modular architectures of mergekit 0.1.5, by the ``architectures`` entry of ``config.json``.
Whisper is left out: mergekit 0.1.5's file for it joins its decoder's prefix to the names without
a dot, so mergekit cannot plan it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from .settings import conditions

_Module = tuple[str, tuple[str, ...], bool, tuple[tuple[str, float], ...]]
# Each with the names its checkpoints were published under (``language_model.…``, ``visual.…``)
# and those of transformers' newer layout (``model.language_model.…``), so a model merges the
# same in either.
_VLM: tuple[_Module, ...] = (
    ("text_decoder", ("language_model.", "model.language_model.", "lm_head."), True, ()),
    ("multi_modal_projector", ("multi_modal_projector.", "model.multi_modal_projector."), False, ()),
    ("vision_tower", ("vision_tower.", "model.vision_tower."), True, ()))  # fmt: skip
_QWEN2_VL: tuple[_Module, ...] = (
    ("text_decoder", ("model.", "lm_head."), True, ()),
    # mergekit's file gives this projector 2 layers whose weight names (mlp.0, mlp.2) carry no
    # layer index: it plans each of them at t = 0 and again at t = 1, and writes the last.
    ("multi_modal_projector", ("visual.merger.", "model.visual.merger."), False,
     (("visual.merger.mlp.", 1.0), ("model.visual.merger.mlp.", 1.0))),
    ("vision_tower", ("visual.", "model.visual."), True, ()))  # fmt: skip
_QWEN3_VL: tuple[_Module, ...] = (
    ("text_decoder", ("model.language_model.", "lm_head."), True, ()),
    # Its deepstack mergers are the projector's layers.
    ("multi_modal_projector", ("model.visual.merger.", "model.visual.deepstack_merger_list."), True, ()),
    ("vision_tower", ("model.visual.",), True, ()))  # fmt: skip

#: Modular architectures: each module's name, the prefixes of its tensors' names, whether it has
#: layers (one without reads its gradients at t = 0, as mergekit's pre- and post-layer weights),
#: and tensors mergekit plans at a t of their own.
ARCHITECTURES: dict[str, tuple[_Module, ...]] = {
    "Gemma3ForConditionalGeneration": _VLM,
    "Mistral3ForConditionalGeneration": _VLM,
    "Llama4ForConditionalGeneration": (_VLM[0], _VLM[1], ("vision_model", ("vision_model.", "model.vision_model."),
                                                          True, ())),
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,
    "Qwen3VLForConditionalGeneration": _QWEN3_VL,
    "Qwen3VLMoeForConditionalGeneration": _QWEN3_VL,
    "T5ForConditionalGeneration": (("decoder", ("decoder.",), True, ()), ("encoder", ("encoder.",), True, ()),
                                   ("shared", ("shared.", "lm_head."), False, ())),
}  # fmt: skip


def architecture(path: str) -> str | None:
    """The architecture a model's ``config.json`` names (its first ``architectures`` entry)."""
    cfg = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if not cfg or not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            c = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    a = c.get("architectures") if isinstance(c, dict) else None
    return a[0] if isinstance(a, list) and a and isinstance(a[0], str) else None


def table(path: str) -> list[dict[str, Any]] | None:
    """The modules of the model at ``path`` as the core takes them, or None for a model of one
    module."""
    mods = ARCHITECTURES.get(architecture(path) or "")
    if mods is None:
        return None
    return [{"name": n, "prefixes": list(p), "layered": layered, "pins": [list(x) for x in pins]}
            for n, p, layered, pins in mods]  # fmt: skip


def flatten(d: Mapping[str, Any], where: str, mods: list[dict[str, Any]] | None, arch: str | None,
            fail: Callable[[str, str], Exception], ignored: Callable[[str, list[str], str], None],
            pad_methods: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """A ``modules:`` config as the ``models`` config it equals: each module's parameters (and its
    models') become conditions scoped to it, in mergekit's precedence (a model's, then its
    module's, then the config's). Modules may merge different models with ``pad_methods`` (the
    methods a weight of 0 takes a model out of exactly). Anything else is refused, naming what."""
    pad = d.get("merge_method") in pad_methods
    given = d.get("modules")
    if not isinstance(given, Mapping) or not given:
        raise fail(where, "'modules' must map module names to their models and parameters")
    if "models" in d or "slices" in d:
        raise fail(where, "give one of 'models', 'slices' and 'modules', as mergekit requires")
    if mods is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise fail(where, f"'modules': the base model's architecture ({arch or 'no config.json architectures'}) is "
                          f"not one mergekit 0.1.5 plans in modules (those: {known})")  # fmt: skip
    names = [m["name"] for m in mods]
    # What keeps the config from running, all at once (a config rarely has just one).
    unknown = [str(k) for k in given if k not in names]
    blockers = [f"modules.{k}: {arch} has the modules {', '.join(names)}" for k in unknown[:8]]
    if len(unknown) > 8:
        # A hostile config can name thousands: the message stays short.
        blockers.append(f"{len(unknown) - 8} more modules {arch} does not have")
        given = {k: v for k, v in given.items() if k in names}
    missing = [n for n in names if n not in given]
    if missing:
        blockers.append(f"'modules' leaves out {', '.join(missing)}: mergekit writes only the modules a config "
                        f"lists, a model without those tensors; list every module of {arch} ({', '.join(names)})")
    listed: list[tuple[int, str, list[str], list[Mapping[str, Any]]]] = []
    shared: dict[str, list[dict[str, Any]]] = {}
    for name, m in given.items():
        at = f"modules.{name}"
        if not isinstance(m, Mapping):
            raise fail(where, f"{at} must be a mapping with 'models'")
        ignored(where, [f"{at}.{k}" for k in sorted(str(k) for k in m) if k not in ("models", "slices", "parameters")],
                "not a key of a mergekit module")  # fmt: skip
        if m.get("slices") is not None:
            blockers.append(f"{at}.slices: slices inside a module are not run yet; give the module 'models' (every "
                            "layer of each model in place)")  # fmt: skip
            continue
        models = m.get("models")
        if not isinstance(models, list) or not models:
            raise fail(where, f"{at}.models must be a non-empty list")
        for i, e in enumerate(models):
            if not isinstance(e, Mapping) or not isinstance(e.get("model"), str):
                raise fail(where, f"{at}.models[{i}] must be a mapping with 'model'")
        if name not in names:
            continue
        k = names.index(name)
        listed.append((k, at, [e["model"] for e in models], models))
        ps = m.get("parameters") or {}
        if not isinstance(ps, Mapping):
            raise fail(where, f"{at}.parameters must be a mapping")
        for key, v in ps.items():
            shared.setdefault(str(key), []).extend(_scoped(where, f"{at}.parameters.{key}", v, k, fail, ignored))
    # The models entries: every model any module merges, in the order they first appear. A
    # module that merges fewer gives the others weight 0 in it, which adds exactly nothing (as for
    # slices), so each module is the merge of its own models, as mergekit plans it.
    order: list[str] = []
    for _, _, refs, _ in listed:
        order += [r for r in refs if r not in order]
    base = d.get("base_model")
    for _, at, refs, _ in listed:
        if len(set(refs)) != len(refs):
            blockers.append(f"{at} lists a model twice (mergekit refuses duplicate inputs)")
        elif refs != order and not pad:
            blockers.append(f"{at} merges {len(refs)} of the {len(order)} models the modules name: modules that "
                            f"merge different models are run for {', '.join(pad_methods)}, not {d.get('merge_method')}")
        elif [order.index(r) for r in refs] != sorted(order.index(r) for r in refs):
            blockers.append(f"{at} lists its models in another order than the other modules: the order of a "
                            "sum decides its last bits, so such modules are not run yet")  # fmt: skip
        elif d.get("merge_method") == "linear" and base is not None and (base in refs) != (base in listed[0][2]):
            # (linear averages base_model too, and mergekit adds it to a module that does not list it)
            blockers.append(f"{at} and {listed[0][1]} differ in whether they list base_model: not run yet")
    if blockers:
        what = "a reason" if len(blockers) == 1 else f"{len(blockers)} reasons"
        raise fail(where, f"'modules' cannot run ({what}): " + "; ".join(blockers))
    top = d.get("parameters") or {}
    if not isinstance(top, Mapping):
        raise fail(where, "parameters must be a mapping")
    out_models = []
    for ref in order:
        per: dict[str, list[dict[str, Any]]] = {}
        for k, at, refs, models in listed:
            if ref not in refs:
                per.setdefault("weight", []).append({"filter": None, "value": 0.0, "module": k})
                continue
            i = refs.index(ref)
            ps = models[i].get("parameters") or {}
            if not isinstance(ps, Mapping):
                raise fail(where, f"{at}.models[{i}].parameters must be a mapping")
            for key, v in ps.items():
                per.setdefault(str(key), []).extend(_scoped(where, f"{at}.models[{i}].parameters.{key}", v, k, fail,
                                                            ignored))  # fmt: skip
        out_models.append({"model": ref, **({"parameters": per} if per else {})})
    params = dict(top)
    for key, conds in shared.items():
        params[key] = conds + (_scoped(where, f"parameters.{key}", top[key], None, fail, ignored) if key in top
                               else [])  # fmt: skip
    out = {k: v for k, v in d.items() if k not in ("modules", "parameters")}
    out["models"] = out_models
    if params:
        out["parameters"] = params
    return out


def _scoped(where: str, at: str, v: object, module: int | None, fail: Callable[[str, str], Exception],
            ignored: Callable[[str, list[str], str], None]) -> list[dict[str, Any]]:  # fmt: skip
    """Setting ``v`` as conditions that hold in module ``module`` only (None: everywhere); keys
    of a condition that mergekit's schema does not have are ignored aloud, as for the config's."""
    from ._rust import ParamError

    if isinstance(v, list) and any(isinstance(c, Mapping) for c in v):
        ignored(where, [f"{at}[{i}].{x}" for i, c in enumerate(v) if isinstance(c, Mapping) for x in c
                        if x not in ("value", "filter")],
                "not a key of a mergekit condition (value, filter): the condition matches every tensor")  # fmt: skip
        v = [{x: y for x, y in c.items() if x in ("value", "filter")} if isinstance(c, Mapping) else c for c in v]
    try:
        cs = conditions(at, v)
    except ParamError as e:
        raise fail(where, str(e)) from None
    return [c | {"module": module} if module is not None else c for c in cs]
