"""Hostile `.bin` files: a pickle that nests, shares or marks without end, a zip full of fake
directory records, a big-endian or ambiguous archive. Each is a WeaveError naming the file, in a
child process under a memory cap (a crash there fails the test instead of killing pytest), and
what torch reads is what weightweave reads."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import weightweave as ww

from conftest import load

CHILD = textwrap.dedent("""
    import resource, sys
    cap = 1 << 30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import weightweave as ww
    path, what = sys.argv[1], sys.argv[2]
    try:
        if what == "inspect":
            ww.inspect(path)
        else:
            ww.merge(path, [path], sys.argv[3], method="task_arithmetic")
    except ww.WeaveError as e:
        print("WeaveError:", type(e).__name__, e)
        sys.exit(0)
    print("accepted")
""")


def archive(path, pickle_bytes: bytes, extra: dict[str, bytes] | None = None, first: str = "archive") -> None:
    """A zip laid out as torch.save lays one out (stored), holding `pickle_bytes` as data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{first}/data.pkl", pickle_bytes)
        z.writestr(f"{first}/data/0", b"\0" * 16)
        for k, v in (extra or {}).items():
            z.writestr(k, v)


def run_child(path, tmp_path, what: str) -> str:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), what, str(tmp_path / "out.safetensors")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, f"the child died ({r.returncode}): {r.stderr[-2000:]}"
    return r.stdout


def memo_bomb() -> bytes:
    p = bytearray(b"\x80\x02N\x94")
    for level in range(5):
        p += b"(" + bytes([ord("h"), level]) * 64 + b"t\x94"
    return bytes(p + b".")


def shared_bomb() -> bytes:
    # The largest memoizable tuple fetched 10 000 times: 640 000 copies from 20 KB.
    return b"\x80\x02(" + b"N" * 63 + b"t\x94]" + b"h\x00a" * 10_000 + b"."


BOMBS = {
    "nested_tuples": (b"\x80\x02)" + b"\x85" * 100_000 + b".", "levels deep"),
    "nested_lists": (b"\x80\x02" + b"]" * 300_000 + b"a" * 300_000 + b".", "on its stack"),
    "memo_bomb": (memo_bomb(), "memo"),
    "shared_bomb": (shared_bomb(), "builds more than"),
    "marks": (b"\x80\x02" + b"(" * 10_000_000 + b".", "MARK"),
}


@pytest.mark.parametrize("what", ["inspect", "merge"])
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_pickle_bombs_are_errors_in_bounded_memory(tmp_path, bomb, what):
    data, msg = BOMBS[bomb]
    path = tmp_path / "model.bin"
    archive(path, data)
    out = run_child(path, tmp_path, what)
    assert out.startswith("WeaveError: HeaderError") and msg in out and "model.bin" in out, out
    assert not (tmp_path / "out.safetensors").exists()


def test_fake_directory_records_are_read_in_linear_time(tmp_path):
    # 6.6 MB of end-of-central-directory records: only the last 64 KiB are looked at.
    path = tmp_path / "fake.bin"
    path.write_bytes(b"PK\x03\x04" + (b"PK\x05\x06" + b"\0" * 18) * 300_000)
    out = run_child(path, tmp_path, "inspect")
    assert "WeaveError" in out and "fake.bin" in out, out


def real_checkpoint(path, sd) -> bytes:
    torch.save(sd, path)
    return path.read_bytes()


def rewrite(src, dst, *, rename=None, add=None, drop=()):
    """`src`'s entries copied into a new stored zip, renamed/added/dropped as asked."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            if info.filename in drop:
                continue
            name = (rename or {}).get(info.filename, info.filename)
            zo.writestr(name, zi.read(info))
        for k, v in (add or {}).items():
            zo.writestr(k, v)


SD = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}


def test_big_endian_archives_are_refused_not_misread(tmp_path):
    real_checkpoint(tmp_path / "le.bin", SD)
    with zipfile.ZipFile(tmp_path / "le.bin") as z:
        prefix = z.namelist()[0].split("/")[0]
        assert z.read(f"{prefix}/byteorder") == b"little"
    rewrite(tmp_path / "le.bin", tmp_path / "be.bin", drop={f"{prefix}/byteorder"},
            add={f"{prefix}/byteorder": b"big"})  # fmt: skip
    with pytest.raises(ww.HeaderError, match=r"be\.bin.*'big' byte order"):
        ww.inspect(tmp_path / "be.bin")
    # torch reads it byte-swapped, as written: weightweave would have merged garbage.
    assert not torch.equal(torch.load(tmp_path / "be.bin", weights_only=True)["w"], SD["w"])


def test_duplicate_entries_and_second_pickles_are_refused(tmp_path):
    real_checkpoint(tmp_path / "a.bin", SD)
    with zipfile.ZipFile(tmp_path / "a.bin") as z:
        prefix = z.namelist()[0].split("/")[0]
        data0 = z.read(f"{prefix}/data/0")
    with pytest.warns(UserWarning, match="Duplicate name"):
        rewrite(tmp_path / "a.bin", tmp_path / "dup.bin", add={f"{prefix}/data/0": b"\xff" * len(data0)})
    # Two entries of one name, two answers (the first by position, the last by name lookup):
    # no reader's choice is "right", so it is refused.
    with zipfile.ZipFile(tmp_path / "dup.bin") as z:
        dups = [i for i in z.infolist() if i.filename == f"{prefix}/data/0"]
        assert len(dups) == 2 and z.read(dups[0]) != z.read(dups[1])
    with pytest.raises(ww.HeaderError, match=r"dup\.bin.*twice"):
        ww.inspect(tmp_path / "dup.bin")
    rewrite(tmp_path / "a.bin", tmp_path / "two.bin", add={"other/data.pkl": b"\x80\x02}."})
    with pytest.raises(ww.HeaderError, match="several pickles"):
        ww.inspect(tmp_path / "two.bin")


def test_the_archive_folder_is_the_first_entrys_as_torch_has_it(tmp_path):
    real_checkpoint(tmp_path / "a.bin", SD)
    with zipfile.ZipFile(tmp_path / "a.bin") as z:
        names = z.namelist()
    prefix = names[0].split("/")[0]
    # Everything moved out of any folder: torch refuses, and so do we.
    rewrite(tmp_path / "a.bin", tmp_path / "flat.bin", rename={n: n.split("/", 1)[1] for n in names})
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        torch.load(tmp_path / "flat.bin", weights_only=True)
    with pytest.raises(ww.HeaderError, match="not in a folder"):
        ww.inspect(tmp_path / "flat.bin")
    # A renamed folder reads the same, as in torch.
    rewrite(tmp_path / "a.bin", tmp_path / "renamed.bin", rename={n: "zz/" + n.split("/", 1)[1] for n in names})
    assert torch.equal(torch.load(tmp_path / "renamed.bin", weights_only=True)["w"], SD["w"])
    ww.merge(tmp_path / "renamed.bin", [tmp_path / "a.bin"], tmp_path / "o.safetensors", method="task_arithmetic",
             lam=1.0)  # fmt: skip
    assert torch.equal(load(tmp_path / "o.safetensors")["w"], SD["w"])
    del prefix


def test_a_python_zipfile_checkpoint_with_comment_reads(tmp_path):
    # A stored archive with a trailing comment (which holds a fake end record) still reads.
    real_checkpoint(tmp_path / "a.bin", SD)
    buf = io.BytesIO((tmp_path / "a.bin").read_bytes())
    with zipfile.ZipFile(buf, "a") as z:
        z.comment = b"PK\x05\x06 not the end record"
    (tmp_path / "c.bin").write_bytes(buf.getvalue())
    assert sorted(t["name"] for t in ww.inspect(tmp_path / "c.bin")["tensors"]) == ["b", "w"]
