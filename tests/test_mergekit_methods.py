"""mergekit 0.1.5's other methods (slerp, nuslerp, multislerp, nearswap, passthrough, model_stock,
della, della_linear, sce, ram, ramplus_tl), streamed through the method trait, against
``weightweave.reference_mergekit_methods`` (whole tensors, torch's f32 operations in mergekit's
order), against hand-worked cases, and through mergekit YAML configs. The real mergekit runs in
benches/mergekit_compare.py."""

from __future__ import annotations

import math

import pytest
import torch

import weightweave as ww
from weightweave import reference_mergekit_methods as R
from weightweave.recipe import RecipeError

from conftest import SHAPES, assert_close_ulp, load, make_state, write_models

WEIGHTS = [1.0, 0.6, 0.3]
CASES = [
    ("slerp", 1, {"t": 0.3}),
    ("slerp", 1, {"t": 0.85}),
    ("nearswap", 1, {"t": 0.01}),
    ("passthrough", 1, {}),
    ("passthrough", 1, {"scale": 0.5}),
    ("model_stock", 3, {}),
    ("model_stock", 2, {"filter_wise": True}),
    ("ram", 3, {}),
    ("ram", 3, {"epsilon": 0.03}),
    ("ramplus_tl", 3, {"epsilon": 0.02, "r": 0.5, "alpha": 0.4}),
    ("nuslerp", 2, {}),
    ("nuslerp", 2, {"nuslerp_flatten": False}),
    ("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp", 2, {"relative": False}),
    ("multislerp", 3, {}),
    ("multislerp", 3, {"normalize_weights": False, "relative": False}),
    ("sce", 3, {}),
    ("sce", 3, {"select_topk": 0.3}),
    ("sce", 3, {"select_topk": 0.0}),
    ("della", 3, {"density": 0.5, "epsilon": 0.1}),
    ("della", 3, {"density": [0.3, 0.6, 1.0], "epsilon": [0.1, 0.2, 0.1], "normalize": False}),
    ("della_linear", 3, {"density": 0.7, "rescale": False}),
    ("karcher", 3, {}),
    ("karcher", 2, {"max_iter": 3, "with_base": True}),
    ("karcher", 3, {"max_iter": 50, "tol": 1e-9}),
    ("arcee_fusion", 1, {}),
]


def _f32(state: dict) -> dict:
    return {n: t.float() if t.is_floating_point() else t for n, t in state.items()}


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """f32 checkpoints (mergekit's arithmetic is then f32 too); no 0-d tensor, which mergekit's
    DELLA cannot take (tested apart)."""
    base, models = make_state(23)
    del base["scale"]
    models = [{n: t for n, t in m.items() if n != "scale"} for m in models]
    base, models = _f32(base), [_f32(m) for m in models]
    bp, mps = write_models(tmp_path_factory.mktemp("in"), base, models)
    return base, models, bp, mps


#: mergekit's methods without a `weight` parameter: weights given to them are an error.
NO_WEIGHTS = ("slerp", "nearswap", "passthrough", "model_stock", "karcher", "sce", "ram", "ramplus_tl", "arcee_fusion")


def _weights(method: str, k: int) -> dict:
    return {} if method in NO_WEIGHTS else {"weights": WEIGHTS[:k]}


def _merge(ck, tmp_path, method, k, params, **kw):
    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps[:k], out, method=method, compat="mergekit", seed=7, overwrite=True, **_weights(method, k),
             **kw, **params)  # fmt: skip
    return load(out)


#: Their tensor-wide scalars come from the Gram matrix of the models (one statistics pass)
#: instead of sums of the f32 intermediate tensors (karcher iterates on its coefficients,
#: multislerp's mean norm, dots and tangent follow from it; see karcher.rs, multislerp.rs):
#: equal to rounding, not bit for bit.
GRAM = ("karcher", "multislerp")


def _slack(base: dict, models: list[dict], ulps: float = 8) -> dict:
    """`ulps` ulps of each tensor's scale (its largest |value| in any input)."""
    return {n: ulps * max(x[n].abs().max().item() for x in [base, *models]) * 2.0**-23
            for n, b in base.items() if b.is_floating_point()}  # fmt: skip


@pytest.mark.parametrize(("method", "k", "params"), [c for c in CASES if c[0] not in GRAM])
@pytest.mark.parametrize("chunk", [None, 16])
def test_bit_identical_to_the_reference_given_exact_reductions(ck, tmp_path, method, k, params, chunk):
    """The streamed kernel is mergekit's arithmetic bit for bit once the tensor-wide sums (norms,
    dots, sums of squares) are exact (they are f64 here, per chunk of 16 elements or whole) and
    acos/sin/cos are the C library's."""
    base, models = ck[0], ck[1][:k]
    got = _merge(ck, tmp_path, method, k, params, chunk_size=chunk)
    want = R.merge(base, models, method, WEIGHTS[:k], seed=7, exact_reductions=True, **params)
    for n in want:
        assert torch.equal(got[n], want[n]), (method, params, n, (got[n] - want[n]).abs().max())


@pytest.mark.parametrize(("method", "k", "params"), CASES)
def test_close_to_mergekits_own_f32_reductions(ck, tmp_path, method, k, params):
    """With torch's f32 reductions and SLEEF/MKL functions (mergekit's), the per-tensor scalars
    (norms, cosines, coefficients) differ in their last bits, which moves results by a few ulps of
    the inputs' magnitude (more where the interpolation cancels)."""
    base, models = ck[0], ck[1][:k]
    got = _merge(ck, tmp_path, method, k, params)
    want = R.merge(base, models, method, WEIGHTS[:k], seed=7, **params)
    assert_close_ulp(got, want, ulps=2, atol=_slack(base, models))


@pytest.mark.parametrize(("method", "k", "params"), [c for c in CASES if c[0] in GRAM])
@pytest.mark.parametrize("chunk", [None, 16])
def test_gram_iterations_match_the_element_wise_reference(ck, tmp_path, method, k, params, chunk):
    base, models = ck[0], ck[1][:k]
    got = _merge(ck, tmp_path, method, k, params, chunk_size=chunk)
    want = R.merge(base, models, method, WEIGHTS[:k], seed=7, exact_reductions=True, **params)
    assert_close_ulp(got, want, ulps=2, atol=_slack(base, models, 4))


def test_hand_karcher(tmp_path):
    """Two orthogonal directions of norms 1 and 3: the mean direction is their bisector, scaled
    by the mean norm 2: [√2, √2]. No base: the points are the models' values."""
    got = _one(tmp_path, [0.0, 0.0], [[1.0, 0.0], [0.0, 3.0]], "karcher")
    assert got == pytest.approx([math.sqrt(2), math.sqrt(2)], abs=1e-6)


@pytest.mark.parametrize(("method", "k", "params"),
                         [c for c in CASES if c[0] in ("slerp", "della", "sce", "nuslerp", "karcher", "arcee_fusion")])
def test_threads_and_chunks_do_not_change_a_bit(ck, tmp_path, method, k, params):
    a = _merge(ck, tmp_path, method, k, params, threads=1, chunk_size=5)
    b = _merge(ck, tmp_path, method, k, params, threads=2, chunk_size=1000)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def _one(tmp_path, base: list[float], models: list[list[float]], method: str, **params) -> list[float]:
    b = {"w": torch.tensor(base)}
    ms = [{"w": torch.tensor(m)} for m in models]
    bp, mps = write_models(tmp_path / "in", b, ms)
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method=method, compat="mergekit", overwrite=True, **params)
    return load(out)["w"].tolist()


def test_hand_multislerp(tmp_path):
    """Orthogonal [1, 0] and [0, 3], equal weights: the unit vectors' mean direction is the
    bisector, scaled by the mean norm 2: [√2, √2]. Opposite directions cancel: with two models
    their weighted sum (mergekit's fallback), with three an error naming the tensor."""
    got = _one(tmp_path, [0.0, 0.0], [[1.0, 0.0], [0.0, 3.0]], "multislerp", weights=[1, 1])
    assert got == pytest.approx([math.sqrt(2), math.sqrt(2)], abs=1e-6)
    got = _one(tmp_path, [1.0, 1.0], [[2.0, 1.0], [-2.0, 1.0]], "multislerp", weights=[1, 1])
    assert got == [0.0, 1.0]  # τ = [1, 0], [−3, 0]: the base + ½·1 + ½·(−3) = 1 − 1
    with pytest.raises(ww.ParamError, match="tensor 'w'.*directions is zero"):
        _one(tmp_path / "c", [0.0, 0.0], [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], "multislerp", weights=[1, 1, 1])
    assert not (tmp_path / "c" / "o.safetensors").exists()


def test_hand_slerp(tmp_path):
    """Orthogonal unit vectors at t = 1/3: [cos 30°, sin 30°]; parallel ones are lerped."""
    got = _one(tmp_path, [1.0, 0.0], [[0.0, 1.0]], "slerp", t=1 / 3)
    assert got == pytest.approx([math.cos(math.pi / 6), math.sin(math.pi / 6)], abs=1e-6)
    got = _one(tmp_path, [1.0, 2.0], [[2.0, 4.0]], "slerp", t=0.25)
    assert got == [1.25, 2.5]


def test_hand_nearswap_and_passthrough(tmp_path):
    """nearswap t = 0.5: |diff| = [0.25, 1, 4] → weights [1, 0.5, 0.125] of the model."""
    got = _one(tmp_path, [0.0, 0.0, 0.0], [[0.25, 1.0, 4.0]], "nearswap", t=0.5)
    assert got == [0.25, 0.5, 0.5]
    assert _one(tmp_path, [0.0, 0.0], [[2.0, -3.0]], "passthrough", scale=0.5) == [1.0, -1.5]


def test_hand_model_stock(tmp_path):
    """Offsets [1, 0] and [0, 1]: cos 0 → t = 0 → the base. Offsets [1, 0] and [1, 0]: cos 1 →
    t = 2·1/(1 + 1) = 1 → the models' average [1, 0]. Offsets [1, 0], [−1, 0] with 2 models: cos −1
    → denominator 0 → the base (the singular rule)."""
    assert _one(tmp_path, [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], "model_stock") == [0.0, 0.0]
    assert _one(tmp_path, [0.0, 0.0], [[1.0, 0.0], [1.0, 0.0]], "model_stock") == [1.0, 0.0]
    assert _one(tmp_path, [5.0, 5.0], [[6.0, 5.0], [4.0, 5.0]], "model_stock") == [5.0, 5.0]


def test_hand_ram(tmp_path):
    """τ_1 = [1, 1, 0, 1e-6], τ_2 = [0, 3, 0, 0]: element 0 only τ_1 changes (kept whole), element 1
    both (averaged: 2), element 3 is below epsilon (dropped)."""
    got = _one(tmp_path, [0.0] * 4, [[1.0, 1.0, 0.0, 1e-6], [0.0, 3.0, 0.0, 0.0]], "ram")
    assert got == [1.0, 2.0, 0.0, 0.0]


def test_hand_sce(tmp_path):
    """τ_1 = [2, −1], τ_2 = [2, 1] (select_topk 1): weights ∝ mean squares [2.5, 2.5] → ½ each;
    element 0: both +, mean 2; element 1: sum 0 elects +, only τ_2 kept → 1."""
    assert _one(tmp_path, [0.0, 0.0], [[2.0, -1.0], [2.0, 1.0]], "sce") == [2.0, 1.0]


def test_hand_sce_ties_at_the_cut(tmp_path):
    """Two tasks, τ_2 = −τ_1, so var = τ_1². |τ_1| = [2, 1, 1, ½], select_topk ¾: k = 3, the cut
    is 1 and both elements at it are kept (the weights' sums come with the tie counts):
    weights ½ each, each kept element's sum is 0, so the + vote keeps τ_1 → [2, 1, 1, 0]. Five
    variances of 1 and select_topk ½: k = 2 of 5 tied, the first 2 by position are kept (the
    weights then take a pass of their own) → [1, 1, 0, 0, 0, 0]."""
    got = _one(tmp_path, [0.0] * 4, [[2.0, 1.0, 1.0, 0.5], [-2.0, -1.0, -1.0, -0.5]], "sce", select_topk=0.75)
    assert got == [2.0, 1.0, 1.0, 0.0]
    got = _one(tmp_path, [0.0] * 6, [[1.0, 1.0, 1.0, 1.0, 2.0, 0.0], [-1.0, -1.0, -1.0, -1.0, 0.0, 0.0]], "sce",
               select_topk=0.5)  # fmt: skip
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_slerp_weaves_over_t(ck, tmp_path):
    """Weight Weaving's search variable for slerp is t: A* = [τ] + [slerp(t) − θ_base for t in T],
    mean-pooled, with λ = 1."""
    base, models, bp, mps = ck
    out = tmp_path / "w.safetensors"
    ts = [0.2, 0.5, 0.9]
    ww.weave(bp, mps[:1], out, method="slerp", compat="mergekit", lambdas=ts)
    got = load(out)
    want = {}
    for n, b in base.items():
        if not b.is_floating_point():
            continue
        members = [models[0][n] - b] + [
            R.merge({n: b}, [{n: models[0][n]}], "slerp", t=t, exact_reductions=True)[n] - b for t in ts
        ]
        want[n] = b + torch.stack(members).sum(0) / len(members)
    for n, w in want.items():
        assert torch.allclose(got[n], w, atol=1e-6, rtol=0), n


def test_weave_over_a_method_parameter(ck, tmp_path):
    """For the rest, λ and the method's own parameters are the search axes (sce's select_topk)."""
    base, models, bp, mps = ck
    out = tmp_path / "w.safetensors"
    ww.weave(bp, mps, out, method="sce", compat="mergekit", search={"lam": [0.5, 1.0], "select_topk": [0.3, 1.0]},
             include_deltas=False)  # fmt: skip
    got = load(out)
    ms = {p: R.merge(base, models, "sce", exact_reductions=True, select_topk=p) for p in (0.3, 1.0)}
    for n, b in base.items():
        if not b.is_floating_point():
            continue
        a = [lam * (ms[p][n] - b) for lam in (0.5, 1.0) for p in (0.3, 1.0)]
        assert torch.allclose(got[n], b + torch.stack(a).sum(0) / 4, atol=1e-6, rtol=0), n


@pytest.mark.parametrize(
    ("method", "k", "params", "match"),
    [
        ("slerp", 2, {"t": 0.5}, "takes 1 model"),
        ("slerp", 1, {}, "t.*required"),
        ("nearswap", 1, {}, "t.*required"),
        ("model_stock", 1, {}, "at least 2"),
        ("nuslerp", 3, {}, "takes 2 model"),
        ("karcher", 3, {"max_iter": 10**7}, "max_iter"),
        ("karcher", 3, {"max_iter": 2.5}, "not an integer"),
        ("slerp", 1, {"t": float("nan")}, "t"),
        ("della", 3, {"density": 0.1, "epsilon": 0.2}, "must lie in"),
        ("della", 3, {"density": 0.5, "epsilon": 0.1, "gamma": 0.1}, "gamma.*not a parameter"),
        ("sce", 3, {"density": 0.5}, "not a parameter"),
    ],
)
def test_bad_parameters_are_refused_before_any_work(ck, tmp_path, method, k, params, match):
    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    with pytest.raises(ww.ParamError, match=match):
        ww.merge(bp, mps[:k], out, method=method, compat="mergekit", **_weights(method, k), **params)
    assert not out.exists()


def test_della_refuses_what_mergekit_cannot_merge(tmp_path):
    """A 0-d tensor (mergekit's della_magprune fails on it) and rows of one element (its rank
    normalisation divides by zero) are errors naming the tensor, never a silent guess."""
    for shape, name in (((), "scalar"), ((4, 1), "column")):
        b = {name: torch.zeros(shape)}
        ms = [{name: torch.randn(shape)} for _ in range(2)]
        bp, mps = write_models(tmp_path / name, b, ms)
        out = tmp_path / f"{name}.safetensors"
        with pytest.raises(ww.ParamError, match=f"tensor '{name}'"):
            ww.merge(bp, mps, out, method="della", compat="mergekit", weights=[1, 1], density=0.5, epsilon=0.1)
        assert not out.exists()


def test_mergekit_yaml_configs(ck, tmp_path, monkeypatch):
    """The configs as published: slerp over base + one model, model_stock with the base listed,
    multislerp without a base (the models' values), della with per-model parameters."""
    monkeypatch.chdir(tmp_path)
    base, models, bp, mps = ck
    (tmp_path / "slerp.yaml").write_text(
        f"merge_method: slerp\nbase_model: {bp}\nmodels:\n  - model: {bp}\n  - model: {mps[0]}\n"
        "parameters:\n  t: 0.4\ndtype: float32\n"
    )
    (tmp_path / "stock.yaml").write_text(
        f"merge_method: model_stock\nbase_model: {bp}\nmodels:\n"
        + "".join(f"  - model: {p}\n" for p in [bp, *mps])
        + "parameters:\n  filter_wise: false\n"
    )
    (tmp_path / "multi.yaml").write_text(
        "merge_method: multislerp\nmodels:\n"
        + "".join(f"  - model: {p}\n    parameters:\n      weight: {w}\n" for p, w in zip(mps, WEIGHTS, strict=True))
    )
    (tmp_path / "della.yaml").write_text(
        f"merge_method: della\nbase_model: {bp}\nmodels:\n"
        + "".join(
            f"  - model: {p}\n    parameters:\n      weight: {w}\n      density: {d}\n"
            for p, w, d in zip(mps, WEIGHTS, [0.5, 0.6, 0.7], strict=True)
        )
        + "parameters:\n  epsilon: 0.1\n  lambda: 0.9\n"
    )
    wants = {
        "slerp": R.merge(base, models[:1], "slerp", t=0.4, exact_reductions=True),
        "stock": R.merge(base, models, "model_stock", exact_reductions=True),
        "multi": R.merge(models[0], models, "multislerp", WEIGHTS, relative=False, exact_reductions=True),
    }
    for name, want in wants.items():
        ww.recipe.run(tmp_path / f"{name}.yaml", tmp_path / f"{name}.safetensors")
        got = load(tmp_path / f"{name}.safetensors")
        if name == "multi":  # from the Gram matrix (see GRAM)
            assert_close_ulp(got, want, ulps=2, atol=_slack(base, models, 4))
            continue
        for n in want:
            assert torch.equal(got[n], want[n]), (name, n)
    ww.recipe.run(tmp_path / "della.yaml", tmp_path / "della.safetensors")
    got = load(tmp_path / "della.safetensors")
    m = R.merge(base, models, "della", WEIGHTS, seed=0, density=[0.5, 0.6, 0.7], epsilon=0.1, exact_reductions=True)
    for n, b in base.items():
        if b.is_floating_point():
            want = b + (m[n] - b) * 0.9
            assert torch.allclose(got[n], want, atol=1e-6, rtol=0), n


def test_mergekit_yaml_refusals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        "merge_method: slerp\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t: 0.5\n": "base_model is required",
        "merge_method: passthrough\nbase_model: a\nmodels:\n  - model: b\n": "no base_model",
        "merge_method: nuslerp\nmodels:\n  - model: a\n  - model: b\n": "weight is required",
        "merge_method: karcher2\nmodels:\n  - model: a\n": "not one weightweave runs",
    }
    for name in "ab":
        (tmp_path / name).mkdir()
    for text, match in cases.items():
        with pytest.raises(RecipeError, match=match):
            ww.recipe.load(dict(__import__("yaml").safe_load(text)))
    # Parameters a method does not take are ignored by mergekit: here too, with a warning.
    ignored = {
        "merge_method: sce\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      weight: 1\n":
            "'models\\[0\\].parameters.weight' ignored: not a per-model parameter of mergekit's sce",
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: b\nparameters:\n  t: 0.5\n  density: 0.1\n":
            "'parameters.density' ignored",
    }  # fmt: skip
    for text, match in ignored.items():
        with pytest.warns(ww.RecipeWarning, match=match):
            r = ww.recipe.load(dict(__import__("yaml").safe_load(text)))
        assert "weights" not in r.kwargs and "density" not in r.kwargs


def test_della_random_masks_keep_about_the_rank_probabilities(tmp_path):
    """DELLA keeps the largest |τ| of a row with probability density + ε and the smallest with
    density − ε: over 64 rows of 256, the kept fractions of the top and bottom quartiles."""
    g = torch.Generator().manual_seed(1)
    b = {"w": torch.zeros(64, 256)}
    tau = torch.randn(64, 256, generator=g)
    bp, mps = write_models(tmp_path / "in", b, [{"w": tau}])
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method="della_linear", compat="mergekit", weights=[1.0], density=0.5, epsilon=0.3,
             rescale=False)  # fmt: skip
    kept = load(out)["w"] != 0
    order = tau.abs().argsort(dim=1)
    ranks = order.argsort(dim=1)
    top, bottom = kept[ranks >= 192].float().mean().item(), kept[ranks < 64].float().mean().item()
    assert abs(top - 0.7125) < 0.03 and abs(bottom - 0.2875) < 0.03, (top, bottom)


def test_shapes_of_the_fixture_cover_every_unit():
    """The checkpoints hold 1-d, 2-d and 4-d tensors (rows, columns and slabs all get exercised)."""
    dims = {len(s) for n, (s, _) in SHAPES.items() if n != "scale"}
    assert {1, 2, 4} <= dims


def test_in_memory_state_dicts(ck):
    """The array API runs the trait methods too, with the same result as from files."""
    base, models = ck[0], ck[1]
    for method, k, params in (("slerp", 1, {"t": 0.3}), ("sce", 3, {"select_topk": 0.3})):
        got = ww.merge_arrays(base, models[:k], method=method, **params)
        want = R.merge(base, models[:k], method, exact_reductions=True, **params)
        for n in want:
            assert torch.equal(got[n], want[n]), (method, n)
