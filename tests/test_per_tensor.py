"""Per-tensor parameters (mergekit's layer gradients and filter conditions), against a reference
that resolves every tensor's parameters with mergekit's rules (``reference_mergekit``:
``evaluate_setting``, scope precedence, t = layer / (layers − 1)) and merges each tensor alone with
the references of the methods; against hand-worked values; and through mergekit YAML configs as
published. The real mergekit runs them in benches/mergekit_compare.py (rows ``*_gradient``)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

import weightweave as ww
from weightweave import reference as REF
from weightweave import reference_mergekit as MK
from weightweave import reference_mergekit_methods as R

from conftest import assert_close_ulp, digest, load, write_models

LAYERS = 4


def _state(seed: int, tasks: int = 3) -> tuple[dict, list[dict]]:
    """A Llama-named f32 model of 4 layers and fine-tunes of it."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,), "lm_head.weight": (16, 8)}
    for i in range(LAYERS):
        shapes |= {f"model.layers.{i}.self_attn.q_proj.weight": (8, 8), f"model.layers.{i}.mlp.up_proj.weight": (12, 8),
                   f"model.layers.{i}.input_layernorm.weight": (8,)}  # fmt: skip
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(tasks)]
    base["position_ids"] = torch.arange(5)
    for m in models:
        m["position_ids"] = torch.arange(5)
    return base, models


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    base, models = _state(3)
    bp, mps = write_models(tmp_path_factory.mktemp("in"), base, models)
    return base, models, bp, mps


def _one(d: dict, n: str) -> dict:
    return {n: d[n]}


def _per_tensor_reference(base, models, shared, scopes, merge_one, per_model_keys=(), defaults=None):
    """Each tensor merged alone with the parameters mergekit resolves for it: a shared parameter
    from the config's scope, a per-model one from the model's scope, then the config's."""
    defaults = defaults or {}
    out = {}
    for n, b in base.items():
        if not b.is_floating_point():
            out[n] = b.clone()
            continue
        t = MK.layer_t(n, LAYERS)
        p = {k: MK.resolve(n, k, [shared], t) for k in shared if k not in per_model_keys}
        for k in per_model_keys:
            if k in shared or any(k in sc for sc in scopes):
                p[k] = [MK.resolve(n, k, [sc, shared], t, defaults.get(k)) for sc in scopes]
        out[n] = merge_one(_one(base, n), [_one(m, n) for m in models], p)[n]
    return out


def _config(tmp_path, method, base, models, shared, scopes=None, list_base=False):
    entries = [{"model": str(base)}] if list_base else []
    for i, m in enumerate(models):
        ps = scopes[i] if scopes else {}
        entries.append({"model": str(m), **({"parameters": ps} if ps else {})})
    cfg = {"merge_method": method, "base_model": str(base), "models": entries, "dtype": "float32"}
    if shared:
        cfg["parameters"] = shared
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]  # fmt: skip
GTA_CASES = [
    # (method, shared, per-model scopes): gradients and filters at both levels.
    ("ties", {"normalize": True, "density": [{"filter": "mlp", "value": 0.4}, {"value": [0.9, 0.2]}]},
     [{"weight": [1.0, 0.5], "density": [0.2, 0.9]}, {"weight": 0.6}, {"weight": 0.3, "density": 0.7}]),
    ("task_arithmetic", {"lambda": [{"filter": "self_attn", "value": [0.5, 1.5]}, {"value": 1.0}]},
     [{"weight": 1.0}, {"weight": [0.2, 0.8]}, {"weight": [{"filter": "norm", "value": 0.0}, {"value": 0.4}]}]),
    ("dare_linear", {"density": [0.3, 0.9]}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.5, "density": 0.5}]),
    ("breadcrumbs", {"gamma": [0.0, 0.1]}, [{"weight": 1.0, "density": 0.6}, {"weight": 0.5, "density": [0.5, 1]},
                                             {"weight": 0.5, "density": 0.8}]),
]  # fmt: skip


def _gta_one(method):
    def merge_one(b, ms, p):
        p = dict(p)
        lam = p.pop("lambda", 1.0)
        w = p.pop("weight")
        return MK.merge(b, ms, method, w, lam=lam, seed=0, **p)

    return merge_one


def _slack(base, models, ulps=8):
    return {n: ulps * max(x[n].abs().max().item() for x in [base, *models]) * 2.0**-23
            for n, b in base.items() if b.is_floating_point()}  # fmt: skip


@pytest.mark.parametrize(("method", "shared", "scopes"), GTA_CASES, ids=[c[0] for c in GTA_CASES])
def test_gradient_configs_match_the_per_tensor_reference(ck, tmp_path, method, shared, scopes):
    base, models, bp, mps = ck
    ww.run(_config(tmp_path, method, bp, mps, shared, scopes), tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    want = _per_tensor_reference(base, models, shared, scopes, _gta_one(method), ("weight", "density", "gamma"),
                                 {"density": 1.0, "gamma": 0.01})  # fmt: skip
    assert_close_ulp(got, want, atol=_slack(base, models))


def test_slerp_with_filters_and_gradients_is_each_tensors_slerp(ck, tmp_path):
    """The config most published merges use: t by filter, a gradient over the layers each."""
    base, models, bp, mps = ck
    cfg = _config(tmp_path, "slerp", bp, mps[:1], {"t": SLERP_T}, list_base=True)
    ww.run(cfg, tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    want = _per_tensor_reference(base, models[:1], {"t": SLERP_T}, [{}],
                                 lambda b, ms, p: R.merge(b, ms, "slerp", exact_reductions=True, **p))  # fmt: skip
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_hand_worked_t_values(ck, tmp_path):
    """Four layers: t = 0, 1/3, 2/3, 1. self_attn's [0, 0.5, 0.3, 0.7, 1] at t = 1/3 is
    scaled 4/3 → 0.5 + (1/3)(0.3 − 0.5) = 0.4333…; mlp's [1, …] at 2/3 → 0.7 + (2/3)(0.3 − 0.7);
    the embeddings, final norm and head take the catch-all 0.5 (t = 0 would give 0 and 1)."""
    base, models, bp, mps = ck
    cfg = _config(tmp_path, "slerp", bp, mps[:1], {"t": SLERP_T}, list_base=True)
    ww.run(cfg, tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    expect = {"model.layers.0.self_attn.q_proj.weight": 0.0, "model.layers.1.self_attn.q_proj.weight": 0.5 - 0.2 / 3,
              "model.layers.2.mlp.up_proj.weight": 0.7 - 0.4 * 2 / 3, "model.layers.3.mlp.up_proj.weight": 0.0,
              "model.layers.3.self_attn.q_proj.weight": 1.0, "lm_head.weight": 0.5, "model.norm.weight": 0.5,
              "model.layers.2.input_layernorm.weight": 0.5}  # fmt: skip
    for n, t in expect.items():
        want = R.merge(_one(base, n), [_one(models[0], n)], "slerp", exact_reductions=True, t=t)[n]
        assert torch.equal(got[n], want), (n, t)
    # t = 0 and t = 1 are the base and the model themselves.
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(got[q.format(0)], base[q.format(0)])
    assert torch.equal(got[q.format(3)], models[0][q.format(3)])


def test_api_settings_and_statistics_per_group(ck, tmp_path):
    """In the API a setting is a condition mapping (a gradient: {"value": [...]}); a global
    method's statistics (TIES's threshold) are gathered over the tensors sharing the values: the
    reference merges each group of tensors as a model of its own."""
    base, models, bp, mps = ck
    density = [{"filter": "mlp", "value": 0.1}, {"value": 0.4}]
    ww.merge(bp, mps, tmp_path / "o.safetensors", method="ties", density=density, lam=0.8)
    got = load(tmp_path / "o.safetensors")
    groups = {"mlp": 0.1, "": 0.4}
    for key, d in groups.items():
        names = [n for n in base if base[n].is_floating_point() and (key in n if key else "mlp" not in n)]
        want = REF.merge({n: base[n] for n in names}, [{n: m[n] for n in names} for m in models], "ties", lam=0.8,
                         density=d)  # fmt: skip
        assert_close_ulp({n: got[n] for n in names}, want, ulps=1)


def test_weave_pools_each_groups_merges(ck, tmp_path):
    base, models, bp, mps = ck
    density = {"value": [0.2, 0.6]}  # a gradient: layer 0 → 0.2, layer 3 → 0.6, outside the layers 0.2
    ww.weave(bp, mps, tmp_path / "o.safetensors", method="dare", lambdas=[0.5, 1.0], density=density, seed=3)
    got = load(tmp_path / "o.safetensors")
    for n in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        d = 0.2 + (0.6 - 0.2) * MK.layer_t(n, LAYERS)
        ww.weave(bp, mps, tmp_path / "p.safetensors", method="dare", lambdas=[0.5, 1.0], density=d, seed=3,
                 overwrite=True)  # fmt: skip
        assert torch.equal(got[n], load(tmp_path / "p.safetensors")[n]), n


def test_same_bits_for_any_threads_and_chunks(ck, tmp_path):
    _, _, bp, mps = ck
    digests = set()
    for threads, chunk in ((1, None), (3, 7), (2, 64)):
        out = tmp_path / f"o{threads}.safetensors"
        ww.merge(bp, mps, out, method="ties", compat="mergekit", weights=[{"value": [1, 0.5]}, 0.6, 0.3],
                 density=[{"value": [0.3, 0.9]}, 0.5, 0.7], threads=threads, chunk_size=chunk)  # fmt: skip
        digests.add(digest(out))
    assert len(digests) == 1


def test_progress_counts_over_the_whole_run(ck, tmp_path):
    _, _, bp, mps = ck
    seen = []
    ww.merge(bp, mps, tmp_path / "o.safetensors", method="ties", density={"value": [0.2, 0.9]},
             progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    assert seen and len({t for _, t in seen}) == 1
    assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:], strict=False))
    assert seen[-1][0] == seen[-1][1]


def test_recorded_in_the_metadata(ck, tmp_path):
    _, _, bp, mps = ck
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method="ties", density=[{"filter": "mlp", "value": [0.1, 0.3]}, {"value": 0.4}])
    with safe_open(str(out), "pt") as f:
        r = json.loads(f.metadata()["weightweave.recipe"])
    assert r["per_tensor"]["density"] == [{"filter": "mlp", "value": [0.1, 0.3]}, {"filter": None, "value": 0.4}]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "slerp", "compat": "mergekit", "t": [{"filter": "mlp", "value": 0.3}], "k": 1},
     "tensor 'lm_head.weight'"),
    ({"method": "ties", "lam": [{"value": [0.5, 1]}], "metagpt_weights": True}, "MetaGPT"),
    ({"method": "ties", "density": [{"value": []}]}, "empty gradient"),
    ({"method": "ties", "density": [{"value": 0.3, "when": "mlp"}]}, "'when' is not part of a condition"),
    ({"method": "ties", "density": [{"filter": 3, "value": 0.3}]}, "filter must be a string"),
    ({"method": "ties", "lines": True, "density": {"value": [0.2, 0.4]}}, "LiNeS"),
    ({"method": "tsv", "lam": {"value": [0.5, 1.0]}}, "torch backend"),
])  # fmt: skip
def test_refused_before_any_work(ck, tmp_path, kwargs, match):
    _, _, bp, mps = ck
    kwargs = dict(kwargs)
    if kwargs.pop("metagpt_weights", False):
        kwargs["weights"] = "metagpt"
    mps = mps[: kwargs.pop("k", len(mps))]
    out = tmp_path / "o.safetensors"
    with pytest.raises(ww.WeaveError, match=match):
        ww.merge(bp, mps, out, **kwargs)
    assert not out.exists()


def test_weave_refuses_a_per_tensor_lambda_and_a_searched_setting(ck, tmp_path):
    _, _, bp, mps = ck
    with pytest.raises(ww.ParamError, match="searches over λ"):
        ww.weave(bp, mps, tmp_path / "o.safetensors", method="ties", lam={"value": [0.5, 1]})
    with pytest.raises(ww.ParamError, match="searched over and set per tensor"):
        ww.weave(bp, mps, tmp_path / "o.safetensors", method="ties", density={"value": [0.2, 0.4]},
                 search={"lam": [0.5, 1.0], "density": [0.2, 0.3]})  # fmt: skip


def test_a_mergekit_config_with_a_gradient_and_a_missing_required_value(ck, tmp_path):
    """slerp's t required: a filter list without a catch-all leaves the head without one."""
    _, _, bp, mps = ck
    cfg = _config(tmp_path, "slerp", bp, mps[:1], {"t": [{"filter": "layers", "value": [0, 1]}]},
                  list_base=True)
    with pytest.raises(ww.ParamError, match=r"tensor 'lm_head.weight'.*"):
        ww.run(cfg, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_conditions_reach_the_core_unchanged():
    from weightweave.settings import conditions, split

    assert conditions("t", [0, 0.5]) == [{"filter": None, "value": [0, 0.5]}]
    assert conditions("t", {"filter": "mlp", "value": 1}) == [{"filter": "mlp", "value": 1}]
    params = {"density": [[0.2, 0.4], 0.5], "gamma": 0.1}
    w, lam, pt = split(params, [1.0, {"value": [0, 1]}], 0.5)
    assert params == {"gamma": 0.1} and w is None and lam == 0.5
    assert pt == {"shared": {}, "per_model": {
        "density": [[{"filter": None, "value": [0.2, 0.4]}], [{"filter": None, "value": 0.5}]],
        "weights": [[{"filter": None, "value": 1.0}], [{"filter": None, "value": [0, 1]}]]}}  # fmt: skip
    with pytest.raises(ww.ParamError):
        split({}, {"value": 1}, None)


def test_one_slice_of_whole_models_is_the_models_form(ck, tmp_path):
    """mergekit's most published form: one slice whose sources take layers [0, N) of each model.
    Scopes: a source's parameters, then the slice's, then the config's."""
    base, models, bp, mps = ck
    cfg = {"merge_method": "ties", "base_model": str(bp), "dtype": "float32",
           "slices": [{"sources": [{"model": str(bp), "layer_range": [0, LAYERS]}]
                       + [{"model": str(m), "layer_range": [0, LAYERS], "parameters": {"weight": w}}
                          for m, w in zip(mps, (1.0, [0.2, 0.8], 0.5), strict=True)],
                       "parameters": {"density": [{"filter": "mlp", "value": [0.3, 0.9]}]}}],
           "parameters": {"density": 0.6, "normalize": True}}  # fmt: skip
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    ww.run(path, tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    slice_then_top = [{"filter": "mlp", "value": [0.3, 0.9]}, {"value": 0.6}]
    scopes = [{"weight": 1.0}, {"weight": [0.2, 0.8]}, {"weight": 0.5}]
    want = _per_tensor_reference(base, models, {"density": slice_then_top, "normalize": True}, scopes,
                                 _gta_one("ties"), ("weight", "density"), {"density": 1.0})  # fmt: skip
    assert_close_ulp(got, want, atol=_slack(base, models))


@pytest.mark.parametrize("edit", ["range", "stack"])
def test_slices_that_move_layers_are_refused_with_why(ck, tmp_path, edit):
    _, _, bp, mps = ck
    srcs = [{"model": str(bp), "layer_range": [0, LAYERS]}, {"model": str(mps[0]), "layer_range": [0, LAYERS]}]
    slices = [{"sources": srcs}]
    if edit == "range":
        srcs[1]["layer_range"] = [0, 3]  # unequal lengths in one slice
    else:
        slices = [{"sources": srcs}, {"sources": [srcs[1]]}]  # the second slice has no base source
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(bp), "slices": slices,
                                    "parameters": {"t": 0.5}}))  # fmt: skip
    with pytest.raises(ww.RecipeError, match="'slices' whose sources have unequal lengths, that have no source of"):
        ww.run(path, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_groups_times_points_are_bounded_before_work(ck, tmp_path):
    """Every group holds the search's points: a large grid split into many groups is refused
    (its recipes alone would take gigabytes), naming both counts."""
    _, _, bp, mps = ck
    lambdas = [i / 2**18 for i in range(1, 2**18 + 100)]  # 4 groups (t = 0, 1/3, 2/3, 1) × 262243 > 2^20
    with pytest.raises(ww.ParamError, match="groups of tensors × 262243 search points"):
        ww.weave(bp, mps, tmp_path / "o.safetensors", method="dare", lambdas=lambdas,
                 density={"value": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]})  # fmt: skip
    assert not (tmp_path / "o.safetensors").exists()


def test_hostile_settings_are_param_errors(ck, tmp_path):
    """A value nested thousands deep, or a filter that reads like code, is data: a ParamError
    (its message bounded) or a substring that matches no tensor, never a crash or a call."""
    _, _, bp, mps = ck
    deep: object = {"value": 0.5}
    for _ in range(5000):
        deep = {"value": deep}
    with pytest.raises(ww.ParamError, match="expected a number, bool or string") as e:
        ww.merge(bp, mps, tmp_path / "o.safetensors", method="ties", density=deep)
    assert len(str(e.value)) < 300
    ww.merge(bp, mps, tmp_path / "o.safetensors", method="ties",
             density=[{"filter": "__import__('os').system('false')", "value": 0.3}, {"value": 0.5}])  # fmt: skip
    want = tmp_path / "p.safetensors"
    ww.merge(bp, mps, want, method="ties", density=0.5)
    assert load(tmp_path / "o.safetensors").keys() == load(want).keys()
    assert all(torch.equal(load(tmp_path / "o.safetensors")[n], load(want)[n]) for n in load(want))
