"""sce's cut is the ⌊nonzero · select_topk⌋-th largest variance: one windowed pass counts the
zeros and finds the cut together (``pipeline/top_nonzero.rs``), its window placed by the
sample's estimate of the zeros. Checked against ``reference_mergekit_methods`` (torch's sort)
where the sample sees the zeros, where they hide from it (the window misses and the zeros are
counted in a pass of their own), and through the radix select."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference_mergekit_methods as R

from conftest import load, write_models

ROWS, COLS = 256, 1024  # 2^18 elements: the sample (2^15, runs of 64 every 512) is not the data


def _models(layout: str) -> tuple[dict, list[dict]]:
    """A base and three fine-tunes equal to it (zero variance) on 7/8 of the elements ("seen"),
    or on the 1/8 the sample reads ("hidden")."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(ROWS, COLS, generator=g)
    pos = torch.arange(ROWS * COLS).reshape(ROWS, COLS)
    if layout == "seen":
        # Whole rows unchanged, which the sample's evenly spaced runs cross in proportion.
        changed = pos // COLS % 8 == 0
    else:
        # Unchanged exactly where the sample looks (its runs are the first 64 of every 512) and
        # changed everywhere else: it sees only zeros, and its window misses the cut.
        changed = pos % 512 >= 64
    models = []
    for _ in range(3):
        d = torch.randn(ROWS, COLS, generator=g) * 0.01
        models.append({"w": base + d * changed})
    return {"w": base}, models


@pytest.mark.parametrize(("layout", "radix", "fallback"),
                         [("seen", False, False), ("hidden", False, True), ("seen", True, True)])  # fmt: skip
@pytest.mark.parametrize("topk", [0.5, 0.1])
def test_the_cut_among_the_nonzero_variances(tmp_path, monkeypatch, capfd, layout, radix, fallback, topk):
    base, models = _models(layout)
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.setenv("WEIGHTWEAVE_DEBUG", "1")
    if radix:
        monkeypatch.setenv("WEIGHTWEAVE_FORCE_RADIX", "1")
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method="sce", compat="mergekit", select_topk=topk, chunk_size=20000)
    err = capfd.readouterr().err
    assert ("zeros counted first" in err) == fallback, err[-2000:]
    want = R.merge(base, models, "sce", exact_reductions=True, select_topk=topk)
    got = load(out)
    assert torch.equal(got["w"], want["w"]), (got["w"] - want["w"]).abs().max()
    # The selection kept ⌊nonzero · topk⌋ elements, all of them changed ones.
    kept = (got["w"] != base["w"]).sum().item()
    nonzero = (torch.stack([m["w"] for m in models]).var(0, unbiased=False) != 0).sum().item()
    assert 0 < kept <= int(nonzero * topk)
