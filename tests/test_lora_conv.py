"""PEFT LoRA adapters on convolutions (LoCon: Conv2d with 3×3 and 1×1 kernels, Conv1d): ΔW from
A [r, in, k…] and B [out, r, 1…] as PEFT's merge_and_unload() computes it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import weightweave as ww

from conftest import assert_close_ulp, load

# Needs an ecosystem's package, which .ci/run installs (`pytest -m 'not ecosystems'` leaves these out).
pytestmark = pytest.mark.ecosystems

peft = pytest.importorskip("peft", reason="PEFT checks the LoRA semantics (.ci/run installs it)")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.proj = torch.nn.Conv2d(8, 8, 1)
        self.seq = torch.nn.Conv1d(8, 6, 5)
        self.fc = torch.nn.Linear(6, 5)


def test_conv_adapters_are_peft_merge_and_unload(tmp_path):
    torch.manual_seed(0)
    net = Net()
    (tmp_path / "base").mkdir()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    save_file(base, tmp_path / "base" / "model.safetensors")
    cfg = peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0, target_modules=["conv_in", "proj", "seq", "fc"])
    model = peft.get_peft_model(net, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # PEFT starts B at zero: give both factors values
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "locon")
    want = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    ww.merge(tmp_path / "base", [tmp_path / "locon"], tmp_path / "o.safetensors", method="task_arithmetic", lam=1.0)
    got = load(tmp_path / "o.safetensors")
    assert sorted(got) == sorted(want)
    assert_close_ulp(got, want, atol={k: 4e-6 * float(v.abs().max()) for k, v in want.items()})
    for k in ("conv_in.weight", "proj.weight", "seq.weight", "fc.weight"):  # every target moved
        assert not torch.allclose(got[k], base[k])
    for k in ("conv_in.bias", "fc.bias"):  # τ = 0 off the targets
        assert torch.equal(got[k], base[k])
