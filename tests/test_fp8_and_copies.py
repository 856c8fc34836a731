"""FP8 checkpoints are merged like every float (they used to be copied from the base without a
word); weights stored in forms we cannot dequantize are refused; integer tensors that differ
between models are copied from the base and said so."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference as R
from weightweave.cli import main

from conftest import assert_close_ulp, load, rounding_slack, ulp, write_models

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_state(dtype, seed=0, tasks=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (33, 16), "b.weight": (40,), "c.bias": (7,)}
    base = {n: (torch.randn(s, generator=g) * 0.5).to(dtype) for n, s in shapes.items()}
    base["ids"] = torch.arange(5)
    models = []
    for _ in range(tasks):
        m = {n: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in base.items() if n != "ids"}
        m["ids"] = base["ids"].clone()
        models.append(m)
    return base, models


CASES = [("task_arithmetic", "merge"), ("ties", "weave"), ("magmax", "weave"), ("dare", "merge"),
         ("breadcrumbs", "weave"), ("pcb", "merge")]  # fmt: skip


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize(("method", "mode"), CASES)
def test_fp8_is_merged_like_every_float(tmp_path, dtype, method, mode):
    base, models = fp8_state(dtype)
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "o.safetensors"
    params = {"gamma": 0.05} if method == "breadcrumbs" else {}
    if mode == "merge":
        ww.merge(bp, mps, out, method=method, lam=0.7, **params)
        want = R.merge(base, models, method, 0.7, **params)
        lambdas = [0.7]
    else:
        ww.weave(bp, mps, out, method=method, **params)
        lambdas = ww.default_lambdas(method)
        want = R.weave(base, models, method, lambdas, **params)
    got = load(out)
    assert got["a.weight"].dtype == dtype
    assert not torch.equal(got["a.weight"].view(torch.uint8), base["a.weight"].view(torch.uint8))
    assert_close_ulp(got, want, atol=rounding_slack(base, models, method, lambdas, **params))


def test_fp8_out_dtype_and_overflow(tmp_path):
    base, models = fp8_state(torch.float8_e4m3fn)
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method="task_arithmetic", out_dtype="bf16")
    want = R.merge(base, models, "task_arithmetic", 0.3, out_dtype="bf16")
    assert_close_ulp(load(out), want, atol=rounding_slack(base, models, "task_arithmetic", [0.3]))
    with pytest.raises(ww.OutputError, match=r"overflow F8_E4M3 \(largest F8_E4M3 is 4.48e2\)"):
        ww.merge(bp, mps, tmp_path / "big.safetensors", method="task_arithmetic", lam=3000.0)


def test_fp8_cli_no_longer_writes_the_base(tmp_path, capsys):
    base, models = fp8_state(torch.float8_e4m3fn)
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(bp), *map(str, mps), "-o", str(out), "--method", "task_arithmetic", "-q"]) == 0
    want = R.merge(base, models, "task_arithmetic", 0.3)
    assert_close_ulp(load(out), want, atol=rounding_slack(base, models, "task_arithmetic", [0.3]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"a.weight_scale": torch.ones(5)}, "fits no known layout"),
        ({"q.qweight": torch.zeros(4, 2, dtype=torch.int32)}, "GPTQ/AWQ packed integer weights"),
        ({"q.weight.absmax": torch.ones(3)}, "bitsandbytes 4-bit weights"),
        ({"q.weight.SCB": torch.ones(3)}, "bitsandbytes 8-bit weights"),
    ],
)
def test_quantized_checkpoints_are_refused_by_name(tmp_path, extra, message):
    base, models = fp8_state(torch.float8_e4m3fn, tasks=1)
    base.update(extra)
    models[0].update(extra)
    bp, mps = write_models(tmp_path / "in", base, models)
    with pytest.raises(ww.HeaderError, match=message) as e:
        ww.merge(bp, mps, tmp_path / "o.safetensors", method="task_arithmetic")
    assert "a.weight" in str(e.value) or next(iter(extra)) in str(e.value)
    assert "base.safetensors" in str(e.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_differing_integer_tensors_are_copied_and_reported(tmp_path, capsys):
    base, models = fp8_state(torch.float8_e5m2)
    models[1]["ids"] = base["ids"] + 1
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "o.safetensors"
    with pytest.warns(ww.CopiedTensorsWarning, match=r"1 integer/bool tensor\(s\) differ .*: ids"):
        rep = ww.merge(bp, mps, out, method="ties")
    assert rep.differing == ["ids"]
    assert torch.equal(load(out)["ids"], base["ids"])
    with pytest.warns(ww.CopiedTensorsWarning, match="ids"):
        ww.merge_arrays(base, models, method="ties")
    assert main(["merge", str(bp), *map(str, mps), "-o", str(tmp_path / "c.safetensors"), "--method", "ties"]) == 0
    err = capsys.readouterr().err
    assert err.count("weightweave: warning: 1 integer/bool tensor(s) differ") == 1
    # Identical integer tensors: no warning at all (filterwarnings = error would fail the test).
    base, models = fp8_state(torch.float8_e5m2)
    assert ww.merge_arrays(base, models, method="ties")["ids"].equal(base["ids"])


def scaled_model(seed, block=(128, 128), layout="block"):
    """A DeepSeek-style FP8 checkpoint (codes + scales) and the f32 weights it stands for."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(200, 300, generator=g)
    if layout == "block":
        sr, sc = -(-200 // block[0]), -(-300 // block[1])
        scale = torch.rand(sr, sc, generator=g) * 0.01 + 0.002
        full = scale.repeat_interleave(block[0], 0)[:200].repeat_interleave(block[1], 1)[:, :300]
        key = "w.weight_scale_inv"
    elif layout == "row":
        scale = torch.rand(200, 1, generator=g) * 0.01 + 0.002
        full, key = scale.expand(200, 300), "w.weight_scale"
    else:
        scale = torch.tensor(0.004)
        full, key = scale.expand(200, 300), "w.weight_scale"
    q = (w / full).to(torch.float8_e4m3fn)
    stored = {"w.weight": q, key: scale, "norm.weight": torch.randn(300, generator=g)}
    dense = {"w.weight": q.float() * full, "norm.weight": stored["norm.weight"]}
    return stored, dense


def write_scaled(tmp_path, layout):
    """A base dir (with an FP8 quantization_config) and two fine-tune files of scaled FP8."""
    import json

    from safetensors.torch import save_file

    block = (64, 64) if layout == "block" else (128, 128)
    models = [scaled_model(s, block, layout) for s in range(3)]
    d = tmp_path / "base"
    d.mkdir()
    save_file(models[0][0], str(d / "model.safetensors"))
    cfg = {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    (d / "config.json").write_text(json.dumps(cfg))
    fts = []
    for i, (stored, _) in enumerate(models[1:]):
        fts.append(tmp_path / f"ft{i}.safetensors")
        save_file(stored, str(fts[-1]))
    return d, fts, models, block


@pytest.mark.parametrize("layout", ["block", "row", "tensor"])
def test_scaled_fp8_is_dequantized_with_its_scales(tmp_path, layout):
    import json

    d, fts, models, _ = write_scaled(tmp_path, layout)
    out = tmp_path / "out"
    ww.merge(d, fts, out, method="ties", out_dtype="bf16")
    got = load(out)
    assert sorted(got) == ["norm.weight", "w.weight"] and got["w.weight"].dtype == torch.bfloat16
    dense = [m[1] for m in models]
    want = R.merge(dense[0], dense[1:], "ties", 1.0, out_dtype="bf16")
    assert_close_ulp(got, want, atol=rounding_slack(dense[0], dense[1:], "ties", [1.0]))
    cfg_out = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg_out and cfg_out["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("layout", ["block", "row", "tensor"])
@pytest.mark.parametrize("mode", ["merge", "weave"])
def test_scaled_fp8_is_written_requantized_with_fresh_scales(tmp_path, layout, mode):
    """Without out_dtype the merged weight goes back to FP8 codes with fresh scales in the same
    layout (s = the block's largest |value| / 448), and the config keeps its quantization."""
    import json

    d, fts, models, block = write_scaled(tmp_path, layout)
    out = tmp_path / "out"
    dense = [m[1] for m in models]
    if mode == "merge":
        rep = ww.merge(d, fts, out, method="ties", lam=0.7)
        want = R.merge(dense[0], dense[1:], "ties", 0.7, out_dtype="f32")
    else:
        rep = ww.weave(d, fts, out, method="ties", search={"lam": [0.5, 1.0], "density": [0.2, 0.5]}, pool="magmax")
        want = R.weave(dense[0], dense[1:], "ties", search={"lam": [0.5, 1.0], "density": [0.2, 0.5]},
                       pool="magmax", out_dtype="f32")  # fmt: skip
    got = load(out)
    key = next(k for k in models[0][0] if k.startswith("w.weight_"))
    assert sorted(got) == sorted(models[0][0])
    assert got["w.weight"].dtype == torch.float8_e4m3fn
    assert got[key].dtype == models[0][0][key].dtype and got[key].shape == models[0][0][key].shape
    scale = got[key].float()
    rows, cols = 200, 300
    if layout == "block":
        full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    else:
        full = scale.reshape(-1, 1).expand(rows, cols) if scale.dim() else scale.expand(rows, cols)
    q = got["w.weight"].float()
    assert q.abs().max() <= 448
    # Every block's largest code is at (or, rounded, next to) the top of the FP8 range.
    assert q.abs().max() >= 416
    deq = q * full
    w = want["w.weight"]
    # E4M3 keeps 3 mantissa bits: within half a code step of the exact merged value.
    step = ulp(w.double().abs() / full.double(), torch.float8_e4m3fn) * full.double()
    assert ((deq.double() - w.double()).abs() <= step / 2 + 1e-6).all()
    assert_close_ulp({"n": got["norm.weight"]}, {"n": want["norm.weight"]}, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert rep.outputs
