"""``compat="mergekit"``: mergekit's semantics for the methods both tools have, against a reference
written from mergekit's rules (weightweave.reference_mergekit) and hand-worked cases. The
end-to-end comparison with the real mergekit is benches/mergekit_compare.py."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference_mergekit as MK

from conftest import assert_close_ulp, load, make_state, ulp, write_models

WEIGHTS = [1.0, 0.5, 0.3]
CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True}),
    ("ties", {"density": [0.5, 0.3, 0.7]}),
    ("ties", {"density": 0.2, "normalize": False, "rescale": True}),
    ("dare_ties", {"density": [0.6, 0.4, 0.9]}),
    ("dare_linear", {"density": 0.5}),
    ("dare_linear", {"density": 0.5, "rescale": False}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
    ("breadcrumbs", {"density": [0.9, 0.5, 0.3], "gamma": [0.2, 0.01, 0.0]}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": [0.1, 0.02, 0.0]}),
    ("linear", {}),
    ("linear", {"normalize": False}),
]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    # f32 everywhere: mergekit's own arithmetic is then the same, so results agree to rounding.
    base, models = make_state(41)
    base = {n: t.float() if t.is_floating_point() else t for n, t in base.items()}
    models = [{n: t.float() if t.is_floating_point() else t for n, t in m.items()} for m in models]
    bp, mps = write_models(tmp_path_factory.mktemp("in"), base, models)
    return base, models, bp, mps


def slack(base, models, got):
    """A few ulps of the largest weighted delta (the L1 rescale sums in f64 here, f32 there)."""
    out = {}
    for n, b in base.items():
        if not b.is_floating_point():
            continue
        top = max((m[n].double() - b.double()).abs().max() for m in models) * 4
        out[n] = 4 * ulp(torch.maximum(b.double().abs(), got[n].double().abs()), torch.float32) + top * 1e-6
    return out


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize("chunk", [None, 16])
def test_mergekit_methods_match_their_reference(ck, tmp_path, method, params, chunk):
    """chunk=16 streams every tensor longer than 16 elements in pieces (the cuts of a
    per-tensor magnitude sort then come from the statistics passes)."""
    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method=method, compat="mergekit", weights=WEIGHTS, seed=5, chunk_size=chunk, **params)
    got = load(out)
    want = MK.merge(base, models, method, WEIGHTS, seed=5, **params)
    assert_close_ulp(got, want, atol=slack(base, models, got))


def test_lambda_scales_the_mixed_delta(ck, tmp_path):
    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method="ties", compat="mergekit", lam=0.6, density=0.4, weights=WEIGHTS)
    got = load(out)
    assert_close_ulp(got, MK.merge(base, models, "ties", WEIGHTS, lam=0.6, density=0.4), atol=slack(base, models, got))


def test_hand_case_ties():
    """τ_1 = [1, −2, 3, 0], τ_2 = [2, 2, −1, 0], weights (1, 0.5), density 1: weighted sums
    [2, −1, 2.5, 0] elect [+, −, +, +]; kept: [1 and 1, −2, 3, none] ÷ Σ w kept
    [1.5, 1, 1, 1 (0 → 1)] = [4/3, −2, 3, 0]. With density 0.5 each keeps its 2 largest
    |τ|: [0, −2, 3, 0] and [2, 2, 0, 0] (ties to the earlier); weighted [0, −2, 3, 0],
    [1, 1, 0, 0] → sums [1, −1, 3, 0] elect [+, −, +, +] → [1/0.5, −2/1, 3/1, 0] = [2, −2, 3, 0]."""
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -2.0, 3.0, 0.0])}, {"w": torch.tensor([2.0, 2.0, -1.0, 0.0])}]
    got = ww.merge_arrays(base, models, method="ties", compat="mergekit", weights=[1.0, 0.5])
    assert torch.allclose(got["w"], torch.tensor([4 / 3, -2.0, 3.0, 0.0]))
    got = ww.merge_arrays(base, models, method="ties", compat="mergekit", weights=[1.0, 0.5], density=0.5)
    assert got["w"].tolist() == [2.0, -2.0, 3.0, 0.0]


def test_hand_case_breadcrumbs_drops_fewer_outliers_when_needed():
    """n = 10, density 0.8, gamma 0.3: mergekit keeps 8 and so drops only the 2 largest."""
    x = torch.tensor([10.0, -9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    got = ww.merge_arrays({"w": torch.zeros(10)}, [{"w": x}], method="breadcrumbs", compat="mergekit",
                          weights=[1.0], density=0.8, gamma=0.3)  # fmt: skip
    assert got["w"].tolist() == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


def test_linear_is_the_weighted_average_of_the_models_values(ck, tmp_path):
    """mergekit's linear averages θ_t, not θ_pre + the average delta: bit for bit Σ w θ / Σ w."""
    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method="linear", compat="mergekit", weights=WEIGHTS)
    got, want = load(out), MK.linear(models, WEIGHTS, True, base)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_weave_runs_mergekit_methods(ck, tmp_path):
    from weightweave import reference as R

    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    grid = {"density": [0.3, 0.6], "lam": [0.5, 1.0]}
    ww.weave(bp, mps, out, method="ties", compat="mergekit", search=grid, weights=WEIGHTS)

    def merged(ws, ps):
        return MK.merged(base, models, "ties", ws, **ps)

    want = R.weave(base, models, "ties", search=grid, weights=WEIGHTS, merged=merged)
    got = load(out)
    assert_close_ulp(got, want, atol=slack(base, models, got))


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"method": "magmax"}, "unknown method 'magmax'"),
        ({"method": "ties", "scope": "tensor"}, "scope"),
        ({"method": "ties", "density": 1.5}, "density"),
        ({"method": "ties", "compat": "other"}, "compat"),
    ],
)
def test_mergekit_refusals(ck, tmp_path, kw, msg):
    _, _, bp, mps = ck
    kw = {"compat": "mergekit", **kw}
    with pytest.raises(ww.ParamError, match=msg):
        ww.merge(bp, mps, tmp_path / "o.safetensors", **kw)
    assert not (tmp_path / "o.safetensors").exists()
