"""Per-model weights (SPEC: τ_t → w_t·τ_t in every method and in A*) and `linear`, the weighted
average of the fine-tunes, against the reference written from SPEC.md."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import weightweave as ww
from weightweave import reference as R
from weightweave.cli import main

from conftest import assert_close_ulp, load, make_state, rounding_slack, write_models

WEIGHTS = [0.5, -1.0, 2.0]


@pytest.fixture
def ck(tmp_path):
    base, models = make_state(21)
    bp, mps = write_models(tmp_path / "in", base, models)
    return base, models, bp, mps


@pytest.mark.parametrize("method", [m for m in ww.METHODS if m not in ww.SVD_METHODS] + ["tsv", "iso_c"])
@pytest.mark.parametrize("mode", ["merge", "weave"])
def test_weights_on_every_method(ck, tmp_path, method, mode):
    base, models, bp, mps = ck
    kw = {"device": "cpu"} if method in ww.SVD_METHODS else {}
    out = tmp_path / "o.safetensors"
    if mode == "merge":
        ww.merge(bp, mps, out, method=method, lam=0.8, weights=WEIGHTS, **kw)
        want = R.merge(base, models, method, 0.8, weights=WEIGHTS, **kw)
        lambdas = [0.8]
    else:
        ww.weave(bp, mps, out, method=method, weights=WEIGHTS, **kw)
        lambdas = ww.default_lambdas(method)
        want = R.weave(base, models, method, lambdas, weights=WEIGHTS, **kw)
    slack = rounding_slack(base, models, method, lambdas, weights=WEIGHTS, **kw)
    if method in ww.SVD_METHODS:
        slack = {n: s + 1e-4 for n, s in slack.items()}
    assert_close_ulp(load(out), want, atol=slack)


def test_linear_is_the_weighted_average_of_the_fine_tunes(ck, tmp_path):
    base, models, bp, mps = ck
    w = [1.0, 3.0, 0.5]
    ww.merge(bp, mps, tmp_path / "soup.safetensors", method="linear", weights=w)
    got = load(tmp_path / "soup.safetensors")
    for n, b in base.items():
        if not b.is_floating_point():
            continue
        avg = sum(wi * m[n].double() for wi, m in zip(w, models, strict=True)) / sum(w)
        assert torch.allclose(got[n].double(), avg, atol=float(b.abs().max()) * 2e-2 + 1e-3), n
    want = R.merge(base, models, "linear", 1.0, weights=w)
    assert_close_ulp(got, want, atol=rounding_slack(base, models, "linear", [1.0], weights=w))
    # normalize=False is the plain weighted sum.
    ww.merge(bp, mps, tmp_path / "sum.safetensors", method="linear", weights=w, normalize=False)
    want = R.merge(base, models, "linear", 1.0, weights=w, normalize=False)
    assert_close_ulp(load(tmp_path / "sum.safetensors"), want,
                     atol=rounding_slack(base, models, "linear", [1.0], weights=w, normalize=False))  # fmt: skip


def test_bad_weights(ck, tmp_path):
    base, models, bp, mps = ck
    for w, msg in [([1.0, 2.0], "2 weights for 3 fine-tuned models"), ([1, -1, 0], "sum to 0"),
                   (["a", 1, 1], r"weights\[0\]: expected a number"), ([1, 1e300, 1], "f32 range"),
                   (5, "sequence of numbers")]:  # fmt: skip
        with pytest.raises(ww.ParamError, match=msg):
            ww.merge(bp, mps, tmp_path / "o.safetensors", method="linear", weights=w)
    assert not (tmp_path / "o.safetensors").exists()


def test_weights_from_the_cli_and_arrays_and_recorded(ck, tmp_path, capsys):
    base, models, bp, mps = ck
    out = tmp_path / "c.safetensors"
    assert main(["merge", str(bp), *map(str, mps), "-o", str(out), "--method", "ties", "--weights", "0.5,-1,2",
                 "-q"]) == 0  # fmt: skip
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["weightweave.recipe"])["weights"] == WEIGHTS
    arrays = ww.merge_arrays(base, models, method="ties", weights=WEIGHTS)
    got = load(out)
    for n in base:
        assert torch.equal(arrays[n], got[n]), n
    assert main(["merge", str(bp), *map(str, mps), "-o", str(tmp_path / "x"), "--method", "ties", "--weights",
                 "1,x"]) == 1  # fmt: skip
    assert "--weights: cannot parse" in capsys.readouterr().err


def test_a_model_soup_needs_no_base(ck, tmp_path):
    base, models, bp, mps = ck
    w = [1.0, 3.0, 0.5]
    ww.merge(None, mps, tmp_path / "soup.safetensors", method="linear", weights=w)
    got = load(tmp_path / "soup.safetensors")
    for n, b in base.items():
        if b.is_floating_point():
            avg = sum(wi * m[n].double() for wi, m in zip(w, models, strict=True)) / sum(w)
            assert torch.allclose(got[n].double(), avg, atol=float(b.abs().max()) * 2e-2 + 1e-3), n
    with pytest.raises(ww.ParamError, match="base is required"):
        ww.merge(None, mps, tmp_path / "x.safetensors", method="ties")
    with pytest.raises(ww.ParamError, match="base is required"):
        ww.weave(None, mps, tmp_path / "x.safetensors", method="linear")
    assert not (tmp_path / "x.safetensors").exists()
