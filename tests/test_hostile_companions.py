"""Companion files never leave the model directory: a link is followed only when its target
stays inside the base's directory (or its Hugging Face cache's blobs/); anything else, and
anything that is not a regular file, is skipped and reported. Copies stop at the size listed,
names stay the file system's bytes, and the copying happens where Ctrl-C is watched."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import save_file

import weightweave as ww

from conftest import tree


@pytest.fixture
def fts(fine_tunes):
    return fine_tunes


def base_dir(root, sd):
    root.mkdir(parents=True)
    save_file(sd, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def test_links_out_of_the_model_directory_are_never_followed(tmp_path, fts):
    base, mps = fts
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    b = base_dir(tmp_path / "base", base)
    os.symlink(secret, b / "tokenizer_config.json")
    os.symlink(secret.parent, b / "extra")  # a linked directory
    os.symlink("/proc/self/pagemap", b / "special_tokens_map.json")  # size 0, reads forever
    os.symlink("/etc/hostname", b / "vocab.txt")
    os.symlink(b / "nowhere", b / "dangling.json")
    (b / "sub").mkdir()
    (b / "sub" / "real.json").write_text("{}")
    os.symlink("../config.json", b / "sub" / "up.json")  # inside: followed
    os.symlink("sub", b / "same")  # a linked directory inside: followed
    out = tmp_path / "out"
    rep = ww.merge(b, mps, out, method="task_arithmetic")
    assert sorted(rep.skipped) == sorted(f"{n} (a link to outside the model directory)" for n in
                                         ["tokenizer_config.json", "extra", "special_tokens_map.json", "vocab.txt",
                                          "dangling.json"])  # fmt: skip
    assert tree(out) == ["config.json", "model.safetensors", "same", "same/real.json", "same/up.json", "sub",
                         "sub/real.json", "sub/up.json"]  # fmt: skip
    assert (out / "sub" / "up.json").read_text() == (b / "config.json").read_text()
    assert not (out / "sub" / "up.json").is_symlink()  # copied as a file
    for f in out.rglob("*"):
        assert "PRIVATE KEY" not in (f.read_text() if f.is_file() and f.suffix != ".safetensors" else "")


def test_hugging_face_cache_links_into_blobs_are_followed(tmp_path, fts):
    base, mps = fts
    repo = tmp_path / "hub" / "models--org--name"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file(base, str(repo / "blobs" / "aaaa"))
    (repo / "blobs" / "bbbb").write_text(json.dumps({"model_type": "llama"}))
    (repo / "blobs" / "cccc").write_text('{"tok": 1}')
    os.symlink("../../blobs/aaaa", snap / "model.safetensors")
    os.symlink("../../blobs/bbbb", snap / "config.json")
    os.symlink("../../blobs/cccc", snap / "tokenizer.json")
    # A link from the snapshot into another repository's blobs is out of bounds.
    other = tmp_path / "hub" / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    (other / "dddd").write_text("not yours")
    os.symlink("../../../models--evil--x/blobs/dddd", snap / "merges.txt")
    out = tmp_path / "out"
    rep = ww.merge(snap, mps, out, method="task_arithmetic")
    assert tree(out) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == '{"tok": 1}'
    assert rep.skipped == ["merges.txt (a link to outside the model directory)"]


def test_special_files_are_skipped_without_blocking(tmp_path, fts):
    base, mps = fts
    b = base_dir(tmp_path / "base", base)
    os.mkfifo(b / "tokenizer.json")  # opening a FIFO for reading would block forever
    out = tmp_path / "out"
    rep = ww.merge(b, mps, out, method="task_arithmetic")
    assert rep.skipped == ["tokenizer.json (not a regular file)"]
    assert tree(out) == ["config.json", "model.safetensors"]


def test_non_utf8_names_are_kept_and_collisions_refused(tmp_path, fts):
    base, mps = fts
    b = base_dir(tmp_path / "base", base)
    bdir = os.fsencode(b)
    with open(os.path.join(bdir, b"vocab\xff.txt"), "w") as f:
        f.write("one")
    out = tmp_path / "out"
    ww.merge(b, mps, out, method="task_arithmetic")
    with open(os.path.join(os.fsencode(out), b"vocab\xff.txt")) as f:
        assert f.read() == "one"  # under the same bytes
    # A second name that reads the same as text once shown: refused, nothing written.
    with open(os.path.join(bdir, b"vocab\xfe.txt"), "w") as f:
        f.write("two")
    with pytest.raises(ww.OutputError, match="reads the same"):
        ww.merge(b, mps, tmp_path / "out2", method="task_arithmetic")
    assert not (tmp_path / "out2").exists()


def test_companions_are_staged_before_the_last_progress_call(tmp_path, fts):
    """The copying runs with the merge, where Ctrl-C and a raising callback are watched: by the
    last progress call every companion is in the staging area, so nothing is copied after it (a
    signal then can no longer meet a copy under way), and raising there leaves nothing."""
    base, mps = fts
    b = base_dir(tmp_path / "base", base)
    for i in range(300):
        (b / f"extra_{i:04d}.json").write_text("{}")
    def staged() -> int:
        return sum(1 for s in tmp_path.iterdir() if s.name.endswith(".staging") for _ in s.glob("extra_*.json"))

    seen = []
    ww.merge(b, mps, tmp_path / "out", method="task_arithmetic", progress=lambda d, t: seen.append(staged()))
    assert seen[-1] == 300  # all copied by the last call: after it, only the rename
    assert len(list((tmp_path / "out").glob("extra_*.json"))) == 300

    class Stop(Exception):
        pass

    def cb(done, total):
        if done == total:  # the copying or the last call, whichever the tick meets
            raise Stop

    with pytest.raises(Stop):
        ww.merge(b, mps, tmp_path / "out2", method="task_arithmetic", progress=cb)
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".weightweave")]
