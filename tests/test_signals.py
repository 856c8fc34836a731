"""Every way of stopping is clean and says the truth. Each test synchronises on an event (a
progress line the child prints, then a line it waits for), never on the clock: the signal is
always delivered while the merge is in progress or at its last progress call, both of which come
before anything is published."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

import weightweave as ww
from weightweave import _st

from conftest import tree

# Runs the CLI with its progress bar patched to announce each call and wait for a go-ahead line.
CLI = """
import sys
from weightweave import cli
shown = cli.Bar.__call__
def gated(self, *args):
    print("progress", flush=True)
    sys.stdin.readline()
    return shown(self, *args)
cli.Bar.__call__ = gated
raise SystemExit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def models(tmp_path):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        _st.save({"w": ("F32", rng.standard_normal(300_000, dtype=np.float32))}, p)
        paths.append(p)
    return paths


@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM"),
                                                   (signal.SIGHUP, 129, "SIGHUP")])  # fmt: skip
@pytest.mark.parametrize("method", ["pcb", "task_arithmetic"])
def test_signal_stops_the_cli_and_leaves_nothing(models, tmp_path, sig, code, name, method):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", CLI, "weave", *map(str, models), "-o", str(out), "--method", method, "--threads", "1",
           "--chunk-size", "4096"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "progress"
    proc.send_signal(sig)
    _, err = proc.communicate("\n" * 1000, timeout=60)
    assert proc.returncode == code, err
    assert f"interrupted ({name}); nothing was written" in err and "Traceback" not in err
    assert not out.exists()
    assert sorted(tree(tmp_path)) == sorted(p.name for p in models)


def test_ctrl_c_with_a_huge_chunk_and_a_million_lambdas(tmp_path):
    """Chunks are cut into pieces of 2^20 elements, the unit between cancellation checks, and
    every pool is O(1) per element in |Λ|: a stop with chunk_size=2^30 and 10^6 λ takes effect
    at the next piece. (How fast is a matter of the machine; that it stops cleanly is tested.)"""
    rng = np.random.default_rng(3)
    paths = []
    for i in range(2):
        p = tmp_path / f"m{i}.safetensors"
        _st.save({"w": ("F32", rng.standard_normal(2**22, dtype=np.float32))}, p)
        paths.append(p)
    calls = []

    def cb(done, total):
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ww.weave(paths[0], paths[1:], tmp_path / "o", method="pcb", pool="magmax", lambdas="0:1:0.000001",
                 chunk_size=2**30, threads=1, progress=cb)  # fmt: skip
    assert len(calls) == 1
    assert sorted(tree(tmp_path)) == ["m0.safetensors", "m1.safetensors"]


def test_raising_at_the_last_progress_call_publishes_nothing(models, tmp_path):
    out = tmp_path / "o.safetensors"

    class Stop(Exception):
        pass

    def cb(done, total):
        if done == total:
            raise Stop

    with pytest.raises(Stop):
        ww.weave(models[0], models[1:], out, method="ties", progress=cb)
    assert not out.exists()
    assert sorted(tree(tmp_path)) == sorted(p.name for p in models)


def test_progress_must_be_callable(models, tmp_path):
    with pytest.raises(ww.ParamError, match="callable"):
        ww.merge(models[0], models[1:], tmp_path / "o.safetensors", method="ties", progress=5)
    assert not (tmp_path / "o.safetensors").exists()
