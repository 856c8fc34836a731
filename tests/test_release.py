"""Pages released behind a pass (`pipeline/advice.rs`: where the inputs do not fit in memory, a
pass unmaps the pages it has read). WEIGHTWEAVE_RELEASE=1 releases in every pass although a
test's inputs are cached: the output is the reference's and byte-identical to a run that keeps
them mapped, for single-pass, multi-pass and one-read methods and for tensors copied from the
base."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference as R

from conftest import assert_close_ulp, digest, load, write_models


def _state(dtype):
    g = torch.Generator().manual_seed(3)
    # Row lengths that do not divide a page; one tensor larger than a chunk; an int64 tensor
    # that is copied from the base.
    shapes = {"a.weight": (700, 333), "b.weight": (50_001,), "c.bias": (129,)}
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    base["ids"] = torch.arange(9_000, dtype=torch.int64)
    models = []
    for _ in range(3):
        m = {n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in base.items() if n != "ids"}
        m["ids"] = base["ids"].clone()
        models.append(m)
    return base, models


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    ("method", "one_read"),
    [("task_arithmetic", "0"), ("ties", "0"), ("ties", "1"), ("dare_ties", "1"), ("breadcrumbs", "0"), ("pcb", "0")],
)
def test_released_pages_change_no_byte(tmp_path, monkeypatch, dtype, method, one_read):
    base, models = _state(dtype)
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.setenv("WEIGHTWEAVE_ONE_READ", one_read)
    out = {}
    for release in ("0", "1"):
        monkeypatch.setenv("WEIGHTWEAVE_RELEASE", release)
        path = tmp_path / f"out{release}.safetensors"
        ww.merge(bp, mps, path, method=method, lam=0.7, seed=5, chunk_size=4096)
        out[release] = (digest(path), path)
    assert out["1"][0] == out["0"][0]
    got = load(out["1"][1])
    assert torch.equal(got["ids"], base["ids"])
    assert_close_ulp(got, R.merge(base, models, method, lam=0.7, seed=5), atol=1e-6)


def test_inputs_held_in_memory_are_never_released(monkeypatch):
    # The caller's own tensors (no file mapping): unmapping their pages would zero them.
    base, models = _state(torch.float32)
    keep = [{n: t.clone() for n, t in sd.items()} for sd in [base, *models]]
    monkeypatch.setenv("WEIGHTWEAVE_RELEASE", "1")
    got = ww.merge_arrays(base, models, method="ties", lam=0.7, chunk_size=4096)
    for sd, kept in zip([base, *models], keep, strict=True):
        assert all(torch.equal(sd[n], kept[n]) for n in kept)
    assert_close_ulp(got, R.merge(keep[0], keep[1:], "ties", lam=0.7), atol=1e-6)
