"""mergekit's modules: a vision-language model's text decoder, vision tower and projector planned
apart, each gradient over its module's own layers, and ``modules:`` configs. Checked against a
reference that plans each module as mergekit 0.1.5's ``plan.py`` does: the module's layer count
from its ``config.json`` key (``num_hidden_layers``, ``vision_config.depth``), t = layer / (layers −
1) within the module, the weights outside its layers at t = 0, and each tensor's module known from
how the test built it (not from weightweave's prefix table). The real mergekit runs a VLM config in
benches/mergekit_compare.py (row ``vlm_gradient``)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

import weightweave as ww
from weightweave import reference_mergekit as MK
from weightweave.recipe import RecipeError

from conftest import assert_close_ulp, load

TEXT, VISION = 3, 5
CONFIG = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
          "num_hidden_layers": TEXT, "vision_config": {"depth": VISION}}  # fmt: skip


def _layout() -> dict[str, tuple[tuple[int, ...], str, int | None]]:
    """A Qwen2-VL's names: each tensor's shape, module and layer within its module."""
    out: dict[str, tuple[tuple[int, ...], str, int | None]] = {
        "model.embed_tokens.weight": ((16, 8), "text_decoder", None),
        "model.norm.weight": ((8,), "text_decoder", None),
        "lm_head.weight": ((16, 8), "text_decoder", None),
        "visual.patch_embed.proj.weight": ((6, 12), "vision_tower", None),
        "visual.merger.ln_q.weight": ((6,), "multi_modal_projector", None),
        # mergekit's Qwen2-VL file: the projector's layer weights, named without a layer index.
        "visual.merger.mlp.0.weight": ((8, 24), "multi_modal_projector", -1),
        "visual.merger.mlp.2.weight": ((8, 8), "multi_modal_projector", -1),
    }
    for i in range(TEXT):
        for n, s in (("self_attn.q_proj.weight", (8, 8)), ("mlp.up_proj.weight", (12, 8)),
                     ("input_layernorm.weight", (8,))):  # fmt: skip
            out[f"model.layers.{i}.{n}"] = (s, "text_decoder", i)
    for j in range(VISION):
        for n, s in (("attn.qkv.weight", (18, 6)), ("mlp.fc1.weight", (10, 6)), ("norm1.weight", (6,))):
            out[f"visual.blocks.{j}.{n}"] = (s, "vision_tower", j)
    return out


LAYOUT = _layout()
#: mergekit reads each module's layer count from config.json (the projector's is fixed in its
#: architecture file: override_num_layers 2).
MODULE_LAYERS = {"text_decoder": CONFIG["num_hidden_layers"], "vision_tower": CONFIG["vision_config"]["depth"],
                 "multi_modal_projector": 2}  # fmt: skip


def _t(name: str) -> float:
    """mergekit's plan: layer i of a module of n layers is planned at i / (n − 1) (1 when n = 1);
    the weights before and after the layers at 0. A layer weight whose name has no layer index
    (layer -1 here) is planned in every layer, and the last plan, at t = 1, is what is written."""
    _, module, layer = LAYOUT[name]
    n = MODULE_LAYERS[module]
    if layer == -1:
        layer = n - 1
    return 0.0 if layer is None else (1.0 if n == 1 else layer / (n - 1))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    g = torch.Generator().manual_seed(11)
    base = {n: torch.randn(s, generator=g) for n, (s, _, _) in LAYOUT.items()}
    models = [{n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(2)]
    root = tmp_path_factory.mktemp("vlm")
    paths = []
    for k, sd in enumerate([base, *models]):
        d = root / f"m{k}"
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(CONFIG))
        paths.append(d)
    return base, models, paths


def _one(d: dict, n: str) -> dict:
    return {n: d[n]}


def _run(tmp_path, cfg: dict) -> dict:
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ww.run(p, tmp_path / "o.safetensors")
    return load(tmp_path / "o.safetensors")


def _slack(base, models, ulps=8):
    return {n: ulps * max(x[n].abs().max().item() for x in [base, *models]) * 2.0**-23 for n in base}


def test_a_vlm_gradient_runs_over_each_modules_own_layers(vlm, tmp_path):
    """mergekit's own VLM example (vlm-ties.yml): density and weight gradients in a plain
    ``models`` config. The text decoder's 3 layers and the vision tower's 5 each span t ∈ [0, 1]."""
    base, models, (bp, m1, m2) = vlm
    scopes = [{"density": [1, 0.7, 0.1], "weight": 1.0}, {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}]
    shared = {"normalize": True}
    entries = [{"model": str(m), "parameters": sc} for m, sc in zip((m1, m2), scopes, strict=True)]
    got = _run(tmp_path, {"models": entries, "merge_method": "ties", "base_model": str(bp), "parameters": shared,
                          "dtype": "float32"})  # fmt: skip
    want = {}
    for n in base:
        t = _t(n)
        w = [MK.resolve(n, "weight", [sc], t) for sc in scopes]
        dens = [MK.resolve(n, "density", [sc], t, 1.0) for sc in scopes]
        want[n] = MK.merge(_one(base, n), [_one(m, n) for m in models], "ties", w, density=dens, normalize=True)[n]
    assert_close_ulp(got, want, atol=_slack(base, models))
    # One layer count for the whole model (5) would have put text layer 1 at t = 0.25, not 0.5.
    n = "model.layers.1.mlp.up_proj.weight"
    assert _t(n) == 0.5
    w_global = [MK.resolve(n, "weight", [sc], 0.25) for sc in scopes]
    assert w_global != [MK.resolve(n, "weight", [sc], 0.5) for sc in scopes]


MODULE_PARAMS = {
    "text_decoder": {"parameters": {"lambda": [0.5, 1.5]}, "weights": [{"weight": [1.0, 0.2]}, {}]},
    "vision_tower": {"parameters": {"lambda": [{"filter": "mlp", "value": [2.0, 0.0]}, {"value": 0.7}]},
                     "weights": [{}, {"weight": 0.1}]},
    "multi_modal_projector": {"parameters": {}, "weights": [{"weight": 0.0}, {}]},
}  # fmt: skip


def test_a_modules_config_gives_each_module_its_parameters(vlm, tmp_path):
    """``modules:``: each module's models and parameters, in mergekit's precedence (the model's
    in the module, the module's, the config's)."""
    base, models, (bp, m1, m2) = vlm
    top = {"weight": 0.6, "lambda": 1.0}
    modules = {}
    for name, spec in MODULE_PARAMS.items():
        entries = [{"model": str(m), **({"parameters": w} if w else {})}
                   for m, w in zip((m1, m2), spec["weights"], strict=True)]  # fmt: skip
        modules[name] = {"models": entries, **({"parameters": spec["parameters"]} if spec["parameters"] else {})}
    got = _run(tmp_path, {"modules": modules, "merge_method": "task_arithmetic", "base_model": str(bp),
                          "parameters": top, "dtype": "float32"})  # fmt: skip
    want = {}
    for n in base:
        t, spec = _t(n), MODULE_PARAMS[LAYOUT[n][1]]
        w = [MK.resolve(n, "weight", [own, spec["parameters"], top], t) for own in spec["weights"]]
        lam = MK.resolve(n, "lambda", [spec["parameters"], top], t)
        want[n] = MK.merge(_one(base, n), [_one(m, n) for m in models], "task_arithmetic", w, lam=lam)[n]
    assert_close_ulp(got, want, atol=_slack(base, models))
    # The projector took model 1's weight 0 and the config's 0.6 for model 2.
    n = "visual.merger.mlp.2.weight"
    torch.testing.assert_close(got[n], base[n] + 0.6 * (models[1][n] - base[n]), rtol=0, atol=1e-6)


def test_modules_may_merge_different_models(vlm, tmp_path):
    """Each module is the TIES merge of its own models: the decoder of both fine-tunes, the vision
    tower of the second, the projector of none (the base's, as mergekit keeps it)."""
    base, models, (bp, m1, m2) = vlm
    mods = {"text_decoder": {"models": [{"model": str(m1), "parameters": {"weight": 0.5}},
                                        {"model": str(m2), "parameters": {"weight": [1.0, 0.2]}}]},
            "vision_tower": {"models": [{"model": str(m2), "parameters": {"weight": 0.8}}]},
            "multi_modal_projector": {"models": [{"model": str(bp)}]}}  # fmt: skip
    got = _run(tmp_path, {"modules": mods, "merge_method": "ties", "base_model": str(bp), "dtype": "float32",
                          "parameters": {"normalize": True, "density": 0.5}})  # fmt: skip
    for n, (_, module, _) in LAYOUT.items():
        if module == "multi_modal_projector":
            assert torch.equal(got[n], base[n]), n
            continue
        if module == "vision_tower":
            ms, w = [models[1]], [0.8]
        else:
            ms, w = models, [0.5, MK.resolve(n, "weight", [{"weight": [1.0, 0.2]}], _t(n))]
        want = MK.merge(_one(base, n), [_one(m, n) for m in ms], "ties", w, density=0.5, normalize=True)[n]
        assert torch.equal(got[n], want), n


def test_the_api_takes_modules_and_scopes_conditions_to_them(vlm, tmp_path):
    base, models, (bp, m1, m2) = vlm
    mods = [{"name": "text", "prefixes": ["model.", "lm_head."]},
            {"name": "vision", "prefixes": ["visual."]},
            {"name": "projector", "prefixes": ["visual.merger."], "layered": False}]  # fmt: skip
    lam = [{"module": "vision", "value": [0.0, 1.0]}, {"value": 0.5}]
    ww.merge(bp, [m1, m2], tmp_path / "o.safetensors", method="task_arithmetic", lam=lam, modules=mods)
    got = load(tmp_path / "o.safetensors")
    for n, (_, module, layer) in LAYOUT.items():
        x = layer / (VISION - 1) if module == "vision_tower" and layer is not None else (
            0.0 if module == "vision_tower" else 0.5)  # fmt: skip
        # (the projector's merger.* start with visual. but are the projector's: 0.5)
        want = base[n] + x * ((models[0][n] - base[n]) + (models[1][n] - base[n]))
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-6, msg=n)
    with pytest.raises(ww.ParamError, match="module 'audio', not one of the modules given"):
        ww.merge(bp, [m1], tmp_path / "p.safetensors", method="task_arithmetic",
                 lam=[{"module": "audio", "value": 1.0}], modules=mods)  # fmt: skip


def _modules_cfg(paths, **over):
    bp, m1, m2 = paths
    mods = {n: {"models": [{"model": str(m1)}, {"model": str(m2)}]}
            for n in ("text_decoder", "multi_modal_projector", "vision_tower")}  # fmt: skip
    cfg = {"modules": mods, "merge_method": "task_arithmetic", "base_model": str(bp), "dtype": "float32"}
    for k, v in over.items():
        if v is None:
            del mods[k]
        else:
            mods[k] = v
    return cfg


@pytest.mark.parametrize(("change", "msg"), [
    ({"vision_tower": None}, "leaves out vision_tower: mergekit writes only the modules a config lists"),
    ({"audio": {"models": [{"model": "m1"}, {"model": "m2"}]}},
     "modules.audio: Qwen2VLForConditionalGeneration has the modules"),
    ({"vision_tower": "m1", "merge_method": "slerp"}, "merge different models are run for linear"),
    ({"vision_tower": "m2m1"}, "lists its models in another order"),
    ({"vision_tower": {"slices": [{"sources": []}]}}, "slices inside a module are not run yet"),
], ids=["missing", "unknown", "other-models", "other-order", "slices"])
def test_modules_configs_weightweave_cannot_run_say_why(vlm, tmp_path, change, msg):
    _, _, paths = vlm
    method = change.pop("merge_method", None)
    if change.get("vision_tower") == "m1":
        change = {"vision_tower": {"models": [{"model": str(paths[1])}]}}
    if change.get("vision_tower") == "m2m1":
        change = {"vision_tower": {"models": [{"model": str(paths[2])}, {"model": str(paths[1])}]}}
    if "audio" in change:
        change = {"audio": {"models": [{"model": str(paths[1])}, {"model": str(paths[2])}]}}
    cfg = _modules_cfg(paths, **change)
    if method:
        cfg |= {"merge_method": method, "parameters": {"t": 0.5}}
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RecipeError, match=msg):
        ww.run(p, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_every_reason_a_modules_config_cannot_run_comes_at_once(vlm, tmp_path):
    _, _, paths = vlm
    cfg = _modules_cfg(paths, vision_tower=None, multi_modal_projector={"slices": [{"sources": []}]},
                       audio={"models": [{"model": str(paths[1])}]},
                       text_decoder={"models": [{"model": str(paths[1])}, {"model": str(paths[1])}]})  # fmt: skip
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RecipeError, match=r"'modules' cannot run \(4 reasons\)") as e:
        ww.run(p, tmp_path / "o.safetensors")
    for part in ("modules.audio: Qwen2VL", "leaves out vision_tower", "multi_modal_projector.slices",
                 "modules.text_decoder lists a model twice"):  # fmt: skip
        assert part in str(e.value)


def test_slicing_a_model_of_modules_needs_modules(vlm, tmp_path):
    """mergekit refuses top-level ``slices`` on a model of several modules; so do we, rather than
    count vision blocks as decoder layers."""
    _, _, (bp, m1, _) = vlm
    srcs = [{"model": str(bp), "layer_range": [0, 2]}, {"model": str(m1), "layer_range": [1, 3]}]
    cfg = {"slices": [{"sources": srcs}], "merge_method": "slerp", "base_model": str(bp),
           "parameters": {"t": 0.5}}  # fmt: skip
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RecipeError, match="a model of modules .*only under 'modules:'"):
        ww.run(p, tmp_path / "o.safetensors")


def test_modules_on_a_model_of_one_module_are_refused(tmp_path):
    from conftest import make_state, write_models

    base, models = make_state(1, tasks=1)
    bp, mps = write_models(tmp_path, base, models)
    cfg = {"modules": {"text_decoder": {"models": [{"model": str(mps[0])}]}},
           "merge_method": "task_arithmetic", "base_model": str(bp)}  # fmt: skip
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RecipeError, match="not one mergekit 0.1.5 plans in modules"):
        ww.run(p, tmp_path / "o.safetensors")


def test_the_api_reads_the_modules_of_the_base_directorys_architecture(vlm, tmp_path):
    """Without ``modules=``, a gradient in ``ww.merge`` runs over the modules mergekit knows for the
    base's architecture, as the same config through ``weightweave run`` does."""
    base, models, (bp, m1, m2) = vlm
    ww.merge(bp, [m1, m2], tmp_path / "o.safetensors", method="task_arithmetic", compat="mergekit",
             lam={"value": [0.0, 1.0]})  # fmt: skip
    got = load(tmp_path / "o.safetensors")
    for n in base:
        want = base[n] + _t(n) * ((models[0][n] - base[n]) + (models[1][n] - base[n]))
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-6, msg=n)


def _new_layout(name: str) -> str:
    """transformers' newer names for a Qwen2-VL's tensors."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def test_a_vlm_in_transformers_newer_layout_merges_the_same(vlm, tmp_path):
    base, models, _ = vlm
    paths = []
    for k, sd in enumerate([base, *models]):
        d = tmp_path / f"n{k}"
        d.mkdir()
        save_file({_new_layout(n): t for n, t in sd.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(CONFIG))
        paths.append(d)
    kw = dict(method="ties", compat="mergekit", density={"value": [1.0, 0.1]}, weights=[{"value": [0, 1]}, 0.5])
    ww.merge(paths[0], paths[1:], tmp_path / "new.safetensors", **kw)
    ww.merge(*_old(vlm), tmp_path / "old.safetensors", **kw)
    new, old = load(tmp_path / "new.safetensors"), load(tmp_path / "old.safetensors")
    assert sorted(new) == sorted(_new_layout(n) for n in old)
    for n, t in old.items():
        assert torch.equal(new[_new_layout(n)], t), n


def _old(vlm):
    _, _, (bp, m1, m2) = vlm
    return bp, [m1, m2]


def test_thousands_of_unknown_modules_give_a_short_message(vlm, tmp_path):
    _, _, paths = vlm
    cfg = _modules_cfg(paths)
    cfg["modules"] |= {f"m{i}": {"models": [{"model": str(paths[1])}]} for i in range(5000)}
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RecipeError, match="4992 more modules Qwen2VLForConditionalGeneration does not have") as e:
        ww.run(p, tmp_path / "o.safetensors")
    assert len(str(e.value)) < 2000
