"""Every output-path problem is found before any work, with a message about the user's path;
a failed run leaves nothing, not even the directories it created."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import weightweave as ww
from weightweave.cli import main

from conftest import make_state, tree, write_models


@pytest.fixture
def ck(tmp_path):
    base, models = make_state(5)
    return write_models(tmp_path / "in", base, models)


def test_empty_output_path_is_refused(ck, tmp_path, monkeypatch, capsys):
    bp, mps = ck
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ww.OutputError, match="empty"):
        ww.merge(bp, mps, "", method="ties")
    assert main(["merge", str(bp), str(mps[0]), "-o", "", "--method", "ties"]) == 1
    assert "the output path is empty" in capsys.readouterr().err
    assert (tmp_path / "config.json").read_text() == "{}"
    assert sorted(tree(tmp_path)) == ["config.json", "in", *sorted(f"in/{p.name}" for p in [bp, *mps])]


def test_file_output_onto_a_directory_is_refused_before_work(ck, tmp_path):
    bp, mps = ck
    d = tmp_path / "x.safetensors"
    d.mkdir()
    calls = []
    with pytest.raises(ww.OutputError, match="is a directory"):
        ww.merge(bp, mps, d, method="pcb", progress=lambda a, b: calls.append(a))
    assert calls == []
    assert list(d.iterdir()) == []


def test_safetensors_output_inside_a_sharded_model_dir_is_refused(ck, tmp_path):
    bp, mps = ck
    sharded = tmp_path / "sharded"
    ww.merge(bp, mps, sharded, method="task_arithmetic", shard_size=1500)
    with pytest.raises(ww.OutputError, match="sharded model"):
        ww.merge(bp, mps, sharded / "model.safetensors", method="ties")
    shard = next(p for p in sharded.iterdir() if p.name.startswith("model-00001-of-"))
    with pytest.raises(ww.OutputError, match="is a shard of the model"):
        ww.merge(bp, mps, shard, method="ties", overwrite=True)


def test_output_holding_an_input_is_refused(ck, tmp_path):
    bp, mps = ck
    out = tmp_path / "o"
    ww.merge(bp, mps, out, method="ties")
    with pytest.raises(ww.OutputError, match="it is the input"):
        ww.merge(out, mps, out, method="ties", overwrite=True)
    with pytest.raises(ww.OutputError, match="it is the input"):
        ww.merge(bp, [mps[0]], mps[0], method="ties", overwrite=True)


def test_failed_run_removes_the_directories_it_created(ck, tmp_path):
    bp, mps = ck

    def cb(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ww.merge(bp, mps, tmp_path / "a" / "b" / "c", method="ties", progress=cb)
    assert not (tmp_path / "a").exists()
    # ...but keeps the ones that were there before.
    (tmp_path / "keep").mkdir()
    with pytest.raises(KeyboardInterrupt):
        ww.merge(bp, mps, tmp_path / "keep" / "x" / "o.safetensors", method="ties", progress=cb)
    assert list((tmp_path / "keep").iterdir()) == []


def test_symlinks_at_the_output_are_refused(ck, tmp_path):
    bp, mps = ck
    dangling = tmp_path / "gone.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ww.OutputError, match="dangling symbolic link"):
        ww.merge(bp, mps, dangling, method="ties", overwrite=True)
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ww.OutputError, match="is a symbolic link"):
        ww.merge(bp, mps, link, method="ties", overwrite=True)


def test_long_names(ck, tmp_path):
    bp, mps = ck
    ok = tmp_path / ("n" * (255 - len(".safetensors")) + ".safetensors")
    ww.merge(bp, mps, ok, method="ties")  # the name itself is fine: temporaries use short names
    assert ok.exists()
    with pytest.raises(ww.OutputError, match="over the 255-byte limit"):
        ww.merge(bp, mps, tmp_path / ("n" * 256), method="ties")


SET_LIMIT = """
import resource, signal, sys
import weightweave as ww
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
try:
    ww.merge(sys.argv[1], sys.argv[2:-1], sys.argv[-1], method="ties")
except ww.WeaveIOError as e:
    print(e)
"""


def test_write_errors_name_the_users_path_not_a_temporary(ck, tmp_path):
    bp, mps = ck
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SET_LIMIT, str(bp), *map(str, mps), str(out)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.stdout.startswith(f"{out}/model.safetensors: "), proc.stdout + proc.stderr
    assert "weightweave-" not in proc.stdout and ".tmp" not in proc.stdout and "staging" not in proc.stdout
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_cli_overwrite_flag(ck, tmp_path, capsys):
    bp, mps = ck
    out = str(tmp_path / "o.safetensors")
    assert main(["merge", str(bp), *map(str, mps), "-o", out, "--method", "ties", "-q"]) == 0
    assert main(["merge", str(bp), *map(str, mps), "-o", out, "--method", "ties", "-q"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(bp), *map(str, mps), "-o", out, "--method", "ties", "-q", "--overwrite"]) == 0
