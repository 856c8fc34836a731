"""Every method × pool × include_deltas against the pure-torch reference (an independent
implementation written literally from SPEC.md), on files with mixed dtypes and awkward shapes."""

from __future__ import annotations

import pytest

import weightweave as ww
from weightweave import reference as R

from conftest import assert_close_ulp, digest, load, rounding_slack, write_models

METHOD_PARAMS = [
    ("task_arithmetic", {}),
    ("magmax", {}),
    ("dare", {"density": 0.4}),
    ("dare", {"density": 0.7, "rescale": False}),
    ("dare_ties", {"density": 0.6, "ties_density": 0.3}),
    ("ties", {}),
    ("ties", {"density": 0.5, "scope": "tensor"}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
    ("breadcrumbs", {}),
    ("pcb", {}),
    ("pcb", {"ratio": 0.2}),
]


# PCB evaluates exp and tanh: Rust's libm and torch's vectorized kernels may differ in the last
# bit, which moves P by ~1e-8 here (|P| ~ 0.1). Every other method must agree to 1 ulp.
def slack(method: str) -> float:
    return 1e-7 if method == "pcb" else 0.0


IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for m, p in METHOD_PARAMS]


@pytest.mark.parametrize(("method", "params"), METHOD_PARAMS, ids=IDS)
def test_merge_matches_reference(ckpts, tmp_path, method, params):
    base, models, bp, mps = ckpts
    out = tmp_path / "out.safetensors"
    ww.merge(bp, mps, out, method=method, lam=0.7, seed=5, chunk_size=97, **params)
    want = R.merge(base, models, method, lam=0.7, seed=5, **params)
    assert_close_ulp(load(out), want, atol=slack(method))


@pytest.mark.parametrize("include_deltas", [True, False], ids=["deltas", "no-deltas"])
@pytest.mark.parametrize("pool", ["mean", "random", "magmax"])
@pytest.mark.parametrize(("method", "params"), METHOD_PARAMS, ids=IDS)
def test_weave_matches_reference(ckpts, tmp_path, method, params, pool, include_deltas):
    base, models, bp, mps = ckpts
    out = tmp_path / "out.safetensors"
    lambdas = ww.default_lambdas(method)
    ww.weave(
        bp,
        mps,
        out,
        method=method,
        pool=pool,
        include_deltas=include_deltas,
        seed=11,
        chunk_size=128,
        threads=2,
        **params,
    )
    want = R.weave(base, models, method, lambdas, pool=pool, include_deltas=include_deltas, seed=11, **params)
    tol = rounding_slack(base, models, method, lambdas, include_deltas, seed=11, **params)
    assert_close_ulp(load(out), want, atol=tol)


@pytest.mark.parametrize("out_dtype", ["f32", "f16", "bf16", "f64"])
def test_out_dtype(ckpts, tmp_path, out_dtype):
    base, models, bp, mps = ckpts
    out = tmp_path / "o.safetensors"
    ww.weave(bp, mps, out, method="ties", lambdas="0.2,0.5,1", out_dtype=out_dtype)
    want = R.weave(base, models, "ties", [0.2, 0.5, 1.0], out_dtype=out_dtype)
    assert_close_ulp(load(out), want, atol=rounding_slack(base, models, "ties", [0.2, 0.5, 1.0]))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "pcb", "dare"])
def test_array_api_matches_reference_and_keeps_kind(ckpts, method):
    base, models, _, _ = ckpts
    got = ww.weave_arrays(base, models, method=method, lambdas=[0.3, 0.9], pool="random", seed=2)
    assert_close_ulp(
        got,
        R.weave(base, models, method, [0.3, 0.9], pool="random", seed=2),
        atol=rounding_slack(base, models, method, [0.3, 0.9], seed=2),
    )
    np_base = {k: v.numpy() for k, v in base.items() if v.dtype != R.torch.bfloat16}
    np_models = [{k: m[k].numpy() for k in np_base} for m in models]
    got_np = ww.merge_arrays(np_base, np_models, method=method, lam=0.5)
    assert all(type(v).__module__ == "numpy" for v in got_np.values())
    t_base = {k: base[k] for k in np_base}
    want = R.merge(t_base, [{k: m[k] for k in np_base} for m in models], method, lam=0.5)
    assert_close_ulp({k: R.torch.from_numpy(v) for k, v in got_np.items()}, want, atol=slack(method))


@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {}), ("ties", {"scope": "tensor"}), ("dare_ties", {}), ("pcb", {})],
)
def test_radix_fallback_matches_reference(ckpts, tmp_path, monkeypatch, method, params):
    # Statistics normally come from one sampled-window pass; this forces the two-pass radix path.
    monkeypatch.setenv("WEIGHTWEAVE_FORCE_RADIX", "1")
    base, models, bp, mps = ckpts
    out = tmp_path / "out.safetensors"
    ww.merge(bp, mps, out, method=method, lam=0.7, seed=5, chunk_size=97, **params)
    assert_close_ulp(load(out), R.merge(base, models, method, lam=0.7, seed=5, **params), atol=slack(method))


def _big_state(dtype, quantized: bool):
    """Scopes large enough (> 2^15 elements) that statistics take the sampled-window pass. With
    `quantized`, deltas are small multiples of 1/64: repeated values make one-key-wide windows,
    and exact cancellations between tasks make the majority sign matter."""
    g = R.torch.Generator().manual_seed(11)
    shapes = {"a.weight": (300, 257), "b.weight": (41_000,)}
    base = {n: R.torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    models = []
    for _ in range(3):
        m = {}
        for n, t in base.items():
            noise = R.torch.randn(t.shape, generator=g) * 0.05
            if quantized:
                noise = R.torch.randint(-3, 4, t.shape, generator=g).float() / 64
            m[n] = (t.float() + noise).to(dtype)
        models.append(m)
    return base, models


@pytest.mark.parametrize("quantized", [False, True], ids=["continuous", "quantized"])
@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {}), ("ties", {"scope": "tensor"}), ("dare_ties", {}), ("pcb", {})],
)
def test_windowed_statistics_match_reference_and_radix(tmp_path, monkeypatch, method, params, quantized):
    base, models = _big_state(R.torch.float32, quantized)
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "out.safetensors"
    ww.merge(bp, mps, out, method=method, lam=0.7, seed=5, chunk_size=5000, **params)
    assert_close_ulp(load(out), R.merge(base, models, method, lam=0.7, seed=5, **params), atol=slack(method))
    monkeypatch.setenv("WEIGHTWEAVE_FORCE_RADIX", "1")
    radix = tmp_path / "radix.safetensors"
    ww.merge(bp, mps, radix, method=method, lam=0.7, seed=5, **params)
    assert digest(out) == digest(radix)


def test_counted_windows_match_kept_keys(tmp_path, monkeypatch, capfd):
    # Beyond ~1 B values per task the statistics windows count each key of their spans instead
    # of keeping the keys (and the sign tally sums its flips per key); small models never get
    # there, so WEIGHTWEAVE_FORCE_DENSE takes that path: the same bytes as the kept keys.
    base, models = _big_state(R.torch.float32, quantized=False)
    bp, mps = write_models(tmp_path / "in", base, models)
    kept = tmp_path / "kept.safetensors"
    ww.merge(bp, mps, kept, method="ties", lam=0.7, chunk_size=5000)
    monkeypatch.setenv("WEIGHTWEAVE_FORCE_DENSE", "1")
    monkeypatch.setenv("WEIGHTWEAVE_DEBUG", "1")
    capfd.readouterr()
    counted = tmp_path / "counted.safetensors"
    report = ww.merge(bp, mps, counted, method="ties", lam=0.7, chunk_size=5000)
    assert "dense [true, true, true]" in capfd.readouterr().err
    assert digest(counted) == digest(kept)
    inputs = sum(p.stat().st_size for p in [bp, *mps])
    assert report.bytes_read < 2.1 * inputs  # one statistics pass, not the radix select's
