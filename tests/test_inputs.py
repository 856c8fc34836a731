"""Inputs that change, vanish or are not what they claim: an input changed during a run is an
error and nothing is published; a file truncated under the memory map does not kill the
process; odd files are refused up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import weightweave as ww
from weightweave import _st

from conftest import tree


def f32_models(tmp_path, n=3, size=300_000, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = tmp_path / f"m{i}.safetensors"
        _st.save({"w": ("F32", rng.standard_normal(size, dtype=np.float32)),
                  "v": ("F32", rng.standard_normal((64, 64), dtype=np.float32))}, p)  # fmt: skip
        os.utime(p, (946684800, 946684800))  # an old mtime: any later write changes it
        paths.append(p)
    return paths


def test_input_rewritten_in_place_during_the_run_is_an_error(tmp_path):
    paths = f32_models(tmp_path)
    out = tmp_path / "out.safetensors"

    def cb(done, total):
        with open(paths[2], "r+b") as f:  # same size, new bytes, as `dd conv=notrunc` does
            f.seek(-64, os.SEEK_END)
            f.write(b"\0" * 64)

    changed = r"m2.safetensors: the input changed while the merge ran \(it was modified\)"
    with pytest.raises(ww.WeaveIOError, match=changed):
        ww.weave(paths[0], paths[1:], out, method="pcb", progress=cb)
    assert not out.exists()
    assert sorted(tree(tmp_path)) == sorted(p.name for p in paths)


def test_input_replaced_during_the_run_is_an_error(tmp_path):
    paths = f32_models(tmp_path)
    other = tmp_path / "x.tmp-input"
    other.write_bytes(paths[1].read_bytes())

    def cb(done, total):
        if other.exists():
            os.replace(other, paths[1])

    with pytest.raises(ww.WeaveIOError, match="it was replaced by another file"):
        ww.merge(paths[0], paths[1:], tmp_path / "out", method="ties", progress=cb)
    assert not (tmp_path / "out").exists()


TRUNCATE_IN_PIPELINE = """
import os, sys
import weightweave as ww
base, out, *models = sys.argv[1:]
def cb(done, total):
    if os.path.getsize(models[0]) > 4096:
        os.truncate(models[0], 4096)
try:
    ww.weave(base, models, out, method="pcb", threads=1, chunk_size=4096, progress=cb)
except ww.WeaveIOError as e:
    print("error:", e)
print("alive")
"""


def test_truncated_input_during_the_run_is_an_error_not_a_crash(tmp_path):
    paths = f32_models(tmp_path, size=2_000_000)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_IN_PIPELINE, str(paths[0]), str(out), *map(str, paths[1:])],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "alive" in proc.stdout
    assert "m1.safetensors: the input changed while the merge ran" in proc.stdout
    assert not out.exists()
    assert not [p for p in tree(tmp_path) if "weightweave" in p]


TRUNCATE_UNDER_A_MAP = """
import os, sys
from weightweave import _rust, api
base, out, *models = sys.argv[1:]
sess = _rust.Session(base, models, out, api._job("tsv", {}, "merge"))
i = [t[0] for t in sess.tensors()].index("w")
_, ms = sess.inputs(i)
os.truncate(models[0], 4096)
data = bytes(ms[0][1])  # reads pages the file no longer has: SIGBUS, turned into zeros
print("alive", len(data), data[-4096:].count(0))
sess.complete()
try:
    sess.publish()
except _rust.WeaveIOError as e:
    print("error:", e)
"""


def test_sigbus_on_a_truncated_map_is_caught(tmp_path):
    paths = f32_models(tmp_path, size=1_000_000)
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_UNDER_A_MAP, str(paths[0]), str(out), *map(str, paths[1:])],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "alive 4000000 4096" in proc.stdout
    assert "m1.safetensors: the input changed while the merge ran (it was truncated while the merge ran)" in proc.stdout
    assert not out.exists()


def test_fifo_and_directory_inputs_are_refused_up_front(tmp_path):
    paths = f32_models(tmp_path, n=2, size=10)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    code = f"import weightweave as ww\ntry:\n ww.merge({str(paths[0])!r}, [{str(fifo)!r}], {str(tmp_path / 'o')!r}, method='ties')\nexcept ww.HeaderError as e: print(e)"  # noqa: E501
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pipe.safetensors: invalid header: is not a regular file" in proc.stdout, proc.stderr
    # A shard that is a directory.
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "model-00001-of-00001.safetensors").mkdir()
    index = {"weight_map": {"w": "model-00001-of-00001.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ww.HeaderError, match="model-00001-of-00001.safetensors: invalid header: is a directory"):
        ww.merge(paths[0], [d], tmp_path / "o", method="ties")


def test_index_with_no_tensors_is_an_error_not_a_panic(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(ww.HeaderError, match="lists no tensor"):
        ww.inspect(d)
    paths = f32_models(tmp_path, n=1, size=10)
    with pytest.raises(ww.HeaderError, match="lists no tensor"):
        ww.merge(d, paths, tmp_path / "o", method="ties")
    empty = tmp_path / "empty.safetensors"
    _st.save({}, empty)
    with pytest.raises(ww.HeaderError, match="holds no tensors"):
        ww.merge(empty, [empty], tmp_path / "o", method="ties")
    assert not (tmp_path / "o").exists()


def test_a_directory_with_both_layouts_is_ambiguous(tmp_path):
    paths = f32_models(tmp_path, n=1, size=10)
    d = tmp_path / "both"
    d.mkdir()
    (d / "model.safetensors").write_bytes(paths[0].read_bytes())
    (d / "model-00001-of-00001.safetensors").write_bytes(paths[0].read_bytes())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors", "v": "model-00001-of-00001.safetensors"}})
    )
    with pytest.raises(ww.HeaderError, match="holds both model.safetensors and model.safetensors.index.json"):
        ww.inspect(d)
