"""PEFT LoRA adapters as fine-tunes: an adapter directory stands for θ_pre + scaling·B·A on the
modules it targets (τ = 0 elsewhere), computed chunk by chunk from the factors. Checked against
PEFT's own merge_and_unload(), and mixed with a full fine-tune under TIES against the reference."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference as R

from conftest import assert_close_ulp, load, rounding_slack, tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
peft = pytest.importorskip("peft", reason="PEFT checks the LoRA semantics (.ci/run installs it)")
# PEFT calls a transformers API that transformers 5 deprecates: their affair, not ours.
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"), pytest.mark.ecosystems]


llama = tiny_llama


def adapter(root, name, seed, **cfg):
    model = peft.get_peft_model(llama(), peft.LoraConfig(lora_dropout=0.0, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # PEFT starts B at zero: give both factors values
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / name)
    merged = model.merge_and_unload()
    return root / name, {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = llama()
    base.save_pretrained(root / "base")
    a1 = adapter(root, "a1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    a2 = adapter(root, "a2", 2, r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj", "down_proj"],
                 rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 16})  # fmt: skip
    full = llama()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    full.save_pretrained(root / "full")
    return root, a1, a2


def tol(sd, rel=2e-6):
    return {k: rel * float(v.abs().max()) for k, v in sd.items()}


@pytest.mark.parametrize("which", [0, 1])
def test_one_adapter_is_peft_merge_and_unload(family, tmp_path, which):
    root, *adapters = family
    ad, peft_merged = adapters[which]
    out = tmp_path / "o.safetensors"
    ww.merge(root / "base", [ad], out, method="task_arithmetic", lam=1.0)
    got = load(out)
    want = {k: v for k, v in peft_merged.items() if k in got}
    assert sorted(want) == sorted(got)
    assert_close_ulp(got, want, atol=tol(want))
    base = load(root / "base")
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    untouched = [k for k in got if not any(t in k for t in targets)]
    assert untouched and all(torch.equal(got[k], base[k]) for k in untouched)  # τ = 0 off the targets


@pytest.mark.parametrize("method", ["ties", "magmax", "dare"])
def test_adapters_and_a_full_fine_tune_mix(family, tmp_path, method):
    root, (a1, m1), (a2, m2) = family
    base = load(root / "base")
    full = load(root / "full")
    out = tmp_path / "o.safetensors"
    ww.weave(root / "base", [a1, root / "full", a2], out, method=method)
    models = [{k: m1[k] for k in base}, full, {k: m2[k] for k in base}]
    lambdas = ww.default_lambdas(method)
    want = R.weave(base, models, method, lambdas)
    slack = rounding_slack(base, models, method, lambdas)
    atol = {k: slack[k] + 4e-6 * float(base[k].abs().max()) for k in slack}
    assert_close_ulp(load(out), want, atol=atol)


def test_bad_adapters_are_refused(family, tmp_path):
    root, (a1, _), _ = family
    with pytest.raises(ww.ParamError, match="LoRA adapter; iso_c does not take adapters"):
        ww.merge(root / "base", [a1], tmp_path / "o.safetensors", method="iso_c", device="cpu")
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true}')
    (bad / "adapter_model.safetensors").write_bytes((a1 / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ww.HeaderError, match="DoRA adapters are not supported"):
        ww.merge(root / "base", [bad], tmp_path / "o.safetensors", method="ties")
    assert not (tmp_path / "o.safetensors").exists()


def test_adapters_loaded_in_mergekits_dtype(family, tmp_path):
    """Under a mergekit ``dtype`` an adapter's values θ_base + BA are rounded to it as they are
    loaded, like every stored input: linear of (adapter, full) in bf16 against mergekit's linear
    on PEFT's merged weights and the full model converted to bf16."""
    from weightweave import reference_mergekit as MK

    root, (a1, m1), _ = family
    base, full = load(root / "base"), load(root / "full")
    out = tmp_path / "o.safetensors"
    ww.merge(root / "base", [a1, root / "full"], out, method="linear", compat="mergekit", weights=[0.5, 0.5],
             out_dtype="bf16", _load_dtype="bf16")  # fmt: skip
    got = load(out)
    bf = lambda sd: {k: sd[k].to(torch.bfloat16) for k in base}  # noqa: E731
    want = MK.merge(bf(base), [bf(m1), bf(full)], "linear", [0.5, 0.5])
    unrounded = MK.merge(base, [{k: m1[k] for k in base}, full], "linear", [0.5, 0.5])
    equal = sum(int((got[k] == want[k]).sum()) for k in want)
    total = sum(want[k].numel() for k in want)
    # PEFT forms θ_base + BA in its own f32 order: a rare element lands an ulp apart.
    assert equal >= total - total // 1000
    assert all(torch.allclose(got[k].float(), want[k].float(), rtol=2**-7, atol=0) for k in want)
    assert any(not torch.equal(got[k], unrounded[k].to(torch.bfloat16)) for k in want)


def test_mergekit_lora_on_a_model_other_than_the_base(family, tmp_path):
    """``model+lora`` on a non-base model: mergekit merges the adapter into its model first
    (PEFT's merge_and_unload); so do we, out of core, into a temporary removed afterwards."""
    import yaml

    from weightweave import reference_mergekit as MK

    root, (a1, _), (a2, m2) = family
    full = transformers.AutoModelForCausalLM.from_pretrained(root / "full")
    peft_full = peft.PeftModel.from_pretrained(full, a1).merge_and_unload()
    full_a1 = {k: v.detach().clone() for k, v in peft_full.state_dict().items()}
    base = load(root / "base")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(root / "base"), "dtype": "float32",
           "models": [{"model": f"{root / 'full'}+{a1}", "parameters": {"weight": 0.7}},
                      {"model": f"{root / 'base'}+{a2}", "parameters": {"weight": 0.4}}]}  # fmt: skip
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    seen = []
    ww.run(tmp_path / "c.yml", out, progress=lambda done, total: seen.append((done, total)))
    # The LoRA's application reports its progress too: two merges run to their end.
    assert sum(1 for done, total in seen if done == total) >= 2
    got = load(out)
    want = MK.merge(base, [{k: full_a1[k] for k in base}, {k: m2[k] for k in base}], "task_arithmetic", [0.7, 0.4])
    assert_close_ulp(got, want, atol=tol(want, 4e-6))
    # The adapter changed its model: not the plain full model's merge.
    plain = MK.merge(base, [load(root / "full"), {k: m2[k] for k in base}], "task_arithmetic", [0.7, 0.4])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], plain[q])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml", "out"]  # no temporary left

    # Without a base the first model stands in for it: its LoRA applies there too.
    lin = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": f"{root / 'full'}+{a1}", "parameters": {"weight": 1.0}}]}  # fmt: skip
    (tmp_path / "l.yml").write_text(yaml.safe_dump(lin))
    ww.run(tmp_path / "l.yml", tmp_path / "lin.safetensors")
    assert_close_ulp(load(tmp_path / "lin.safetensors"), {k: full_a1[k] for k in base}, atol=tol(base, 4e-6))

    # A tokenizer built with such a LoRA is refused, saying so.
    cfg["tokenizer_source"] = "base"
    (tmp_path / "t.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ww.RecipeError, match="applies a LoRA to a model other than base_model, and a tokenizer"):
        ww.run(tmp_path / "t.yml", tmp_path / "t")


def test_mergekit_base_model_with_its_own_lora(family, tmp_path):
    """``base_model: model+lora`` (as published configs do): the base is the model with that
    LoRA applied; ``model+other_lora`` and the plain model are then fine-tunes of it, and the
    base's own reference listed as a model is the base (no task vector)."""
    import yaml

    from weightweave import reference_mergekit as MK

    root, (a1, _), (a2, _) = family

    def applied(adapter):
        m = transformers.AutoModelForCausalLM.from_pretrained(root / "full")
        merged = peft.PeftModel.from_pretrained(m, adapter).merge_and_unload()
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}

    full = load(root / "full")
    b0, m1 = applied(a1), applied(a2)
    b0, m1 = ({k: sd[k] for k in full} for sd in (b0, m1))
    cfg = {"merge_method": "task_arithmetic", "base_model": f"{root / 'full'}+{a1}", "dtype": "float32",
           "models": [{"model": f"{root / 'full'}+{a2}", "parameters": {"weight": 0.5}},
                      {"model": str(root / "full"), "parameters": {"weight": 0.3}},
                      {"model": f"{root / 'full'}+{a1}", "parameters": {"weight": 1.0}}]}  # fmt: skip
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    ww.run(tmp_path / "c.yml", tmp_path / "out")
    want = MK.merge(b0, [m1, full], "task_arithmetic", [0.5, 0.3])
    assert_close_ulp(load(tmp_path / "out"), want, atol=tol(want, 4e-6))


def test_mergekit_lora_on_another_model_in_stacked_slices(family, tmp_path):
    """A frankenmerge slice of ``model+lora`` (a model other than the base) stacks that model's
    layers with the LoRA applied."""
    import yaml

    root, (a1, _), _ = family
    full = transformers.AutoModelForCausalLM.from_pretrained(root / "full")
    applied = peft.PeftModel.from_pretrained(full, a1).merge_and_unload().state_dict()
    layers = full.config.num_hidden_layers
    cfg = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(root / "base"), "layer_range": [0, layers]}]},
        {"sources": [{"model": f"{root / 'full'}+{a1}", "layer_range": [0, 1]}]}]}  # fmt: skip
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    ww.run(tmp_path / "c.yml", tmp_path / "out")
    got, plain = load(tmp_path / "out"), load(root / "full")
    for name in ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight"):
        want = applied[f"model.layers.0.{name}"]
        assert torch.allclose(got[f"model.layers.{layers}.{name}"], want, rtol=0, atol=tol({"w": want}, 4e-6)["w"])
    q = f"model.layers.{layers}.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], plain["model.layers.0.self_attn.q_proj.weight"])  # the LoRA is there
