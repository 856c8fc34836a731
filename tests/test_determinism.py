"""Same inputs, seed and options → bit-identical output for any thread count and chunk size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def _digest_in_subprocess(mode, bp, mps, out, method, opts, simd):
    """Runs one merge in a fresh process, where WEIGHTWEAVE_SIMD is read once."""
    code = (
        "import json, sys, weightweave as ww\n"
        "a = json.loads(sys.argv[1])\n"
        "fn = ww.weave if a['mode'] == 'weave' else ww.merge\n"
        "fn(a['base'], a['models'], a['out'], method=a['method'], seed=3, **a['opts'])\n"
    )
    args = {"mode": mode, "base": str(bp), "models": [str(m) for m in mps], "out": str(out), "method": method,
            "opts": opts}
    env = {**os.environ, "WEIGHTWEAVE_SIMD": simd}
    subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, check=True)
    return digest(out)


EXTRA = [
    ("weave", "task_arithmetic", {"pool": "mean"}),
    ("weave", "magmax", {"pool": "magmax"}),
    ("merge", "della", {"density": [0.5, 0.3, 0.7], "epsilon": 0.1, "keep_base": "scale"}),
]


@pytest.mark.parametrize(("mode", "method", "opts"), CASES + EXTRA, ids=[f"{m}-{x}" for m, x, _ in CASES + EXTRA])
def test_simd_width_does_not_change_output(ckpts, tmp_path, mode, method, opts):
    # The AVX2 copies of the kernels, and the AVX-512 copies of the draws' loops (where this CPU
    # has AVX-512; else "auto" is AVX2 again), must compute exactly what the baseline copies do.
    _, _, bp, mps = ckpts
    digests = {
        simd: _digest_in_subprocess(mode, bp, mps, tmp_path / f"{simd}.safetensors", method, opts, simd)
        for simd in ("auto", "avx2", "baseline")
    }
    assert len(set(digests.values())) == 1, digests
