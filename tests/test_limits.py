"""Bounded resources and one error type: absurd requests are refused (or clamped) before any
work, every failure reachable from the API or the CLI is a WeaveError with a clear message."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch

import weightweave as ww
from weightweave import reference as R
from weightweave.api import parse_lambdas
from weightweave.cli import main

from conftest import assert_close_ulp, load, make_state, write_models


@pytest.fixture
def ck(tmp_path):
    base, models = make_state(6)
    return write_models(tmp_path / "in", base, models)


@pytest.mark.parametrize(
    ("spec", "want"),
    [("0.5:1.0:0.3", [0.5, 0.8]), ("0.1:0.3:0.1", [0.1, 0.2, 0.3]), ("1:1:0.5", [1.0]),
     ("0.2, 0.5,1", [0.2, 0.5, 1.0])],  # fmt: skip
)
def test_lambda_ranges_never_overshoot(spec, want):
    assert parse_lambdas(spec) == want


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0:1:1e-9", "more than the 1048576 allowed"),
        ("0:inf:1", "not finite"),
        ("1:0.1:0.1", "stop 0.1 is below start 1"),
        ("0:1:0", "step must be positive"),
        ("0:1", "3"),
        ("a,b", "cannot parse"),
        ("1,,2", "empty value"),
        ("0:1e39:1e38", "f32 range"),
        (5, "got int"),
        (["a"], r"lambdas\[0\]: expected a number"),
        ([True], "expected a number"),
    ],
)
def test_bad_lambdas_are_param_errors_before_any_work(spec, message):
    t0 = time.perf_counter()
    with pytest.raises(ww.ParamError, match=message):
        parse_lambdas(spec)
    assert time.perf_counter() - t0 < 5  # nothing huge was built (a generous bound, not a timing test)


def test_parameters_are_range_checked_against_f32(ck, tmp_path):
    bp, mps = ck
    for kw, msg in [({"lam": 1e300}, "lam: 1e.300 is beyond the f32 range"), ({"lam": float("nan")}, "not finite"),
                    ({"lam": "x"}, "lam must be a number"), ({"threads": 100_000}, "more than the 1024 allowed"),
                    ({"shard_size": 10**35}, "below 2\\^64"), ({"pool": 3}, "pool must be one of")]:  # fmt: skip
        with pytest.raises(ww.ParamError, match=msg):
            fn = ww.weave if "pool" in kw else ww.merge
            fn(bp, mps, tmp_path / "o", method="ties", **kw)
    assert not (tmp_path / "o").exists()


def test_threads_above_the_core_count_are_clamped(ck, tmp_path):
    bp, mps = ck
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    ww.weave(bp, mps, a, method="ties", threads=1000)
    ww.weave(bp, mps, b, method="ties", threads=1)
    assert a.read_bytes() == b.read_bytes()


def test_bytes_paths_work(ck, tmp_path):
    bp, mps = ck
    out = tmp_path / "o.safetensors"
    ww.merge(bytes(bp), [bytes(m) for m in mps], bytes(out), method="ties")
    assert out.exists()
    with pytest.raises(ww.ParamError, match="must be a path"):
        ww.merge(bp, mps, 42, method="ties")


def test_merged_values_beyond_f32_say_so(tmp_path):
    base = {"w": torch.full((4,), 3e38, dtype=torch.float32)}
    models = [{"w": torch.full((4,), 3.3e38, dtype=torch.float32)} for _ in range(2)]
    bp, mps = write_models(tmp_path / "big", base, models)
    with pytest.raises(ww.OutputError, match="exceed the f32 range of the arithmetic"):
        ww.merge(bp, mps, tmp_path / "o.safetensors", method="task_arithmetic", lam=1.0)
    # Within f32 but beyond bf16: a wider out_dtype helps, and the message says so.
    edge = {"w": torch.full((4,), 3.4e38, dtype=torch.float32)}
    bp, mps = write_models(tmp_path / "edge", edge, [edge])
    with pytest.raises(ww.OutputError, match="overflow BF16 .* wider out_dtype such as f32"):
        ww.merge(bp, mps, tmp_path / "o.safetensors", method="magmax", lam=0.1, out_dtype="bf16")
    assert not (tmp_path / "o.safetensors").exists()


def test_f64_values_beyond_f32_are_not_called_non_finite(tmp_path):
    base = {"w": torch.tensor([1.0, 1e300], dtype=torch.float64)}
    bp, mps = write_models(tmp_path, base, [base])
    with pytest.raises(ww.NonFiniteError, match=r"holds 1e300 at element 1, beyond the f32 range"):
        ww.merge(bp, mps, tmp_path / "o.safetensors", method="ties")


def test_svd_methods_check_inputs_before_torch(tmp_path):
    base, models = make_state(1, tasks=2)
    models[1]["layer.0.attn.weight"][3, 4] = float("nan")
    bp, mps = write_models(tmp_path / "in", base, models)
    for method in ("tsv", "iso_c"):
        bad = r"ft1.safetensors: tensor 'layer.0.attn.weight' holds a non-finite"
        with pytest.raises(ww.NonFiniteError, match=bad):
            ww.merge(bp, mps, tmp_path / "o.safetensors", method=method, device="cpu")
    with pytest.raises(ww.ParamError, match="'meta' is not supported"):
        ww.merge(bp, mps, tmp_path / "o.safetensors", method="tsv", device="meta")
    assert not (tmp_path / "o.safetensors").exists()


def test_meta_tensors_are_a_param_error():
    base = {"w": torch.zeros(3)}
    with pytest.raises(ww.ParamError, match="'w' on device meta cannot be read"):
        ww.merge_arrays(base, [{"w": torch.zeros(3, device="meta")}], method="ties")


def test_names_from_files_are_escaped_in_messages(tmp_path):
    name = "evil\n\x1b[31mname"
    text = json.dumps({name: {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)
    with pytest.raises(ww.HeaderError) as e:
        ww.inspect(p)
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg and "evil\\n\\u{1b}[31mname" in msg


def test_cli_prints_no_traceback(ck, tmp_path, capsys):
    bp, mps = ck
    args = ["merge", str(bp), *map(str, mps), "-o", str(tmp_path / "o"), "--method", "ties"]
    for extra in (["--shard-size", "100000000000000000000000TB"], ["--lam", "1e300"], ["--threads", "100000"],
                  ["--set", "density=7"]):  # fmt: skip
        assert main(args + extra) == 1, extra
        err = capsys.readouterr().err
        assert err.startswith("weightweave: error: ") and "Traceback" not in err, err
    assert main(["weave", *args[1:], "--lambdas", "1:0.1:0.1"]) == 1
    assert "stop 0.1 is below start 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # not a size at all: a usage error
        main(args + ["--shard-size", "1e23TB"])
    assert e.value.code == 2 and "not a size" in capsys.readouterr().err


def test_breadcrumbs_streams_rows_longer_than_a_chunk(tmp_path):
    """Rows longer than a chunk go through the streamed cuts; they must give exactly what
    ranking the whole row gives, ties at the cuts included (quantized values make many)."""
    g = torch.Generator().manual_seed(3)
    base = {"long": torch.randn(3, 5000, generator=g), "vec": torch.randn(7001, generator=g),
            "short": torch.randn(4, 30, generator=g)}  # fmt: skip
    models = [{k: v + torch.round(torch.randn(v.shape, generator=g) * 4) / 8 for k, v in base.items()}
              for _ in range(3)]  # fmt: skip
    bp, mps = write_models(tmp_path / "in", base, models)
    outs = []
    for chunk in (64, 1000, 1 << 16):
        out = tmp_path / f"o{chunk}.safetensors"
        ww.weave(bp, mps, out, method="breadcrumbs", density=0.3, gamma=0.05, chunk_size=chunk, threads=2)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    want = R.weave(base, models, "breadcrumbs", ww.default_lambdas("breadcrumbs"), density=0.3, gamma=0.05)
    from conftest import rounding_slack

    slack = rounding_slack(base, models, "breadcrumbs", ww.default_lambdas("breadcrumbs"), density=0.3, gamma=0.05)
    assert_close_ulp(load(tmp_path / "o64.safetensors"), want, atol=slack)
