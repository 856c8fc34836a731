"""Bad input: a WeaveError naming the file and tensor, nothing left behind, inputs unchanged."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import weightweave as ww

from conftest import digest, make_state, tree, write_models


def corrupt(path: Path, header: dict | None = None, raw: bytes | None = None, data: bytes = b"") -> Path:
    if raw is None:
        text = json.dumps(header).encode()
        raw = struct.pack("<Q", len(text)) + text + data
    path.write_bytes(raw)
    return path


def f32_header(**entries):
    return {k: {"dtype": v[0], "shape": v[1], "data_offsets": v[2]} for k, v in entries.items()}


BAD_FILES = {
    "truncated": lambda p: corrupt(p, raw=b"\x10\x00"),
    "absurd-header-length": lambda p: corrupt(p, raw=struct.pack("<Q", 1 << 60) + b"{}"),
    "bad-json": lambda p: corrupt(p, raw=struct.pack("<Q", 5) + b"{nope"),
    "offset-out-of-range": lambda p: corrupt(p, f32_header(w=("F32", [4], [0, 16])), data=b"\0" * 8),
    "overlap": lambda p: corrupt(p, f32_header(w=("F32", [2], [0, 8]), v=("F32", [2], [4, 12])), data=b"\0" * 12),
    "unknown-dtype": lambda p: corrupt(p, f32_header(w=("Q7", [2], [0, 8])), data=b"\0" * 8),
    "size-mismatch": lambda p: corrupt(p, f32_header(w=("F32", [3], [0, 8])), data=b"\0" * 8),
}


@pytest.fixture
def setup(tmp_path):
    base, models = make_state(4)
    bp, mps = write_models(tmp_path / "in", base, models)
    before = {p: digest(p) for p in [bp, *mps]}
    return tmp_path, base, models, bp, mps, before


def check_clean(tmp_path: Path, out: Path, before: dict):
    assert not out.exists()
    leftovers = [p for p in tree(tmp_path) if "weightweave" in p or p.endswith(".tmp")]
    assert leftovers == []
    for p, d in before.items():
        assert digest(p) == d, f"input {p} changed"


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_malformed_model_file(setup, kind):
    tmp_path, _, _, bp, mps, before = setup
    bad = BAD_FILES[kind](tmp_path / "in" / "bad.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(ww.HeaderError) as e:
        ww.merge(bp, [mps[0], bad], out, method="ties")
    assert "bad.safetensors" in str(e.value)
    if kind not in ("truncated", "absurd-header-length", "bad-json"):
        assert "'w'" in str(e.value) or "'v'" in str(e.value)
    check_clean(tmp_path, out, before)


def mutate(tmp_path, base, fn, name="ft-bad.safetensors"):
    m = {k: v.clone() for k, v in base.items()}
    fn(m)
    p = tmp_path / "in" / name
    save_file(m, str(p))
    return p


MISMATCHES = {
    "shape": (lambda m: m.__setitem__("bias", torch.zeros(18, dtype=torch.bfloat16)), ww.MismatchError, "bias"),
    "dtype": (lambda m: m.__setitem__("bias", torch.zeros(17, dtype=torch.int32)), ww.MismatchError, "bias"),
    "missing": (lambda m: m.pop("scale"), ww.MismatchError, "scale"),
    "extra": (lambda m: m.__setitem__("new.weight", torch.zeros(2)), ww.MismatchError, "new.weight"),
    "nan": (
        lambda m: m["layer.0.mlp.weight"].view(-1).__setitem__(5, float("nan")),
        ww.NonFiniteError,
        "layer.0.mlp.weight",
    ),
    "inf": (lambda m: m["emb.weight"].view(-1).__setitem__(100, float("inf")), ww.NonFiniteError, "emb.weight"),
}


@pytest.mark.parametrize("kind", sorted(MISMATCHES))
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_mismatched_models(setup, kind, method):
    tmp_path, base, _, bp, mps, before = setup
    fn, exc, tensor = MISMATCHES[kind]
    bad = mutate(tmp_path, base, fn)
    out = tmp_path / "out"
    with pytest.raises(exc) as e:
        ww.weave(bp, [mps[0], bad], out, method=method)
    assert "ft-bad.safetensors" in str(e.value) and tensor in str(e.value)
    check_clean(tmp_path, out, before)


def test_missing_file(setup):
    tmp_path, _, _, bp, mps, before = setup
    out = tmp_path / "o.safetensors"
    with pytest.raises(ww.WeaveIOError, match="nope.safetensors"):
        ww.merge(bp, [tmp_path / "nope.safetensors"], out, method="magmax")
    check_clean(tmp_path, out, before)


def test_output_onto_input_is_refused(setup):
    tmp_path, _, _, bp, mps, before = setup
    for target in (mps[1], bp):
        with pytest.raises(ww.OutputError, match="input"):
            ww.merge(bp, mps, target, method="task_arithmetic")
    check_clean(tmp_path, tmp_path / "none", before)


def test_output_dir_onto_input_dir_is_refused(tmp_path):
    base, models = make_state(5)
    d = tmp_path / "base"
    d.mkdir()
    save_file(base, str(d / "model.safetensors"))
    _, mps = write_models(tmp_path / "in", base, models)
    with pytest.raises(ww.OutputError):
        ww.merge(d, mps, d, method="magmax")


BAD_PARAMS = [
    dict(method="nope"),
    dict(method="ties", density=0.0),
    dict(method="ties", density=1.5),
    dict(method="ties", scope="row"),
    dict(method="dare", density=-0.1),
    dict(method="dare", gamma=0.1),
    dict(method="breadcrumbs", density=0.9, gamma=0.2),
    dict(method="pcb", ratio=2.0),
    dict(method="task_arithmetic", lam=float("nan")),
    dict(method="task_arithmetic", threads=0),
    dict(method="task_arithmetic", chunk_size=-1),
    dict(method="task_arithmetic", out_dtype="int8"),
]


@pytest.mark.parametrize("kw", BAD_PARAMS, ids=[str(sorted(k.items())) for k in BAD_PARAMS])
def test_bad_parameters(setup, kw):
    tmp_path, _, _, bp, mps, before = setup
    out = tmp_path / "o.safetensors"
    with pytest.raises(ww.ParamError):
        ww.merge(bp, mps, out, **kw)
    check_clean(tmp_path, out, before)


@pytest.mark.parametrize("kw", [dict(lambdas=[]), dict(lambdas=[1.0, 0.5]), dict(lambdas="1:x"), dict(pool="median")])
def test_bad_weave_options(setup, kw):
    tmp_path, _, _, bp, mps, before = setup
    out = tmp_path / "o.safetensors"
    with pytest.raises(ww.ParamError):
        ww.weave(bp, mps, out, method="ties", **kw)
    check_clean(tmp_path, out, before)


def test_no_models(setup):
    tmp_path, _, _, bp, _, _ = setup
    with pytest.raises(ww.ParamError):
        ww.merge(bp, [], tmp_path / "o.safetensors", method="ties")
    with pytest.raises(ww.ParamError):
        ww.merge(bp, bp, tmp_path / "o.safetensors", method="ties")


def test_every_error_is_a_weave_error():
    for cls in (
        ww.HeaderError,
        ww.MismatchError,
        ww.NonFiniteError,
        ww.ParamError,
        ww.OutputError,
        ww.WeaveIOError,
        ww.CancelledError,
    ):
        assert issubclass(cls, ww.WeaveError)


@pytest.mark.parametrize(("out_dtype", "value"), [("f16", 70000.0), ("bf16", 3.40e38)])
def test_output_overflow_is_an_error(tmp_path, out_dtype, value):
    base = {"w": torch.full((8,), value / 2), "v": torch.zeros(3)}
    models = [{"w": torch.full((8,), value), "v": torch.zeros(3)}]
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "o.safetensors"
    with pytest.raises(ww.OutputError, match="'w'.*overflow"):
        ww.merge(bp, mps, out, method="task_arithmetic", lam=1.0, out_dtype=out_dtype)
    assert not out.exists()
    ww.merge(bp, mps, out, method="task_arithmetic", lam=1.0, out_dtype="f32")  # fits in f32
