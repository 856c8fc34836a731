"""Outputs pinned across engine changes (issue 17: a faster path must write the same bytes).

The fixture is built from integer hashing alone (no random generator whose stream could change
between numpy or torch versions). The digests were taken with the engine before the one-read
work (commit 59b8efb; DELLA's with 179caf1, before its AVX2 row kernels; mergekit's with 4183fab,
before their vectorised L1 sums); every statistics path
must still give them: the default passes, the one-read pass, one thread, and the baseline
(non-AVX2) kernels."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import weightweave as ww

SHAPES = {
    "a.weight": ((300, 257), torch.bfloat16),
    "b.weight": ((41_000,), torch.float32),
    "c.bias": ((77,), torch.bfloat16),
}

RUNS = {
    "ties": ("merge", {"method": "ties", "lam": 0.7}),
    "ties_tensor": ("merge", {"method": "ties", "scope": "tensor", "lam": 0.7}),
    "ties_dens": ("merge", {"method": "ties", "density": [0.1, 0.5, 0.3], "lam": 1.0, "chunk_size": 4096}),
    "dare_ties": ("merge", {"method": "dare_ties", "seed": 5, "lam": 0.7}),
    "dare_ties_half": ("merge", {"method": "dare_ties", "density": 0.5, "ties_density": 0.5, "seed": 2, "lam": 0.7}),
    "pcb": ("merge", {"method": "pcb", "lam": 0.7}),
    "breadcrumbs": ("merge", {"method": "breadcrumbs", "lam": 0.7}),
    "della": ("merge", {"method": "della", "weights": [1.0, 0.6, 0.3], "density": [0.5, 0.3, 0.7], "epsilon": 0.1}),
    "della_linear": ("merge", {"method": "della_linear", "weights": [1.0, 0.5, 0.5], "density": 0.4, "epsilon": 0.2,
                               "seed": 9}),
    "weave_dare_ties": (
        "weave",
        {"method": "dare_ties", "search": {"lam": [0.5, 1.0], "density": [0.1, 0.3]}, "pool": "random", "seed": 3},
    ),
    "weave_ties_weights": (
        "weave",
        {"method": "ties", "lambdas": [0.5, 1.0], "pool": "magmax", "weights": [1.0, 2.0, 0.5]},
    ),
    # mergekit's semantics (compat), with its L1 rescale's statistics and its bf16 arithmetic.
    "mk_dare_linear_bf16": ("merge", {"method": "dare_linear", "compat": "mergekit", "arith": "bf16",
                                      "out_dtype": "bf16", "weights": [1.0, 0.6, 0.3], "density": [0.5, 0.3, 0.7],
                                      "seed": 4}),
    "mk_dare_ties": ("merge", {"method": "dare_ties", "compat": "mergekit", "weights": [1.0, 0.6, 0.3],
                               "density": 0.4, "seed": 6}),
    "mk_ties_bf16": ("merge", {"method": "ties", "compat": "mergekit", "arith": "bf16", "out_dtype": "bf16",
                               "weights": [1.0, 0.6, 0.3], "density": [0.5, 0.3, 0.7]}),
    "mk_breadcrumbs_ties": ("merge", {"method": "breadcrumbs_ties", "compat": "mergekit", "weights": [1.0, 0.6, 0.3],
                                      "density": 0.5, "gamma": 0.02, "chunk_size": 4096}),
    # Row statistics of whole rows side by side, and per-tensor selects sampled in one pass
    # (digests taken with d64caf6, before both). `models` keeps the first models alone.
    "mk_arcee_fusion": ("merge", {"method": "arcee_fusion", "compat": "mergekit", "models": 1}),
    "mk_arcee_fusion_bf16_pieces": ("merge", {"method": "arcee_fusion", "compat": "mergekit", "arith": "bf16",
                                              "models": 1, "chunk_size": 4096}),
    "mk_sce": ("merge", {"method": "sce", "compat": "mergekit", "select_topk": 0.3}),
}

PINNED = {
    "ties": "85a3e4c382912d6c",
    "ties_tensor": "51e8e4542fae835d",
    "ties_dens": "871348185c26ef87",
    "dare_ties": "4e0202d6bc3e5131",
    "dare_ties_half": "9bd1db5fcf24ff49",
    "pcb": "5740a9f5b4503b31",
    "breadcrumbs": "a2c1cb62234cc2c1",
    "della": "e721ebea08d0a968",
    "della_linear": "42edb04730de0e10",
    "weave_dare_ties": "89c2cd84a4743647",
    "weave_ties_weights": "3153f07dcbf1fef2",
    "mk_dare_linear_bf16": "5f38576d6e043a79",
    "mk_dare_ties": "58e47f32e9062c25",
    "mk_ties_bf16": "f20faf552da408a3",
    "mk_breadcrumbs_ties": "3b24f52cfb6a56c1",
    "mk_arcee_fusion": "beaf9eaedc09e22e",
    "mk_arcee_fusion_bf16_pieces": "f224a9363a4ce2cd",
    "mk_sce": "562253e8bdcf5740",
}


def _uniform(n: int, salt: int) -> np.ndarray:
    """n values in [0, 1) from a multiplicative hash of the index."""
    i = np.arange(n, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(salt) * np.uint64(40503)) % np.uint64(1 << 32)
    h = (h ^ (h >> np.uint64(15))) * np.uint64(2246822519) % np.uint64(1 << 32)
    return h.astype(np.float64) / float(1 << 32)


def _fixture(root: Path) -> tuple[Path, list[Path]]:
    """A base and 3 fine-tunes; half the deltas multiples of 1/64 (exact cancellations between
    tasks, so the majority sign decides elements), half continuous."""
    root.mkdir(parents=True, exist_ok=True)
    base = {}
    for k, (n, (s, dt)) in enumerate(SHAPES.items()):
        v = (_uniform(int(np.prod(s)), 1 + k) - 0.5) * 2
        base[n] = torch.from_numpy(v.astype(np.float32)).reshape(s).to(dt)
    bp = root / "base.safetensors"
    save_file(base, str(bp))
    mps = []
    for t in range(3):
        m = {}
        for k, (n, (s, dt)) in enumerate(SHAPES.items()):
            size = int(np.prod(s))
            q = np.floor(_uniform(size, 100 + 10 * t + k) * 7) - 3
            c = (_uniform(size, 200 + 10 * t + k) - 0.5) * 0.1
            d = np.where(_uniform(size, 300 + 10 * t + k) < 0.5, q / 64, c).astype(np.float32)
            m[n] = (base[n].float() + torch.from_numpy(d).reshape(s)).to(dt)
        p = root / f"ft{t}.safetensors"
        save_file(m, str(p))
        mps.append(p)
    return bp, mps


def _digest(path: Path) -> str:
    """The tensors' names, dtypes and bytes (not the header: metadata may change)."""
    h = hashlib.sha256()
    for n, t in sorted(load_file(str(path)).items()):
        h.update(n.encode())
        h.update(str(t.dtype).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return _fixture(tmp_path_factory.mktemp("pinned"))


@pytest.mark.parametrize("mode", ["passes", "one-read", "baseline-1-thread", "avx2"])
@pytest.mark.parametrize("name", list(RUNS))
def test_outputs_keep_their_pinned_bytes(inputs, tmp_path, monkeypatch, name, mode):
    bp, mps = inputs
    fn, kw = RUNS[name]
    kw = dict(kw)
    mps = mps[: kw.pop("models", len(mps))]
    out = tmp_path / "out.safetensors"
    if mode in ("baseline-1-thread", "avx2"):
        # The kernel copy is picked once per process: a fresh one, with the baseline forced (one
        # thread), or the AVX2 copies where the CPU would take the AVX-512 ones for the draws.
        code = (
            "import json, sys, weightweave as ww; a = json.loads(sys.argv[1]); "
            "getattr(ww, a['fn'])(a['base'], a['models'], a['out'], **a['kw'])"
        )
        kw = {**kw, "threads": 1} if mode == "baseline-1-thread" else kw
        arg = json.dumps({"fn": fn, "kw": kw, "base": str(bp), "models": [str(m) for m in mps], "out": str(out)})
        env = {**os.environ, "WEIGHTWEAVE_SIMD": "baseline" if mode == "baseline-1-thread" else "avx2"}
        subprocess.run([sys.executable, "-c", code, arg], env=env, check=True)
    else:
        if mode == "one-read":
            monkeypatch.setenv("WEIGHTWEAVE_ONE_READ", "1")
        getattr(ww, fn)(bp, mps, out, **kw)
    assert _digest(out) == PINNED[name]
