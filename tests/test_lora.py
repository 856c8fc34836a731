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
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


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
