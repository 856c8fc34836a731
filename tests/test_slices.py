"""mergekit's ``slices``: layers stacked, repeated or moved (passthrough frankenmerges) and merged
from layer ranges, against the layers picked by hand (mergekit's planner: output layer k of slice
s is layer start + i of each source; embeddings from the first slice's inputs, the final norm and
head from the last's), a reference that resolves each tensor's parameters with mergekit's rules
(scopes: the source's, the slice's, the config's; t = i / (slice length − 1)), and transformers
loading the stacked model. benches/mergekit_compare.py runs the real mergekit on such configs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import weightweave as ww
from weightweave import reference_mergekit as MK
from weightweave import reference_mergekit_methods as R

from conftest import assert_close_ulp, load

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Two 4-layer tiny Llamas (the second a fine-tune of the first) saved as transformers does."""
    import transformers

    root = tmp_path_factory.mktemp("llamas")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(cfg)
    a.save_pretrained(root / "a")
    b = transformers.LlamaForCausalLM(cfg)
    b.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in a.state_dict().items()})
    b.save_pretrained(root / "b")
    return root, load(root / "a" / "model.safetensors"), load(root / "b" / "model.safetensors")


def _src(root, model, a, b, **params):
    return {"model": str(root / model), "layer_range": [a, b], **({"parameters": params} if params else {})}


def _run(root, cfg, out="out"):
    path = root / f"{out}.yml"
    path.write_text(yaml.safe_dump(cfg))
    ww.run(path, root / out, overwrite=True)
    return load(root / out / "model.safetensors")


def _layer(sd, k):
    p = f"model.layers.{k}."
    return {n[len(p):]: t for n, t in sd.items() if n.startswith(p)}


def test_a_passthrough_frankenmerge_stacks_the_layers_it_names(llamas):
    import transformers

    root, a, b = llamas
    cfg = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(root / "a"), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(root / "b"), "layer_range": [1, 4]}]}]}  # fmt: skip
    got = _run(root, cfg)
    picked = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    for k, (sd, src) in enumerate(picked):
        want = _layer(sd, src)
        assert _layer(got, k).keys() == want.keys()
        assert all(torch.equal(_layer(got, k)[n], want[n]) for n in want), k
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    assert json.loads((root / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    # transformers loads the 6-layer model, and runs it as the model assembled by hand.
    m = transformers.AutoModelForCausalLM.from_pretrained(root / "out")
    hand = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(root / "out"))
    sd = {"model.embed_tokens.weight": a["model.embed_tokens.weight"], "model.norm.weight": b["model.norm.weight"],
          "lm_head.weight": b["lm_head.weight"]}  # fmt: skip
    for k, (src_sd, src) in enumerate(picked):
        sd |= {f"model.layers.{k}.{n}": t for n, t in _layer(src_sd, src).items()}
    hand.load_state_dict(sd)
    x = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(m(x).logits, hand(x).logits)


def test_a_passthrough_scale_by_filter_in_one_slice(llamas):
    """The published self-merge: a repeated range with o_proj and down_proj zeroed in the copy."""
    root, a, _ = llamas
    zero = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]
    cfg = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(root / "a"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(root / "a"), "layer_range": [1, 3], "parameters": {"scale": zero}}]},
        {"sources": [{"model": str(root / "a"), "layer_range": [3, 4]}]}]}  # fmt: skip
    got = _run(root, cfg)
    for k, src in enumerate([0, 1, 1, 2, 3]):
        for n, t in _layer(a, src).items():
            scaled = k in (2, 3) and ("o_proj" in n or "down_proj" in n)
            assert torch.equal(_layer(got, k)[n], t * 0.0 if scaled else t), (k, n)
    assert json.loads((root / "out" / "config.json").read_text())["num_hidden_layers"] == 5


def _reference(a, b, slices, shared, lane_scopes, merge_one, top_per_model=()):
    """Each output tensor from its sources' layer, with the parameters mergekit resolves for it."""
    out = {}
    layer = 0
    for k, (start_a, start_b, length, slice_params) in enumerate(slices):
        for i in range(length):
            t = i / (length - 1) if length > 1 else 1.0
            for n in _layer(a, start_a + i):
                name = f"model.layers.{layer}.{n}"
                p = {key: MK.resolve(name, key, [slice_params, shared], t) for key in {*shared, *slice_params}
                     if key not in top_per_model}  # fmt: skip
                for key in top_per_model:
                    p[key] = [MK.resolve(name, key, [lane_scopes[k], slice_params, shared], t, 1.0)]
                src = (_layer(a, start_a + i)[n], _layer(b, start_b + i)[n])
                out[name] = merge_one({name: src[0]}, [{name: src[1]}], p)[name]
            layer += 1
    return out


def test_slerp_slices_resolve_t_within_each_slice(llamas):
    root, a, b = llamas
    top = {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}
    second = {"t": [{"filter": "mlp", "value": [0.1, 0.9]}]}
    cfg = {"merge_method": "slerp", "base_model": str(root / "a"), "dtype": "float32", "parameters": top, "slices": [
        {"sources": [_src(root, "a", 0, 2), _src(root, "b", 0, 2)]},
        {"sources": [_src(root, "a", 1, 4), _src(root, "b", 1, 4)], "parameters": second}]}  # fmt: skip
    got = _run(root, cfg)
    want = _reference(a, b, [(0, 0, 2, {}), (1, 1, 3, second)], top, [{}, {}],
                      lambda x, ms, p: R.merge(x, ms, "slerp", exact_reductions=True, **p))  # fmt: skip
    for n, w in want.items():
        assert torch.equal(got[n], w), n
    # Outside the layers, t = 0 and the config's catch-all: 0.3.
    e = "model.embed_tokens.weight"
    assert torch.equal(got[e], R.merge({e: a[e]}, [{e: b[e]}], "slerp", exact_reductions=True, t=0.3)[e])
    assert json.loads((root / "out" / "config.json").read_text())["num_hidden_layers"] == 5


def test_ties_slices_take_each_sources_parameters_in_its_slice(llamas):
    root, a, b = llamas
    src = [{"weight": [1, 0.2], "density": 0.5}, {"weight": 0.7, "density": [0.3, 0.9]}]
    cfg = {"merge_method": "ties", "base_model": str(root / "a"), "dtype": "float32", "parameters": {"normalize": True},
           "slices": [{"sources": [_src(root, "a", 0, 4), _src(root, "b", 0, 4, **src[0])]},
                      {"sources": [_src(root, "a", 2, 4), _src(root, "b", 2, 4, **src[1])]}]}  # fmt: skip

    def ties(x, ms, p):
        p = dict(p)
        return MK.merge(x, ms, "ties", p.pop("weight"), **p)

    got = _run(root, cfg)
    want = _reference(a, b, [(0, 0, 4, {}), (2, 2, 2, {})], {"normalize": True}, src, ties, ("weight", "density"))
    assert_close_ulp({n: got[n] for n in want}, want, ulps=1)


@pytest.mark.parametrize(("slices", "match"), [
    ([{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
     "'slices' whose sources have unequal lengths"),
    ([{"sources": [{"model": "a", "layer_range": [2, 5]}, {"model": "b", "layer_range": [2, 5]}]}],
     "has no layer 4|no tensor 'model.layers.4"),
])  # fmt: skip
def test_bad_slices_are_refused_before_work(llamas, slices, match):
    root, _, _ = llamas
    for s in slices:
        for x in s["sources"]:
            x["model"] = str(root / x["model"])
    cfg = {"merge_method": "slerp", "base_model": str(root / "a"), "parameters": {"t": 0.5}, "slices": slices}
    with pytest.raises(ww.ParamError, match=match):
        _run(root, cfg, "bad")
    assert not (root / "bad").exists()


def test_per_layer_config_lists_follow_the_layers(llamas, tmp_path):
    """A config's ``layer_types`` (sliding or full attention per layer) is re-listed for the layers
    taken, and the layer count is set."""
    import shutil

    root, _, _ = llamas
    shutil.copytree(root / "a", tmp_path / "a")
    c = json.loads((tmp_path / "a" / "config.json").read_text())
    c["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(c))
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [_src(tmp_path, "a", 1, 4)]},
                                                     {"sources": [_src(tmp_path, "a", 1, 2)]}]}  # fmt: skip
    _run(tmp_path, cfg)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == 4
    assert out["layer_types"] == ["full_attention", "sliding_attention", "full_attention", "full_attention"]


def test_slices_are_bounded_in_layers(llamas):
    root, _, _ = llamas
    with pytest.raises(ww.ParamError, match="more than 65536 output layers"):
        ww.merge(root / "a", [root / "b"], root / "big", method="slerp", compat="mergekit", t=0.5,
                 slices=[{"len": 40000, "lanes": [[0, 0], [1, 0]]}] * 2)  # fmt: skip
    assert not (root / "big").exists()


def test_keys_mergekit_does_not_have_in_a_slice_are_ignored_aloud(llamas):
    """A source's ``revision`` (published in a DPOpenHermes-11B config) is not a key of mergekit's
    schema, which ignores it: the same layers are taken, with a RecipeWarning naming the key."""
    root, _, _ = llamas
    plain = {"merge_method": "passthrough", "slices": [{"sources": [_src(root, "a", 0, 3)]},
                                                       {"sources": [_src(root, "b", 1, 4)]}]}  # fmt: skip
    want = _run(root, plain, "plain_rev")
    extra = {"merge_method": "passthrough", "slices": [{"sources": [{**_src(root, "a", 0, 3), "revision": "v1"}]},
                                                       {"sources": [_src(root, "b", 1, 4)], "note": 1}]}  # fmt: skip
    with pytest.warns(ww.RecipeWarning, match=r"'slices\[0\].sources\[0\].revision', 'slices\[1\].note' ignored"):
        got = _run(root, extra, "extra_rev")
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def _outside(sd):
    return {n: t for n, t in sd.items() if not n.startswith("model.layers.")}


def test_slices_may_merge_different_numbers_of_models(llamas):
    """mergekit merges each slice's own sources: a TIES slice of the base and a fine-tune, then a
    slice of the base alone (its layers as they are), the weights outside the layers from the
    first slice's sources (embeddings) and the last's (norm, head)."""
    root, a, b = llamas
    cfg = {"merge_method": "ties", "base_model": str(root / "a"), "dtype": "float32",
           "parameters": {"normalize": True, "density": 0.6}, "slices": [
               {"sources": [_src(root, "a", 0, 2), _src(root, "b", 1, 3, weight=0.7)]},
               {"sources": [_src(root, "a", 2, 4)]}]}  # fmt: skip
    got = _run(root, cfg)
    for k, (src_a, src_b) in enumerate([(0, 1), (1, 2)]):
        for n, t in _layer(a, src_a).items():
            want = MK.merge({n: t}, [{n: _layer(b, src_b)[n]}], "ties", [0.7], density=0.6, normalize=True)[n]
            assert torch.equal(_layer(got, k)[n], want), (k, n)
    for k, src in ((2, 2), (3, 3)):
        assert all(torch.equal(_layer(got, k)[n], t) for n, t in _layer(a, src).items()), k
    e = "model.embed_tokens.weight"
    assert torch.equal(got[e], MK.merge({e: a[e]}, [{e: b[e]}], "ties", [0.7], density=0.6, normalize=True)[e])
    assert torch.equal(got["model.norm.weight"], a["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])


def test_linear_slices_without_a_base_may_merge_different_numbers_of_models(llamas):
    root, a, b = llamas
    cfg = {"merge_method": "linear", "dtype": "float32", "slices": [
        {"sources": [_src(root, "a", 0, 3, weight=0.3), _src(root, "b", 0, 3, weight=0.9)]},
        {"sources": [_src(root, "b", 3, 4, weight=0.7)]}]}  # fmt: skip
    got = _run(root, cfg)
    for k in range(3):
        want = MK.linear([_layer(a, k), _layer(b, k)], [0.3, 0.9], True, _layer(a, k))
        assert all(torch.equal(_layer(got, k)[n], want[n]) for n in want), k
    want = MK.linear([_layer(b, 3)], [0.7], True, _layer(b, 3))
    assert all(torch.equal(_layer(got, 3)[n], want[n]) for n in want)
    # Embeddings from the first slice's two models, norm and head from the last's one.
    want = MK.linear([_outside(a), _outside(b)], [0.3, 0.9], True, _outside(a))
    assert torch.equal(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"])
    want = MK.linear([_outside(b)], [0.7], True, _outside(b))
    assert torch.equal(got["lm_head.weight"], want["lm_head.weight"])
    assert torch.equal(got["model.norm.weight"], want["model.norm.weight"])


def test_slerp_slices_that_merge_one_model_are_refused(llamas):
    root, _, _ = llamas
    cfg = {"merge_method": "slerp", "base_model": str(root / "a"), "parameters": {"t": 0.5}, "slices": [
        {"sources": [_src(root, "a", 0, 2), _src(root, "b", 0, 2)]}, {"sources": [_src(root, "a", 2, 4)]}]}  # fmt: skip
    with pytest.raises(ww.RecipeError, match="merge different numbers of sources with slerp"):
        _run(root, cfg, "bad2")
    assert not (root / "bad2").exists()


def test_a_last_slice_with_more_sources_than_the_first_is_refused(llamas):
    """mergekit plans the norm and head from the last slice's models zipped to the first slice's
    count, so it drops models there; that is not emulated, and said so."""
    root, _, _ = llamas
    cfg = {"merge_method": "task_arithmetic", "base_model": str(root / "a"), "slices": [
        {"sources": [_src(root, "a", 0, 2)]}, {"sources": [_src(root, "a", 2, 4), _src(root, "b", 2, 4)]}]}  # fmt: skip
    with pytest.raises(ww.RecipeError, match="unless the last slice has more sources than the first"):
        _run(root, cfg, "bad3")
    assert not (root / "bad3").exists()
