"""TIES's trim thresholds of one tensor sample at least 2^16 of its values (`pipeline/sample.rs`,
TENSOR_FLOOR): a smaller tensor is its own sample (exact, no window), a larger one takes the
windowed select. Both against the pure-torch reference, for TIES and DARE-TIES at scope=tensor,
bf16 and f32, whole and in chunks; the debug lines show which path each tensor took."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference as REF

from conftest import assert_close_ulp, load, write_models


def _state(dtype):
    g = torch.Generator().manual_seed(11)
    # 600,000 values (sampled in runs: windowed), 2^16 - 1 (sampled whole), a small one.
    shapes = {"big.weight": (600_000,), "edge.weight": (255, 257), "small.weight": (40, 30)}
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    models = [{n: (t.float() + 0.02 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in base.items()}
              for _ in range(3)]  # fmt: skip
    return base, models


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.7})])
@pytest.mark.parametrize("chunk", [None, 4096])
def test_tensor_samples_at_the_floor(tmp_path, monkeypatch, capfd, dtype, method, params, chunk):
    base, models = _state(dtype)
    assert 255 * 257 == (1 << 16) - 1
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.setenv("WEIGHTWEAVE_DEBUG", "1")
    out = tmp_path / "o.safetensors"
    capfd.readouterr()
    ww.merge(bp, mps, out, method=method, lam=0.7, seed=3, chunk_size=chunk, scope="tensor", **params)
    err = capfd.readouterr().err
    # One windowed select: the tensor past the floor (the others are their own samples).
    assert sum(line.startswith("select: windows") for line in err.splitlines()) == 1, err
    want = REF.merge(base, models, method, lam=0.7, seed=3, scope="tensor", **params)
    assert_close_ulp(load(out), want, atol=1e-6)


def test_tensor_samples_drawn_together_fit_their_tensors(tmp_path, monkeypatch, capfd):
    """The tensors' samples of one trim stage are drawn in shared passes, as many as 2^23 keys
    hold (`pipeline/kernel.rs`, trim_samples): 44 tensors of 70,000 values take 2^16 per task
    each (about 3 · 2^16 keys a tensor, 42 to a pass), so two passes. Each tensor's values are a scale
    of their own (10^-3 to 10^8, times 1.5^(i // 12)): a sample handed to the wrong tensor would
    place windows that miss, and the radix select would read that tensor twice more. One read
    for the statistics and one for the output, and the pure-torch reference's merge."""
    g = torch.Generator().manual_seed(5)
    n, size = 44, 70_000
    assert 42 * 3 * (1 << 16) <= 1 << 23 < 43 * 3 * (1 << 16)
    scale = [10.0 ** (i % 12 - 3) * 1.5 ** (i // 12) for i in range(n)]
    base = {f"t{i:02d}.weight": scale[i] * torch.randn(size, generator=g) for i in range(n)}
    models = [{n: t + 0.05 * t.abs().mean() * torch.randn(t.shape, generator=g) for n, t in base.items()}
              for _ in range(3)]  # fmt: skip
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.setenv("WEIGHTWEAVE_DEBUG", "1")
    out = tmp_path / "o.safetensors"
    capfd.readouterr()
    rep = ww.merge(bp, mps, out, method="ties", density=0.3, lam=0.7, scope="tensor")
    err = capfd.readouterr().err
    windows = [line for line in err.splitlines() if line.startswith("select: windows")]
    assert len(windows) == n, err
    inputs = 4 * n * size * 4
    assert rep.bytes_read == 2 * inputs, (rep.bytes_read, inputs)
    want = REF.merge(base, models, "ties", density=0.3, lam=0.7, scope="tensor")
    assert_close_ulp(load(out), want, atol=1e-6)
