"""Same inputs, seed and options → bit-identical output for any thread count and chunk size."""

from __future__ import annotations

import pytest

import weightweave as ww

from conftest import digest

CASES = [
    ("weave", "dare", {"pool": "random"}),
    ("weave", "ties", {"pool": "mean"}),
    ("weave", "pcb", {"pool": "magmax"}),
    ("weave", "breadcrumbs", {"pool": "random", "gamma": 0.05}),
    ("merge", "dare_ties", {}),
    ("merge", "ties", {"scope": "tensor"}),
    ("weave", "task_arithmetic", {"pool": "random", "include_deltas": False}),
]


def run(mode, bp, mps, out, method, **kw):
    fn = ww.weave if mode == "weave" else ww.merge
    fn(bp, mps, out, method=method, **kw)
    return digest(out)


@pytest.mark.parametrize(("mode", "method", "opts"), CASES, ids=[f"{m}-{x}" for m, x, _ in CASES])
def test_threads_and_chunks_do_not_change_output(ckpts, tmp_path, mode, method, opts):
    _, _, bp, mps = ckpts
    digests = set()
    for threads in (1, 2):
        for chunk in (1, 7, 64, 1000, None):
            out = tmp_path / f"o{threads}-{chunk}.safetensors"
            digests.add(run(mode, bp, mps, out, method, seed=4, threads=threads, chunk_size=chunk, **opts))
    assert len(digests) == 1


@pytest.mark.parametrize(
    ("mode", "method", "opts"), [CASES[0], CASES[4], CASES[6]], ids=["dare-random", "dare_ties", "ta-random"]
)
def test_seed_changes_random_outputs(ckpts, tmp_path, mode, method, opts):
    _, _, bp, mps = ckpts
    a = run(mode, bp, mps, tmp_path / "a.safetensors", method, seed=1, **opts)
    b = run(mode, bp, mps, tmp_path / "b.safetensors", method, seed=2, **opts)
    c = run(mode, bp, mps, tmp_path / "c.safetensors", method, seed=1, **opts)
    assert a != b
    assert a == c
