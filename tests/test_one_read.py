"""TIES's statistics taken in the output pass (`WEIGHTWEAVE_ONE_READ=1`, `pipeline/speculate.rs`)
and the windowed select's fallbacks: bit-identical to the statistics passes, equal to the
pure-torch reference written from SPEC.md, and one read of the inputs; unset, the path is
chosen by whether the inputs are in memory."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch

import weightweave as ww
from weightweave import reference as R

from conftest import assert_close_ulp, digest, load, write_models

N = 1 << 22


def _state(quantized: bool, dtype=torch.float32):
    """Scopes large enough (> 2^15 elements) for sampled windows. Quantized deltas (multiples of
    1/64) cancel exactly between tasks, so the majority sign decides some elements."""
    g = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (300, 257), "b.weight": (41_000,), "c.bias": (77,)}
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    models = []
    for _ in range(3):
        m = {}
        for n, t in base.items():
            noise = torch.randn(t.shape, generator=g) * 0.05
            if quantized:
                noise = torch.randint(-3, 4, t.shape, generator=g).float() / 64
            m[n] = (t.float() + noise).to(dtype)
        models.append(m)
    return base, models


def _input_bytes(base, models) -> int:
    return sum(t.numel() * t.element_size() for sd in [base, *models] for t in sd.values())


def _both(tmp_path, monkeypatch, bp, mps, call, **kw):
    """(digest, report) of the statistics passes and of the one-read pass."""
    out = []
    for mode in ("0", "1"):
        monkeypatch.setenv("WEIGHTWEAVE_ONE_READ", mode)
        path = tmp_path / f"out{mode}.safetensors"
        rep = call(bp, mps, path, **kw)
        out.append((digest(path), rep, path))
    monkeypatch.delenv("WEIGHTWEAVE_ONE_READ")
    return out


CASES = [
    ("ties", {}, {}),
    ("ties", {"density": 0.6}, {"threads": 1, "chunk_size": 4096}),
    ("dare_ties", {}, {}),
    ("dare_ties", {"density": 0.5, "ties_density": 0.5}, {"chunk_size": 7777}),
    ("dare_ties", {"density": [0.3, 0.5, 0.9]}, {}),
]


@pytest.mark.parametrize("quantized", [False, True], ids=["continuous", "quantized"])
@pytest.mark.parametrize(("method", "params", "opts"), CASES)
def test_one_read_merge_is_the_two_pass_merge(tmp_path, monkeypatch, method, params, opts, quantized):
    base, models = _state(quantized)
    bp, mps = write_models(tmp_path / "in", base, models)
    (two, rep2, _), (one, rep1, path) = _both(
        tmp_path, monkeypatch, bp, mps, ww.merge, method=method, lam=0.7, seed=5, **params, **opts
    )
    assert one == two
    inputs = _input_bytes(base, models)
    assert rep1.bytes_read == inputs
    assert rep2.bytes_read == 2 * inputs
    want = R.merge(base, models, method, lam=0.7, seed=5, **params)
    assert_close_ulp(load(path), want, atol=1e-6)


@pytest.mark.parametrize("pool", ["random", "magmax", "mean"])
def test_one_read_weave_over_densities(tmp_path, monkeypatch, pool):
    # Several representatives (a density each) share one variant's deltas; the random pool
    # draws by element index, which a rewritten element must keep.
    base, models = _state(True)
    bp, mps = write_models(tmp_path / "in", base, models)
    grid = {"lam": [0.5, 1.0], "density": [0.1, 0.3]}
    (two, _, _), (one, rep, path) = _both(
        tmp_path, monkeypatch, bp, mps, ww.weave, method="dare_ties", search=grid, pool=pool, seed=3
    )
    assert one == two
    assert rep.bytes_read == _input_bytes(base, models)
    want = R.weave(base, models, "dare_ties", search=grid, pool=pool, seed=3)
    assert_close_ulp(load(path), want, atol=1e-6)


def test_one_read_with_weights_per_set(tmp_path, monkeypatch):
    # Points with weights of their own: variants whose deltas the pass holds beside `raw`.
    base, models = _state(True, torch.bfloat16)
    bp, mps = write_models(tmp_path / "in", base, models)
    points = [
        {"lam": 1.0, "density": 0.2},
        {"lam": 0.5, "density": 0.4, "weights": [0.5, 1.0, 1.5]},
        {"lam": 0.7, "density": 0.3, "weights": [1.0, 0.25, 1.0]},
    ]
    (two, _, _), (one, _, _) = _both(
        tmp_path, monkeypatch, bp, mps, ww.weave, method="ties", search=points, pool="mean",
        weights=[1.0, 2.0, 1.0],
    )
    assert one == two


def _adversarial():
    """Deltas the sample misjudges: every sampled run (64 elements every 8192 of a 2^22 scope)
    holds tiny values, the rest large ones, so each threshold lies far above its window. Below
    the true threshold signs are mostly +, above it mostly −, and some elements cancel exactly:
    a majority sign tallied on the window's premise comes out wrong."""
    i = np.arange(N)
    rng = np.random.default_rng(0)
    sampled = (i % 8192) < 64
    taus = []
    for _ in range(3):
        mag = 1 + rng.random(N)
        top = rng.random(N) < 0.9
        sign = np.where(mag > 1.8, np.where(top, -1, 1), np.where(top, 1, -1))
        v = sign * mag
        v[sampled] = rng.normal(0, 1e-4, sampled.sum())
        taus.append(v.astype(np.float32))
    c = (i % 7 == 3) & ~sampled
    taus[0][c] = np.abs(taus[0][c]) + 1
    taus[1][c] = -taus[0][c]
    taus[2][c] = 0
    return taus


@pytest.mark.parametrize(
    ("one_read", "scope"), [("0", "global"), ("1", "global"), ("0", "tensor")], ids=["passes", "one-read", "per-tensor"]
)
def test_a_missed_window_still_merges_exactly(monkeypatch, one_read, scope):
    # Before the fix the thresholds were found again after the miss, but the majority sign kept
    # the window's wrong tally: 594,505 elements came out with the wrong sign.
    monkeypatch.setenv("WEIGHTWEAVE_ONE_READ", one_read)
    taus = _adversarial()
    base = {"w": np.zeros(N, np.float32)}
    got = ww.merge_arrays(base, [{"w": t} for t in taus], method="ties", lam=1.0, scope=scope)["w"]
    models = [{"w": torch.from_numpy(t)} for t in taus]
    want = R.merge({"w": torch.zeros(N)}, models, "ties", lam=1.0, scope=scope)["w"]
    assert np.array_equal(got, want.numpy())


def test_held_elements_past_their_budget_fall_back(tmp_path, monkeypatch):
    base, models = _state(True)
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.setenv("WEIGHTWEAVE_HELD_BUDGET", "4096")
    (two, _, _), (one, rep, _) = _both(tmp_path, monkeypatch, bp, mps, ww.merge, method="ties", lam=0.7)
    assert one == two
    # The output pass ran again on top of the one that held too much.
    assert rep.bytes_read == 2 * _input_bytes(base, models)


def test_windows_expected_to_hold_too_much_decline_before_the_pass(tmp_path, monkeypatch):
    # Continuous deltas: the sample's windows are expected to hold more than the budget allows,
    # so the run takes the statistics passes (with the sample already taken) and no output
    # pass is wasted: two reads, the passes' bytes.
    base, models = _state(False)
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.setenv("WEIGHTWEAVE_HELD_BUDGET", "4096")
    (two, rep2, _), (one, rep1, _) = _both(
        tmp_path, monkeypatch, bp, mps, ww.merge, method="dare_ties", lam=0.7, seed=2
    )
    assert one == two
    assert rep1.bytes_read == rep2.bytes_read == 2 * _input_bytes(base, models)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _resident(path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages), asked of the kernel (`mincore` on a map)."""
    size = os.path.getsize(path)
    pages = -(-size // os.sysconf("SC_PAGE_SIZE"))
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def _evict(path) -> None:
    """Drops a file's clean pages from the page cache (written out first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_inputs_read_from_disk_take_one_read(tmp_path, monkeypatch):
    # Unset, the one-read path is taken where some page of the inputs is not in memory, and the
    # statistics passes where every page is (measured: benches/results/one_read.md). Files
    # of 24 MiB: the first touch of a map reads up to the device's read-ahead (8 MiB here)
    # around it, which would take a small file in whole.
    monkeypatch.delenv("WEIGHTWEAVE_ONE_READ", raising=False)
    g = torch.Generator().manual_seed(11)
    shape = (3072, 2048)
    base = {"w": torch.randn(shape, generator=g)}
    models = [{"w": base["w"] + torch.randint(-3, 4, shape, generator=g).float() / 64} for _ in range(3)]
    bp, mps = write_models(tmp_path / "in", base, models)
    files = sorted((tmp_path / "in").rglob("*.safetensors"))
    for f in files:
        _evict(f)
    if any(_resident(f)[0] * 2 > _resident(f)[1] for f in files):
        pytest.skip("this filesystem keeps the inputs in memory (posix_fadvise cannot drop them)")
    inputs = _input_bytes(base, models)
    cold = ww.merge(bp, mps, tmp_path / "cold.safetensors", method="ties", lam=0.7)
    assert cold.bytes_read == inputs
    assert all(_resident(f)[0] == _resident(f)[1] for f in files)  # the pass read them all
    warm = ww.merge(bp, mps, tmp_path / "warm.safetensors", method="ties", lam=0.7)
    assert warm.bytes_read == 2 * inputs
    assert digest(tmp_path / "cold.safetensors") == digest(tmp_path / "warm.safetensors")


def test_one_read_into_shards(tmp_path, monkeypatch):
    # The rewrites land in several output files, each patched a window at a time. Deltas
    # mirrored: their majority sign comes out negative, so every cancelling element is rewritten.
    base, models = _state(True)
    models = [{n: 2 * base[n] - t for n, t in m.items()} for m in models]
    bp, mps = write_models(tmp_path / "in", base, models)
    got = []
    for mode in "01":
        monkeypatch.setenv("WEIGHTWEAVE_ONE_READ", mode)
        out = tmp_path / f"out{mode}"
        rep = ww.merge(bp, mps, out, method="ties", lam=0.7, shard_size=200_000)
        got.append(({p.name: digest(p) for p in out.glob("*.safetensors")}, rep.bytes_read))
    assert got[0][0] == got[1][0]
    assert len(got[0][0]) > 1
    assert got[1][1] == _input_bytes(base, models)
