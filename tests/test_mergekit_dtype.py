"""mergekit's arithmetic in the config's dtype (``dtype: bfloat16`` / ``float16``): the
task-arithmetic family computed as mergekit's CPU run computes it, rounded after every torch
operation, against a line-by-line transcription of mergekit's ``merge_group`` on bf16/f16
tensors (``reference_mergekit.merge_in_dtype``). benches/mergekit_compare.py runs the real
mergekit on such configs (rows ``*_bf16``)."""

from __future__ import annotations

import pytest
import torch
import yaml

import weightweave as ww
from weightweave import reference_mergekit as MK
from weightweave import reference_mergekit_methods as MKM

from conftest import load, write_models

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS = [1.0, 0.3, 0.55]


def _state(seed: int, dtype: torch.dtype, zero_base: bool = False) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (40, 16), "layers.0.attn.weight": (16, 16), "layers.0.norm.weight": (16,),
              "layers.1.mlp.weight": (24, 16)}  # fmt: skip
    base = {n: torch.zeros(s) if zero_base else torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: t + 0.05 * (k + 1) * torch.randn(t.shape, generator=g) for n, t in base.items()} for k in range(3)]
    cast = lambda sd: {n: t.to(dtype) for n, t in sd.items()}  # noqa: E731
    return cast(base), [cast(m) for m in models]


def _run(tmp_path, method, bp, mps, dtype, shared=None, per_model=None, extra=None):
    cfg = {"merge_method": method, "base_model": str(bp), "dtype": dtype,
           "models": [{"model": str(m), "parameters": {"weight": w, **(per_model[i] if per_model else {})}}
                      for i, (m, w) in enumerate(zip(mps, WEIGHTS, strict=True))]}  # fmt: skip
    if shared:
        cfg["parameters"] = shared
    cfg |= extra or {}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o.safetensors"
    ww.run(path, out, overwrite=True)
    return load(out)


CASES = [
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}, None),
    ("task_arithmetic", {}, None),
    ("ties", {"normalize": True}, None),
    ("ties", {"normalize": False, "lambda": 1.3}, None),
    ("breadcrumbs", {}, [{"density": 1.0, "gamma": 0.0}] * 3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("method", "shared", "per_model"), CASES)
def test_bit_identical_to_mergekits_arithmetic_in_its_dtype(tmp_path, dtype, method, shared, per_model):
    base, models = _state(5, DTYPES[dtype])
    bp, mps = write_models(tmp_path / "in", base, models)
    got = _run(tmp_path, method, bp, mps, dtype, shared, per_model)
    p = {k: v for k, v in (shared or {}).items() if k != "lambda"}
    want = MK.merge_in_dtype(base, models, method, WEIGHTS, DTYPES[dtype], lam=(shared or {}).get("lambda", 1.0), **p)
    for n in want:
        assert got[n].dtype == DTYPES[dtype] and torch.equal(got[n], want[n]), (n, (got[n] - want[n]).abs().max())


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_sparsified_in_bf16(tmp_path, method):
    """Deltas that are bf16 values themselves (a zero base), so equal magnitudes are equal in
    both tools and ties at a cut go to the earlier position in both."""
    base, models = _state(6, torch.bfloat16, zero_base=True)
    bp, mps = write_models(tmp_path / "in", base, models)
    per = [{"density": 0.5, "gamma": 0.05}, {"density": 0.7}, {"density": 0.3}]
    per = [{k: v for k, v in p.items() if method == "breadcrumbs_ties" or k != "gamma"} for p in per]
    got = _run(tmp_path, method, bp, mps, "bfloat16", {"normalize": True}, per)
    dens = [p["density"] for p in per]
    want = MK.merge_in_dtype(base, models, method, WEIGHTS, torch.bfloat16, normalize=True, density=dens,
                             gamma=[0.05, 0.01, 0.01])  # fmt: skip
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_wider_inputs_are_rounded_first(tmp_path):
    """f32 checkpoints under ``dtype: bfloat16``: mergekit loads them as bf16 before any
    arithmetic, and so does the emulation."""
    base, models = _state(7, torch.float32)
    bp, mps = write_models(tmp_path / "in", base, models)
    got = _run(tmp_path, "task_arithmetic", bp, mps, "bfloat16", {"normalize": True})
    want = MK.merge_in_dtype(base, models, "task_arithmetic", WEIGHTS, torch.bfloat16, normalize=True)
    for n in want:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n]), n


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("mixed", [False, True])
def test_sparsified_wider_inputs_are_rounded_first(tmp_path, method, mixed):
    """f32 checkpoints (one stored in bf16 where ``mixed``) under ``dtype: bfloat16``, sparsified:
    the emulation takes r(θ_t) − r(θ_base) from the deltas the load forms of the rounded values
    (no values kept), and gives mergekit's bits. A zero base keeps the deltas bf16 values."""
    base, models = _state(9, torch.float32, zero_base=True)
    if mixed:
        models[1] = {n: t.to(torch.bfloat16) for n, t in models[1].items()}
    bp, mps = write_models(tmp_path / "in", base, models)
    per = [{"density": 0.5, "gamma": 0.05}, {"density": 0.7}, {"density": 0.3}]
    per = [{k: v for k, v in p.items() if method == "breadcrumbs_ties" or k != "gamma"} for p in per]
    got = _run(tmp_path, method, bp, mps, "bfloat16", {"normalize": True}, per)
    want = MK.merge_in_dtype(base, models, method, WEIGHTS, torch.bfloat16, normalize=True,
                             density=[p["density"] for p in per], gamma=[0.05, 0.01, 0.01])  # fmt: skip
    for n in want:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n]), n


def test_precision_f32_keeps_our_arithmetic(tmp_path):
    base, models = _state(8, torch.bfloat16)
    bp, mps = write_models(tmp_path / "in", base, models)
    got = _run(tmp_path, "ties", bp, mps, "bfloat16", {"normalize": True}, extra={"precision": "f32"})
    want = MK.merge(base, models, "ties", WEIGHTS, normalize=True)
    assert all(torch.equal(got[n], want[n]) for n in want)
    emulated = _run(tmp_path, "ties", bp, mps, "bfloat16", {"normalize": True})
    assert any(not torch.equal(got[n], emulated[n]) for n in want)  # the two arithmetics differ
    with pytest.raises(ww.RecipeError, match="precision must be"):
        _run(tmp_path, "ties", bp, mps, "bfloat16", extra={"precision": "f64"})


def test_a_lambda_without_arith_is_refused(tmp_path):
    base, models = _state(9, torch.bfloat16)
    bp, mps = write_models(tmp_path / "in", base, models)
    with pytest.raises(ww.ParamError, match="lambda"):
        ww.merge(bp, mps, tmp_path / "o.safetensors", method="task_arithmetic", compat="mergekit", **{"lambda": 0.5})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_in_its_dtype(tmp_path, dtype, filter_wise):
    """model_stock computed as mergekit's run in bf16/f16 computes it (norms, dots, cosines, t and
    the interpolation each rounded), against a line-by-line torch transcription run in that dtype."""
    base, models = _state(11, DTYPES[dtype])
    bp, mps = write_models(tmp_path / "in", base, models)
    cfg = {"merge_method": "model_stock", "base_model": str(bp), "dtype": dtype,
           "models": [{"model": str(m)} for m in mps], "parameters": {"filter_wise": filter_wise}}  # fmt: skip
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    ww.run(tmp_path / "c.yml", tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    want = MK.model_stock_in_dtype(base, models, DTYPES[dtype], filter_wise)
    for n in want:
        assert got[n].dtype == DTYPES[dtype] and torch.equal(got[n], want[n]), (n, (got[n] - want[n]).abs().max())
    # Our f32 arithmetic (precision: f32) gives another model: the emulation is what changed it.
    cfg["precision"] = "f32"
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    ww.run(tmp_path / "c.yml", tmp_path / "f.safetensors")
    f32 = load(tmp_path / "f.safetensors")
    assert any(not torch.equal(f32[n], want[n]) for n in want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("with_base", "n", "params"), [
    (False, 3, {}), (True, 2, {"max_iter": 3}), (False, 2, {"tol": 1e-10, "max_iter": 40}), (True, 3, {"tol": 0.3})])
def test_karcher_in_its_dtype(tmp_path, dtype, with_base, n, params):
    """karcher computed as mergekit's run in bf16/f16 computes it, the iterate rounded at every
    step (held between the passes: three per iteration; a tensor that is one chunk iterates in
    one), against the line-by-line torch
    transcription run in that dtype with exact f32 norms and dots (ours; torch's own differ by f32
    ulps, which rounding to the dtype nearly always hides: the real mergekit in
    benches/mergekit_corpus.py). 40 iterations at tol 1e-10 never converge in bf16 (a published
    config's setting); tol 0.3 stops early; 3 points make α = 1/3 (4 make it exact)."""
    base, models = _state(14, DTYPES[dtype])
    # Far apart (angles near 1 rad), so θ/sin θ and every other factor is far from 1 in the dtype.
    models = [{n: (t.float() + (k + 1) * torch.randn(t.shape, generator=torch.Generator().manual_seed(k))).to(t.dtype)
               for n, t in m.items()} for k, m in enumerate(models[:n])]  # fmt: skip
    bp, mps = write_models(tmp_path / "in", base, models)
    cfg = {"merge_method": "karcher", "dtype": dtype, "models": [{"model": str(m)} for m in mps]}
    if params:
        cfg["parameters"] = params
    if with_base:
        cfg["base_model"] = str(bp)
    else:
        cfg["models"].insert(0, {"model": str(bp)})
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    # What two passes over the inputs read: f32 karcher's (the Gram matrix's, the output's).
    (tmp_path / "f.yml").write_text(yaml.safe_dump({**cfg, "precision": "f32"}))
    two_passes = ww.run(tmp_path / "f.yml", tmp_path / "f.safetensors").bytes_read
    for chunk in (None, 7):
        rep = ww.run(tmp_path / "c.yml", tmp_path / "o.safetensors", overwrite=True, chunk_size=chunk, threads=2)
        # Each tensor one chunk: the whole iteration in the norms' pass, then the output's; in
        # chunks of 7, a pass per reduction. Both give the transcription's model.
        assert (rep.bytes_read == two_passes) == (chunk is None), (chunk, rep.bytes_read, two_passes)
        got = load(tmp_path / "o.safetensors")
        want = MKM.merge_in_dtype(base, models, "karcher", DTYPES[dtype], relative=False, exact_reductions=True,
                                  with_base=True, **params)  # fmt: skip
        for n in want:
            assert got[n].dtype == DTYPES[dtype] and torch.equal(got[n], want[n]), (n, (got[n] - want[n]).abs().max())
    # Our f32 arithmetic (precision: f32) gives another model: the emulation is what changed it.
    f32 = load(tmp_path / "f.safetensors")
    assert any(not torch.equal(f32[n], got[n]) for n in want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("method", "params", "n"), [
    ("nearswap", {"t": 0.05}, 1), ("nearswap", {"t": 0.01}, 1), ("ram", {"epsilon": 0.05}, 3), ("ram", {}, 2),
    ("ramplus_tl", {"epsilon": 0.05, "r": 0.7, "alpha": 0.9}, 3)])  # fmt: skip
def test_elementwise_methods_in_their_dtype(tmp_path, dtype, method, params, n):
    """nearswap, ram and ramplus_tl computed as mergekit's run in bf16/f16 computes them (torch's
    `t / x` as `reciprocal(x) * t`, the epsilon compared in the dtype, each averaged delta and
    ram's sum and `base + merged` rounded; ramplus_tl's f32 λ makes the rest f32), against the
    torch transcription run in that dtype. An epsilon of 0.05 makes elements that one, several or
    no model changes."""
    base, models = _state(15, DTYPES[dtype])
    bp, mps = write_models(tmp_path / "in", base, models[:n])
    cfg = {"merge_method": method, "base_model": str(bp), "dtype": dtype, "models": [{"model": str(m)} for m in mps],
           "parameters": params}  # fmt: skip
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    ww.run(tmp_path / "c.yml", tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    # ramplus_tl's result is f32 there (its λ is), and mergekit writes it so.
    want = MKM.merge_in_dtype(base, models[:n], method, DTYPES[dtype], **params)
    for k in want:
        assert got[k].dtype == (torch.float32 if method == "ramplus_tl" else DTYPES[dtype]), k
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())
    cfg["precision"] = "f32"
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    ww.run(tmp_path / "c.yml", tmp_path / "f.safetensors")
    f32 = load(tmp_path / "f.safetensors")
    assert any(not torch.equal(f32[k], got[k]) for k in want)


@pytest.mark.parametrize("miss", [None, "norm", "dots"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("with_base", "normalize"), [(True, True), (False, True), (True, False)])
def test_multislerp_in_its_dtype(tmp_path, monkeypatch, dtype, with_base, normalize, miss):
    """multislerp computed as mergekit's run in bf16/f16 computes it (the deltas, weights, each
    norm and `+ eps`, quotient, product, sum over the models and dot rounded), against the torch
    transcription run in that dtype with exact reductions (ours; torch's own f32 order differs by
    ulps that rounding to the dtype nearly always hides). Its second pass computes the dots and
    the tangent's norm from guessed roundings of the mean's norm and the dots; `miss` makes every
    tensor's guess of the norm, or of a dot, miss, so the passes that follow a miss run."""
    if miss:
        monkeypatch.setenv("WEIGHTWEAVE_FORCE_MISS", miss)
    base, models = _state(16, DTYPES[dtype])
    bp, mps = write_models(tmp_path / "in", base, models)
    ws = [1.0, 0.3, 0.55]
    models_ = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(mps, ws, strict=True)]
    cfg = {"merge_method": "multislerp", "dtype": dtype, "parameters": {"normalize_weights": normalize},
           "models": models_}
    if with_base:
        cfg["base_model"] = str(bp)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    ww.run(tmp_path / "c.yml", tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    want = MKM.merge_in_dtype(base, models, "multislerp", DTYPES[dtype], ws, relative=with_base,
                              exact_reductions=True, normalize_weights=normalize)  # fmt: skip
    for k in want:
        assert got[k].dtype == DTYPES[dtype] and torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())
    cfg["precision"] = "f32"
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    ww.run(tmp_path / "c.yml", tmp_path / "f.safetensors")
    f32 = load(tmp_path / "f.safetensors")
    assert any(not torch.equal(f32[k], got[k]) for k in want)


UNEMULATED = {
    "della": ({}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, 3),
    "della_linear": ({}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, 3),
}


@pytest.mark.parametrize("method", UNEMULATED)
def test_a_method_computed_in_f32_under_a_bf16_dtype_says_so(tmp_path, method):
    """mergekit computes these methods in the config's bf16/f16 dtype, rounding after every
    operation; they compute in f32 here, so the run warns that the model is not mergekit's bit for
    bit: under `dtype: bfloat16`, and without a dtype on bf16 checkpoints (mergekit then computes
    in the stored dtype). `precision: f32` and an f32 dtype run quietly."""
    import warnings

    shared, per, n = UNEMULATED[method]
    base, models = _state(12, torch.bfloat16)
    bp, mps = write_models(tmp_path / "in", base, models[:n])

    def run(**extra):
        cfg = {"merge_method": method, "base_model": str(bp), "models": [{"model": str(m), "parameters": per}
                                                                         for m in mps]}  # fmt: skip
        if shared:
            cfg["parameters"] = shared
        cfg |= extra
        (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
        ww.run(tmp_path / "c.yml", tmp_path / "o.safetensors", overwrite=True)

    for extra in ({"dtype": "bfloat16"}, {}, {"dtype": "float16"}):
        with pytest.warns(ww.RecipeWarning, match=f"mergekit computes {method} in (bf16|f16).*precision: f32"):
            run(**extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(dtype="bfloat16", precision="f32")
        run(dtype="float32")


def test_the_cli_says_a_warning_once(tmp_path):
    import subprocess
    import sys

    base, models = _state(13, torch.bfloat16)
    bp, mps = write_models(tmp_path / "in", base, models)
    cfg = {"merge_method": "della", "dtype": "bfloat16", "base_model": str(bp),
           "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in mps]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "weightweave", "run", str(tmp_path / "c.yml"), str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert p.stderr.count("mergekit computes della in bf16") == 1, p.stderr
    assert p.stderr.startswith("weightweave: warning: "), p.stderr
