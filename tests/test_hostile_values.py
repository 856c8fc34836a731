"""Inputs that used to merge silently wrong: an FP8 scale beyond its own dtype, scaled and
unscaled FP8 codes mixed, big-endian arrays, colliding tensor names, lazily negated tensors, a
search whose record would not fit a header, a header past what safetensors opens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import weightweave as ww
from weightweave import _st

from conftest import load


def fp8_scaled(tmp_path, scale_dtype, values):
    """A per-tensor scaled FP8 weight (codes 1.0 with the given scale) as base and fine-tunes."""
    paths = []
    for i, v in enumerate(values):
        q = torch.full((4, 4), 1.0).to(torch.float8_e4m3fn)
        p = tmp_path / f"m{i}.safetensors"
        save_file({"w.weight": q, "w.weight_scale": torch.tensor(v, dtype=scale_dtype)}, str(p))
        paths.append(p)
    return paths


def test_a_requantized_scale_beyond_its_dtype_is_an_error(tmp_path):
    # base 60000 per code, fine-tune 65000: θ = 60000 + 10·5000 = 110 000 per element needs
    # a scale of 110 000 / 448 = 245, which f16 holds; λ = 6000 needs 3.006e7 / 448 > 65504.
    base, ft = fp8_scaled(tmp_path, torch.float16, [60000.0, 65000.0])
    ww.merge(base, [ft], tmp_path / "ok.safetensors", method="task_arithmetic", lam=10.0)
    got = load(tmp_path / "ok.safetensors")
    deq = got["w.weight"].float() * got["w.weight_scale"].float()
    assert torch.isfinite(got["w.weight_scale"].float()).all()
    assert torch.allclose(deq, torch.full((4, 4), 110000.0), rtol=0.07)
    with pytest.raises(ww.WeaveError, match=r"w\.weight_scale.*need an FP8 scale above the largest F16"):
        ww.merge(base, [ft], tmp_path / "bad.safetensors", method="task_arithmetic", lam=6000.0)
    assert not (tmp_path / "bad.safetensors").exists()
    # Dequantized output has no scale to overflow.
    ww.merge(base, [ft], tmp_path / "f32.safetensors", method="task_arithmetic", lam=6000.0, out_dtype="f32")


@pytest.mark.parametrize("which", ["base", "fine-tune"])
def test_scaled_and_unscaled_fp8_do_not_mix(tmp_path, which):
    scaled = {"w.weight": torch.ones(4, 4).to(torch.float8_e4m3fn), "w.weight_scale": torch.tensor(0.5)}
    plain = {"w.weight": torch.ones(4, 4).to(torch.float8_e4m3fn)}
    a, b = (scaled, plain) if which == "base" else (plain, scaled)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    with pytest.raises(ww.WeaveError, match=r"w\.weight.*without a scale.*w\.weight_scale"):
        ww.merge(tmp_path / "a.safetensors", [tmp_path / "b.safetensors"], tmp_path / "o.safetensors",
                 method="task_arithmetic", out_dtype="f32")  # fmt: skip
    assert not (tmp_path / "o.safetensors").exists()


def test_big_endian_arrays_are_read_as_their_values():
    got = ww.merge_arrays({"w": np.array([1, 2, 3], ">f4")}, [{"w": np.array([2, 4, 6], ">f4")}],
                          method="task_arithmetic", lam=1.0)  # fmt: skip
    np.testing.assert_array_equal(got["w"], np.array([2, 4, 6], np.float32))
    got = ww.merge_arrays({"w": np.array([1.5], ">f8")}, [{"w": np.array([2.5], "<f8")}], method="linear")
    np.testing.assert_array_equal(got["w"], np.array([2.5]))


def test_names_must_be_strings_so_none_collide():
    with pytest.raises(ww.ParamError, match="names must be strings"):
        sd = {1: np.ones(2, np.float32), "1": np.zeros(2, np.float32)}
        ww.merge_arrays(sd, [sd], method="task_arithmetic")


def test_lazy_negation_and_quantized_tensors():
    base = {"w": torch.zeros(3)}
    got = ww.merge_arrays(base, [{"w": torch.ones(3)._neg_view()}], method="task_arithmetic", lam=1.0)
    assert torch.equal(got["w"], -torch.ones(3))
    with pytest.warns(UserWarning):  # torch deprecates creating quantized tensors
        q = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
    with pytest.raises(ww.ParamError, match="quantized"):
        ww.merge_arrays({"w": q}, [{"w": q}], method="task_arithmetic")


def test_a_long_search_is_recorded_by_count_and_digest(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}.safetensors")
        _st.save({"w": ("F32", rng.standard_normal(64, dtype=np.float32))}, paths[-1])
    points = [{"lam": 0.1 + i * 1e-6} for i in range(200_000)]
    out = tmp_path / "o.safetensors"
    ww.weave(paths[0], paths[1:], out, method="task_arithmetic", search=points)
    with safe_open(str(out), "pt") as f:  # the safetensors library opens it
        rec = json.loads(f.metadata()["weightweave.recipe"])
    assert rec["points"]["count"] == 200_000 and len(rec["points"]["fnv1a64"]) == 16
    assert out.stat().st_size < 1 << 20
    ww.weave(paths[0], paths[1:], tmp_path / "o2.safetensors", method="task_arithmetic", search=points[:-1])
    with safe_open(str(tmp_path / "o2.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["weightweave.recipe"])["points"]["fnv1a64"] != rec["points"]["fnv1a64"]
    # A short one is kept in full.
    ww.weave(paths[0], paths[1:], tmp_path / "o3.safetensors", method="task_arithmetic", search=points[:3])
    with safe_open(str(tmp_path / "o3.safetensors"), "pt") as f:
        assert len(json.loads(f.metadata()["weightweave.recipe"])["points"]) == 3


def test_an_output_header_safetensors_cannot_open_is_refused_before_work(tmp_path):
    base = tmp_path / "base.safetensors"
    _st.save({"w": ("F32", np.zeros(4, np.float32))}, base, metadata={"big": "x" * 100_000_000})
    ww.inspect(base)  # weightweave reads it (under its 100 MiB limit)
    with pytest.raises(ww.OutputError, match="header would be .* bytes, more than the 100000000"):
        ww.merge(base, [base], tmp_path / "o.safetensors", method="task_arithmetic")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.fixture
def small(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        _st.save({"w": ("F32", rng.standard_normal((8, 16), dtype=np.float32))}, paths[-1])
    return paths


def test_a_mount_point_output_is_refused_before_work(small, tmp_path):
    import subprocess

    target = tmp_path / "out"
    target.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "none", str(target)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here: {r.stderr.decode().strip()}")
    try:
        calls = []
        with pytest.raises(ww.OutputError, match="is a mount point"):
            ww.merge(small[0], small[1:], target, method="ties", progress=lambda d, t: calls.append(d))
        assert calls == []  # before any work
        # A bind mount of the same file system too.
        subprocess.run(["umount", str(target)], check=True)
        subprocess.run(["mount", "--bind", str(target), str(target)], check=True)
        with pytest.raises(ww.OutputError, match="is a mount point"):
            ww.merge(small[0], small[1:], target, method="ties")
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "pcb"])
def test_thousands_of_distinct_statistics_are_a_param_error_before_work(small, tmp_path, method):
    key = "ratio" if method == "pcb" else "density"
    values = [round(0.01 + i * 0.0003, 6) for i in range(3000)]
    with pytest.raises(ww.ParamError, match="3000 distinct parameter sets.*at most 64"):
        ww.weave(small[0], small[1:], tmp_path / "o.safetensors", method=method, search={key: values, "lam": [1.0]})
    assert not (tmp_path / "o.safetensors").exists()
    # 64 are gathered, with the same statistics as separate merges (the grid test elsewhere
    # checks the values; here that the limit is not below it).
    ww.weave(small[0], small[1:], tmp_path / "o.safetensors", method=method, search={key: values[:64], "lam": [1.0]})


def test_a_large_grid_is_planned_in_linear_time(small, tmp_path):
    """512 × 512 Breadcrumbs parameter sets: found distinct by hashing (it took minutes when each
    point scanned every set found so far). Run on a 128-element model it plans and finishes
    (values of grids are checked against the reference in test_search.py)."""
    grid = {"density": [round(0.1 + i / 1024, 6) for i in range(512)],
            "gamma": [round(0.001 + i / 10240, 6) for i in range(512)], "lam": [1.0]}  # fmt: skip
    out = tmp_path / "o.safetensors"
    ww.weave(small[0], small[1:], out, method="breadcrumbs", search=grid, pool="magmax", include_deltas=False)
    assert load(out)["w"].shape == (8, 16)


def test_svd_exclude_runs_in_linear_time(small, tmp_path):
    pytest.importorskip("torch")
    names = ["a" * 28 + "!"]
    from weightweave import _rust

    # '(a+)+$' backtracks exponentially in Python's re on this name; here it is matched at once.
    assert _rust.names_matching("svd_exclude", "(a+)+$", names) == [False]
    assert _rust.names_matching("svd_exclude", "a!$", names) == [True]
    with pytest.raises(ww.ParamError, match="svd_exclude.*linear time"):
        ww.merge(small[0], small[1:], tmp_path / "o.safetensors", method="tsv", svd_exclude="(?<=a)b")


def test_false_words_never_mean_true_in_the_api(small, tmp_path):
    out = tmp_path / "o.safetensors"
    ww.merge(small[0], small[1:], out, method="ties")
    before = out.read_bytes()
    with pytest.raises(ww.OutputError, match="already exists"):
        ww.merge(small[0], small[1:], out, method="ties", lam=0.5, overwrite="false")
    assert out.read_bytes() == before  # the earlier output was not replaced
    ww.merge(small[0], small[1:], out, method="ties", lam=0.5, overwrite="true")
    assert out.read_bytes() != before
    for bad in (np.array([True, False]), "maybe", 2):
        with pytest.raises(ww.ParamError, match="overwrite must be True or False"):
            ww.merge(small[0], small[1:], out, method="ties", overwrite=bad)


def test_a_pool_returning_nan_is_named_as_such(small, tmp_path):
    with pytest.raises(ww.WeaveError, match="returned NaN at column 0: a pool must return finite values"):
        ww.weave(small[0], small[1:], tmp_path / "o.safetensors", method="ties",
                 pool=lambda a: np.full(a.shape[1], np.nan, np.float32))  # fmt: skip
    assert not (tmp_path / "o.safetensors").exists()
