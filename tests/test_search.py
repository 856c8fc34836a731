"""Search spaces over any parameter, per-model densities and function pools (SPEC: "Recipes beyond
one scalar λ"), against the reference written from SPEC.md and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightweave as ww
from weightweave import reference as R

from conftest import assert_close_ulp, digest, load, make_state, tree, ulp, write_models


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    base, models = make_state(31)
    bp, mps = write_models(tmp_path_factory.mktemp("in"), base, models)
    return base, models, bp, mps


def slack(base, models, method, points, weights=None, **params):
    """2 f32 ulps of the largest member of A* per element: the pooled sums round differently."""
    tvs = R.task_vectors(base, models, weights)
    out = {}
    for pt in points:
        ps = {**params, **{k: v for k, v in pt.items() if k not in ("lam", "weights")}}
        m = R.merged_task_vector(base, models, method, 0, pt.get("weights", weights), **ps)
        for n, mn in m.items():
            s = abs(pt["lam"]) * mn.abs().double()
            for tv in tvs:
                s = torch.maximum(s, tv[n].abs().double())
            out[n] = torch.maximum(out.get(n, s), s)
    return {n: 2 * ulp(s, torch.float32) + (1e-7 if method == "pcb" else 0.0) for n, s in out.items()}


PER_MODEL = [
    ("dare", {"density": [0.3, 0.6, 0.9]}),
    ("ties", {"density": [0.1, 0.5, 0.9]}),
    ("dare_ties", {"density": [0.4, 0.7, 1.0], "ties_density": [0.2, 0.3, 0.6]}),
    ("breadcrumbs", {"density": [0.2, 0.5, 0.7], "gamma": [0.0, 0.1, 0.05]}),
]


@pytest.mark.parametrize(("method", "params"), PER_MODEL)
def test_per_model_parameters(ck, tmp_path, method, params):
    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method=method, lam=0.7, **params)
    want = R.merge(base, models, method, 0.7, **params)
    assert_close_ulp(load(out), want, atol=slack(base, models, method, [{"lam": 0.7}], **params))
    # A list of one value per model equal to a scalar is that scalar.
    same = {k: v[0] for k, v in params.items()}
    ww.merge(bp, mps, tmp_path / "a.safetensors", method=method, lam=0.7, **same)
    ww.merge(bp, mps, tmp_path / "b.safetensors", method=method, lam=0.7, **{k: [v] * 3 for k, v in same.items()})
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


GRIDS = [
    ("ties", {"density": [0.1, 0.3, 0.6], "lam": [0.5, 1.0, 1.5]}),
    ("dare", {"lam": [0.2, 0.9], "density": [0.3, 0.8]}),
    ("breadcrumbs", {"density": [0.2, 0.5], "gamma": [0.0, 0.1], "lam": [0.4, 1.0]}),
    ("pcb", {"ratio": [0.05, 0.3], "lam": [0.5, 2.0]}),
    ("dare_ties", {"ties_density": [0.2, 0.5], "lam": [0.3, 1.2]}),
    ("task_arithmetic", {"weights": [[1.0, 0.5, 0.0], [0.2, 0.2, 0.2]], "lam": [0.3, 1.0]}),
]


@pytest.mark.parametrize(("method", "grid"), GRIDS)
@pytest.mark.parametrize("pool", ["mean", "random", "magmax"])
@pytest.mark.parametrize("include_deltas", [True, False])
def test_grids_against_the_reference(ck, tmp_path, method, grid, pool, include_deltas):
    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    rep = ww.weave(bp, mps, out, method=method, search=grid, pool=pool, include_deltas=include_deltas, seed=3)
    want = R.weave(base, models, method, search=grid, pool=pool, include_deltas=include_deltas, seed=3)
    points = R.search_points(method, None, grid)
    assert_close_ulp(load(out), want, atol=slack(base, models, method, points))
    assert rep.outputs


def test_explicit_points_with_their_own_weights(ck, tmp_path):
    base, models, bp, mps = ck
    points = [
        {"lam": 0.5, "density": 0.2},
        {"lam": 1.0, "density": 0.2, "weights": [1.0, 2.0, 0.5]},
        {"lam": 0.7, "density": [0.1, 0.4, 0.8]},
        {"lam": -0.3, "density": 0.9},
    ]
    for pool in ("mean", "magmax", "random"):
        out = tmp_path / f"{pool}.safetensors"
        ww.weave(bp, mps, out, method="ties", search=points, pool=pool, weights=[0.5, 1.0, 1.5])
        want = R.weave(base, models, "ties", search=points, pool=pool, weights=[0.5, 1.0, 1.5])
        assert_close_ulp(load(out), want, atol=slack(base, models, "ties", points, weights=[0.5, 1.0, 1.5]))


def test_hand_checkable_grid():
    """T = 2, τ_1 = [1, −2, 3, 0], τ_2 = [2, 2, −1, 0], task arithmetic, points
    (λ = 0.5, weights (1, 1)) and (λ = 1, weights (1, 0)): M_1 = [3, 0, 2, 0], M_2 = τ_1.
    Mean with deltas: N = 4, P = ([3, 0, 2, 0] + [1.5, 0, 1, 0] + [1, −2, 3, 0]) / 4
    = [1.375, −0.5, 1.5, 0]; magmax over the members [1, −2, 3, 0], [2, 2, −1, 0],
    [1.5, 0, 1, 0], [1, −2, 3, 0], the later one on ties: [2, −2, 3, 0]."""
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -2.0, 3.0, 0.0])}, {"w": torch.tensor([2.0, 2.0, -1.0, 0.0])}]
    points = [{"lam": 0.5, "weights": [1.0, 1.0]}, {"lam": 1.0, "weights": [1.0, 0.0]}]
    got = ww.weave_arrays(base, models, method="task_arithmetic", search=points, pool="mean")
    assert got["w"].tolist() == [1.375, -0.5, 1.5, 0.0]
    got = ww.weave_arrays(base, models, method="task_arithmetic", search=points, pool="magmax")
    assert got["w"].tolist() == [2.0, -2.0, 3.0, 0.0]
    # A grid: density × λ for TIES over one tensor; density 1 keeps everything (TIES's
    # disjoint mean of [1, −2, 3, 0] and [2, 2, −1, 0] is [1.5, 2, 3, 0] by the elected signs
    # [+, + (0 → majority +), +, 0]).
    grid = {"density": [1.0], "lam": [1.0, 2.0]}
    got = ww.weave_arrays(base, models, method="ties", search=grid, pool="mean", include_deltas=False)
    assert got["w"].tolist() == [2.25, 3.0, 4.5, 0.0]


def test_function_pool_against_the_reference(ck, tmp_path):
    base, models, bp, mps = ck
    grid = {"lam": [0.3, 0.8, 1.2], "density": [0.2, 0.6]}

    def median(a):
        assert a.dtype == np.float32 and a.shape[0] == 3 + 6
        return np.median(a, axis=0)

    out = tmp_path / "o.safetensors"
    ww.weave(bp, mps, out, method="ties", search=grid, pool=median)
    want = R.weave(base, models, "ties", search=grid, pool=lambda a: np.median(a, axis=0))
    assert_close_ulp(load(out), want, atol=slack(base, models, "ties", R.search_points("ties", None, grid)))
    # A function pool sees the same A* as the built-in ones: np.mean reproduces the mean pool.
    ww.weave(bp, mps, tmp_path / "m.safetensors", method="ties", search=grid, pool=lambda a: a.mean(axis=0))
    ww.weave(bp, mps, tmp_path / "b.safetensors", method="ties", search=grid, pool="mean")
    a, b = load(tmp_path / "m.safetensors"), load(tmp_path / "b.safetensors")
    assert_close_ulp(a, b, atol=slack(base, models, "ties", R.search_points("ties", None, grid)))


@pytest.mark.parametrize("pool", ["mean", "magmax", "random", "median"])
def test_grids_are_bit_identical_across_threads_and_chunks(ck, tmp_path, pool):
    _, _, bp, mps = ck
    grid = {"density": [0.1, 0.3, 0.6], "lam": "0.1:1.0:0.1"}
    fn = (lambda a: np.median(a, axis=0)) if pool == "median" else pool
    digests = set()
    for i, (threads, chunk) in enumerate([(1, 1 << 18), (4, 7), (3, 64), (2, 1000)]):
        out = tmp_path / f"o{i}.safetensors"
        ww.weave(bp, mps, out, method="ties", search=grid, pool=fn, threads=threads, chunk_size=chunk, seed=9)
        digests.add(digest(out))
    assert len(digests) == 1


def test_metadata_records_the_whole_space(ck, tmp_path):
    import json

    from safetensors import safe_open

    _, _, bp, mps = ck
    out = tmp_path / "o.safetensors"
    ww.weave(bp, mps, out, method="ties", search={"density": [0.1, 0.3], "lam": [0.5, 1.0]})
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["weightweave.recipe"])
    assert recipe["grid"] == {"density": [0.1, 0.3], "lam": [0.5, 1.0]}
    points = [{"lam": 0.5, "density": 0.2}, {"lam": 1.0, "weights": [1.0, 2.0, 3.0]}]
    ww.weave(bp, mps, out, method="ties", search=points, overwrite=True)
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["weightweave.recipe"])
    assert recipe["points"] == points


BAD = [
    ({"search": [{"lam": 1.0}, {"lam": 0.5, "density": 1.5}]}, "point 1"),
    ({"search": [{"density": 0.5}]}, "sets no lam"),
    ({"search": {"lam": [0.5], "nope": [1.0]}}, "nope"),
    ({"search": {"lam": [0.5], "density": []}}, "no values"),
    ({"search": {"lam": [0.5]}, "lambdas": [0.5]}, "not both"),
    ({"search": [{"lam": 1.0, "weights": [1.0, 2.0]}]}, "2 weights for 3"),
    ({"density": [0.1, 0.2]}, "2 values for 3"),
    ({"density": [0.1, "x", 0.3]}, "density"),
    ({"search": "lam=0.5"}, "search must be"),
    ({"pool": 3}, "pool must be"),
]


@pytest.mark.parametrize(("kw", "msg"), BAD)
def test_bad_search_spaces_are_refused_before_any_work(ck, tmp_path, kw, msg):
    _, _, bp, mps = ck
    out = tmp_path / "out"
    with pytest.raises(ww.ParamError, match=msg):
        ww.weave(bp, mps, out, method="ties", **kw)
    assert tree(tmp_path) == []


def test_a_failing_pool_function_names_the_tensor_and_writes_nothing(ck, tmp_path):
    _, _, bp, mps = ck

    def broken(a):
        raise ValueError("boom")

    with pytest.raises(ww.WeaveError, match=r"pool function failed on tensor '.+'.*boom"):
        ww.weave(bp, mps, tmp_path / "o.safetensors", method="ties", pool=broken)
    with pytest.raises(ww.WeaveError, match=r"returned shape"):
        ww.weave(bp, mps, tmp_path / "o.safetensors", method="ties", pool=lambda a: a)
    assert tree(tmp_path) == []


def test_svd_methods_search_over_lambda_alone(ck, tmp_path):
    _, _, bp, mps = ck
    with pytest.raises(ww.ParamError, match="λ alone"):
        ww.weave(bp, mps, tmp_path / "o.safetensors", method="tsv", device="cpu",
                 search=[{"lam": 1.0}, {"lam": 1.0, "weights": [1.0, 0.0, 1.0]}])  # fmt: skip
    assert tree(tmp_path) == []
