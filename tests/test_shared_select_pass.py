"""Per-tensor selects share their windowed passes (``pipeline/select_many.rs``): each tensor's
sample places its own windows, one pass counts every tensor's chunks into them, and a tensor
whose window missed its rank is selected again alone. Two tensors in one run, one whose sample
is representative and one whose sample reads only the values it should not (its window misses):
both must come out as the reference computes them, the second through the fallback."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference_mergekit as MK
from weightweave import reference_mergekit_methods as R

from conftest import assert_close_ulp, load, write_models

ROWS, COLS = 256, 1024  # 2^18 elements per tensor: the sample (runs of 64 every 512) is not the data


def _sampled(shape: tuple[int, int]) -> torch.Tensor:
    """Where a tensor's sample reads: the first 64 of every 512 elements."""
    pos = torch.arange(shape[0] * shape[1]).reshape(shape)
    return pos % 512 < 64


def _models(kind: str) -> tuple[dict, list[dict]]:
    """A base and three fine-tunes of two tensors: "fair" (changed everywhere) and "fooled"
    (sce: unchanged exactly where its sample reads, so it sees only zero variances; TIES: its
    sample reads only tiny changes, so the median change it guesses is far below the true one)."""
    g = torch.Generator().manual_seed(11)
    base = {"fair": torch.randn(ROWS, COLS, generator=g), "fooled": torch.randn(ROWS, COLS, generator=g)}
    hidden = _sampled((ROWS, COLS))
    models = []
    for _ in range(3):
        m = {"fair": base["fair"] + torch.randn(ROWS, COLS, generator=g) * 0.01}
        d = torch.randn(ROWS, COLS, generator=g) * 0.01
        scale = torch.where(hidden, torch.tensor(0.0 if kind == "sce" else 1e-4), torch.tensor(1.0))
        m["fooled"] = base["fooled"] + d * scale
        models.append(m)
    return base, models


def _run(tmp_path, monkeypatch, capfd, base, models, **kw) -> tuple[dict, str]:
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.setenv("WEIGHTWEAVE_DEBUG", "1")
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, compat="mergekit", chunk_size=20000, **kw)
    return load(out), capfd.readouterr().err


# The fallback is decided on the merged counts, so it is the same for any thread count.
THREADS = pytest.mark.parametrize("threads", [1, 2, 3])


@THREADS
@pytest.mark.parametrize("topk", [0.5, 0.1])
def test_sce_cuts_share_a_pass_and_the_fooled_one_falls_back(tmp_path, monkeypatch, capfd, topk, threads):
    base, models = _models("sce")
    got, err = _run(tmp_path, monkeypatch, capfd, base, models, method="sce", select_topk=topk, threads=threads)
    assert "select (shared pass): 2 selects" in err, err[-2000:]
    assert err.count("zeros counted first") == 1, err[-2000:]
    want = R.merge(base, models, "sce", exact_reductions=True, select_topk=topk)
    for name in base:
        assert torch.equal(got[name], want[name]), (name, (got[name] - want[name]).abs().max())


@THREADS
@pytest.mark.parametrize("density", [0.5, 0.2])
def test_ties_cuts_share_a_pass_and_the_fooled_one_falls_back(tmp_path, monkeypatch, capfd, density, threads):
    base, models = _models("ties")
    weights = [1.0, 0.6, 0.3]
    got, err = _run(tmp_path, monkeypatch, capfd, base, models, method="ties", weights=weights, density=density,
                    threads=threads)  # fmt: skip
    assert "select (shared pass): 2 selects" in err, err[-2000:]
    assert err.count("no window held the rank; radix select") == 1, err[-2000:]
    want = MK.merge(base, models, "ties", weights, density=density)
    assert_close_ulp(got, want, atol=0.0)
    # The kept elements are the reference's (an element is kept where it moved from the base).
    for name in base:
        assert torch.equal(got[name] != base[name], want[name] != base[name]), name
