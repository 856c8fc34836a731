"""Publishing: the whole output appears in one step under a lock, an earlier output is replaced
only when asked and only if weightweave wrote it, and a run killed at any instant leaves the old
output or the new one, never a mix; the next run removes what the killed one left."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import weightweave as ww

from conftest import digest, make_state, write_models

# A child process that merges (sharded, with a companion file) and prints a line at every
# progress call; argv: base, out, overwrite(0/1), lam, then the models.
CHILD = """
import sys
import weightweave as ww
base, out, overwrite, lam, *models = sys.argv[1:]
def progress(done, total):
    print("progress", done, total, flush=True)
ww.merge(base, models, out, method="task_arithmetic", lam=float(lam), shard_size=1500,
         overwrite=overwrite == "1", progress=progress)
print("done", flush=True)
"""


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".weightweave-") or p.name.endswith(".tmp"))


@pytest.fixture
def inputs(tmp_path):
    base, models = make_state(7)
    bp, mps = write_models(tmp_path / "in", base, models)
    # A model directory, so that outputs get a companion file too.
    d = tmp_path / "basedir"
    d.mkdir()
    os.link(bp, d / "model.safetensors")
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d, mps


def merged(inputs, out: Path, lam: float, **kw) -> str:
    base, mps = inputs
    ww.merge(base, mps, out, method="task_arithmetic", lam=lam, shard_size=1500, **kw)
    return digest(out)


def child(inputs, out: Path, lam: float, overwrite: bool, env=None) -> subprocess.Popen:
    base, mps = inputs
    argv = [sys.executable, "-c", CHILD, str(base), str(out), "1" if overwrite else "0", str(lam), *map(str, mps)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_sharded_output_is_one_directory_published_at_once(inputs, tmp_path):
    out = tmp_path / "out"
    merged(inputs, out, 0.5)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names and "config.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 2
    assert leftovers(tmp_path) == []
    # The manifest lists exactly what was written.
    from safetensors import safe_open

    first = next(n for n in names if n.startswith("model-00001-of-"))
    with safe_open(str(out / first), "pt") as f:
        assert json.loads(f.metadata()["weightweave.files"]) == names


def test_existing_output_needs_overwrite_and_must_be_ours(inputs, tmp_path):
    out = tmp_path / "out"
    old = merged(inputs, out, 0.1)
    with pytest.raises(ww.OutputError, match="overwrite"):
        merged(inputs, out, 0.9)
    assert digest(out) == old
    (out / "config.json").unlink()
    (out / "config.json").mkdir()  # same name as ours, but not what we wrote
    with pytest.raises(ww.OutputError, match="holds 'config.json/', which weightweave did not write"):
        merged(inputs, out, 0.9, overwrite=True)
    (out / "config.json").rmdir()
    new = merged(inputs, out, 0.9, overwrite=True)
    assert new != old and leftovers(tmp_path) == []
    # A directory weightweave did not write is never replaced, overwrite or not.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes((inputs[0] / "model.safetensors").read_bytes())
    with pytest.raises(ww.OutputError, match="not a weightweave output"):
        merged(inputs, foreign, 0.9, overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["model.safetensors"]
    # Neither is a single file.
    f = tmp_path / "foreign.safetensors"
    f.write_bytes((inputs[0] / "model.safetensors").read_bytes())
    before = digest(f)
    with pytest.raises(ww.OutputError, match="already exists"):
        ww.merge(inputs[0], inputs[1], f, method="task_arithmetic")
    with pytest.raises(ww.OutputError, match="not written by weightweave"):
        ww.merge(inputs[0], inputs[1], f, method="task_arithmetic", overwrite=True)
    assert digest(f) == before
    # An empty directory holds nothing to lose: no overwrite needed.
    empty = tmp_path / "empty"
    empty.mkdir()
    merged(inputs, empty, 0.5)
    assert (empty / "model.safetensors.index.json").exists()


def test_single_file_overwrite_replaces_atomically(inputs, tmp_path):
    out = tmp_path / "o.safetensors"
    ww.merge(inputs[0], inputs[1], out, method="task_arithmetic", lam=0.1)
    old = digest(out)
    ww.merge(inputs[0], inputs[1], out, method="task_arithmetic", lam=0.7, overwrite=True)
    assert digest(out) != old and leftovers(tmp_path) == []


def gated_child(inputs, out: Path, lam: float) -> subprocess.Popen:
    """A child that stops at its first progress call (holding the lock, its output staged)
    until a line arrives on its stdin."""
    base, mps = inputs
    code = CHILD.replace('print("progress", done, total, flush=True)',
                         'print("progress", flush=True); sys.stdin.readline()')  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", code, str(base), str(out), "0", str(lam), *map(str, mps)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(inputs, tmp_path):
    out = tmp_path / "out"
    holder = gated_child(inputs, out, 0.3)
    try:
        assert holder.stdout.readline().strip() == "progress"
        with pytest.raises(ww.OutputError, match=r"another weightweave run is writing this output \(pid \d+"):
            merged(inputs, out, 0.9)
        assert not out.exists()
        holder.stdin.write("\n" * 100)
        holder.stdin.flush()
        _, err = holder.communicate(timeout=60)
        assert holder.returncode == 0, err
    finally:
        holder.kill()
    want = merged(inputs, tmp_path / "ref", 0.3)
    assert digest(out) == want
    assert leftovers(tmp_path) == []


def test_stale_lock_and_staging_of_a_killed_run_are_taken_over(inputs, tmp_path):
    out = tmp_path / "out"
    holder = gated_child(inputs, out, 0.3)
    assert holder.stdout.readline().strip() == "progress"
    holder.kill()
    holder.communicate()
    stale = leftovers(tmp_path)
    assert any(n.endswith(".lock") for n in stale) and any(n.endswith(".staging") for n in stale)
    merged(inputs, out, 0.9)
    assert leftovers(tmp_path) == []


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(inputs, tmp_path):
    import fcntl

    parent = tmp_path / "p"
    parent.mkdir()
    dead_key, live_key = "0123456789abcdef", "fedcba9876543210"
    (parent / f".weightweave-{dead_key}-1a2b.staging").mkdir()
    (parent / f".weightweave-{dead_key}-1a2b.staging" / "model.safetensors").write_bytes(b"x" * 100)
    (parent / f".weightweave-{dead_key}.lock").write_text("pid 1 on host gone")
    (parent / f".weightweave-{dead_key}-9.tmp").write_bytes(b"x")
    pid = 4_000_000  # above any pid_max: no such process
    (parent / f".old.safetensors.weightweave-{pid}-123.tmp").write_bytes(b"x")
    # A live run elsewhere in the same directory: its lock is held.
    (parent / f".weightweave-{live_key}-77.staging").mkdir()
    lock = open(parent / f".weightweave-{live_key}.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    (parent / "mine.txt").write_text("not ours")
    try:
        merged(inputs, parent / "out", 0.5)
        assert leftovers(parent) == sorted([f".weightweave-{live_key}-77.staging", f".weightweave-{live_key}.lock"])
        assert (parent / "mine.txt").read_text() == "not ours"
    finally:
        lock.close()


@pytest.mark.parametrize(
    ("point", "existing"),
    [("staged", False), ("published", False), ("staged", True), ("exchanged", True), ("published", True)],
)
def test_crash_at_each_publish_step_leaves_old_or_new(inputs, tmp_path, point, existing):
    out = tmp_path / "out"
    old = merged(inputs, out, 0.1) if existing else None
    new = merged(inputs, tmp_path / "ref", 0.9)
    proc = child(inputs, out, 0.9, overwrite=existing, env={**os.environ, "WEIGHTWEAVE_FAILPOINT": point})
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = digest(out) if out.exists() else None
    assert state == (old if point == "staged" else new)
    # The next run in that directory removes what the killed one left.
    merged(inputs, tmp_path / "next", 0.5)
    assert leftovers(tmp_path) == []


def test_kill_at_random_instants_never_mixes_outputs(inputs, tmp_path):
    """SIGKILL after a random number of progress lines (or none, with the process just
    started), over an existing sharded output: 100 trials, each must leave exactly the old or
    exactly the new output, and the next run must find nothing left over."""
    out = tmp_path / "out"
    old = merged(inputs, out, 0.1)
    new = merged(inputs, tmp_path / "ref", 0.9)
    rng = random.Random(8)
    seen = set()
    for trial in range(100):
        if digest(out) == new:  # start each trial from the old output
            merged(inputs, out, 0.1, overwrite=True)
        proc = child(inputs, out, 0.9, overwrite=True)
        for _ in range(rng.randrange(0, 3)):
            if not proc.stdout.readline():
                break
        proc.kill()
        proc.communicate()
        state = digest(out)
        assert state in (old, new), f"trial {trial}: a mixed output"
        seen.add("new" if state == new else "old")
        merged(inputs, tmp_path / "next", 0.5, overwrite=True)
        assert leftovers(tmp_path) == [], f"trial {trial}"
    assert "old" in seen  # the kill did land before the publish sometimes
