"""The GIL is released during merges, progress is reported, and raising from the callback
cancels cleanly."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import weightweave as ww

from conftest import tree

N = 4_000_000


def arrays(tasks=3):
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal(N, dtype=np.float32)}
    return base, [{"w": base["w"] + 0.01 * rng.standard_normal(N, dtype=np.float32)} for _ in range(tasks)]


def test_gil_released_other_threads_run():
    base, models = arrays()
    ticks = 0
    stop = threading.Event()

    def spin():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0)

    t = threading.Thread(target=spin)
    t.start()
    t0 = time.perf_counter()
    ww.weave_arrays(base, models, method="pcb", threads=1)
    elapsed = time.perf_counter() - t0
    stop.set()
    t.join()
    # Holding the GIL, the merge would let the spinner in only at switch intervals (5 ms).
    held_gil_bound = elapsed / 0.005
    assert elapsed > 0.05
    assert ticks > 10 * held_gil_bound + 100, (ticks, elapsed)


def test_two_merges_overlap_in_time():
    base, models = arrays()
    spans = []

    def work():
        s = time.perf_counter()
        ww.weave_arrays(base, models, method="pcb", threads=1)
        spans.append((s, time.perf_counter()))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 < a1, spans  # the second started before the first ended


def test_progress_reaches_total(ckpts, tmp_path):
    _, _, bp, mps = ckpts
    calls = []
    ww.weave(bp, mps, tmp_path / "o.safetensors", method="ties", progress=lambda d, t: calls.append((d, t)))
    assert calls, "progress never called"
    done, total = calls[-1]
    assert done == total > 0
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))


class Stop(Exception):
    pass


def test_exception_in_progress_cancels_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(1)
    from weightweave import _st

    paths = []
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        _st.save({"w": ("F32", rng.standard_normal(6_000_000, dtype=np.float32))}, p)
        paths.append(p)
    out = tmp_path / "out"

    def cb(done, total):
        raise Stop

    t0 = time.perf_counter()
    with pytest.raises(Stop):
        ww.weave(paths[0], paths[1:], out, method="pcb", threads=1, chunk_size=4096, progress=cb)
    assert time.perf_counter() - t0 < 5
    assert not out.exists()
    assert sorted(tree(tmp_path)) == sorted(p.name for p in paths)
