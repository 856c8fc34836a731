"""Distributional checks of the randomised parts."""

from __future__ import annotations

import numpy as np
import pytest

import weightweave as ww

N = 200_000


def test_random_pool_picks_each_member_uniformly():
    # Members are distinguishable by value: τ_t = t+1 (t < T), λ_i·M with M = Σ τ = 6.
    T, lambdas = 3, [0.25, 1.0, 2.0, 4.0]
    base = {"w": np.zeros(N, np.float32)}
    models = [{"w": np.full(N, t + 1, np.float32)} for t in range(T)]
    out = ww.weave_arrays(base, models, method="task_arithmetic", lambdas=lambdas, pool="random", seed=9)
    values = [1.0, 2.0, 3.0] + [6.0 * lam for lam in lambdas]
    counts = np.array([(out["w"] == v).sum() for v in values])
    assert counts.sum() == N
    expected = N / len(values)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # 6 degrees of freedom: P(chi2 > 22.46) = 0.001.
    assert chi2 < 22.46, (counts, chi2)


@pytest.mark.parametrize(("density", "rescale"), [(0.5, True), (0.2, True), (0.9, False)])
def test_dare_keeps_density_and_rescales(density, rescale):
    base = {"w": np.zeros(N, np.float32)}
    models = [{"w": np.ones(N, np.float32)}]
    out = ww.merge_arrays(base, models, method="dare", density=density, rescale=rescale, lam=1.0, seed=3)
    kept = out["w"] != 0
    rate = kept.mean()
    sigma = np.sqrt(density * (1 - density) / N)
    assert abs(rate - density) < 5 * sigma, rate
    want = np.float32(1.0) / np.float32(density) if rescale else 1.0
    assert np.all(out["w"][kept] == want)


def test_dare_masks_differ_between_tasks():
    base = {"w": np.zeros(N, np.float32)}
    models = [{"w": np.ones(N, np.float32)}, {"w": np.full(N, 2.0, np.float32)}]
    out = ww.merge_arrays(base, models, method="dare", density=0.5, rescale=False, lam=1.0)
    # With independent masks all four outcomes {0, 1, 2, 3} occur about a quarter of the time.
    freq = np.array([(out["w"] == v).mean() for v in (0, 1, 2, 3)])
    assert np.all(np.abs(freq - 0.25) < 0.01), freq
