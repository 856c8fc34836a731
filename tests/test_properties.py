"""Hypothesis-driven agreement with the reference on arbitrary small arrays."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import weightweave as ww
from weightweave import reference as R

from conftest import assert_close_ulp, rounding_slack

finite = st.floats(-4, 4, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def models(draw):
    shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=9))
    tasks = draw(st.integers(1, 4))
    base = draw(arrays(np.float32, shape, elements=finite))
    fts = [draw(arrays(np.float32, shape, elements=finite)) for _ in range(tasks)]
    return {"w": base}, [{"w": f} for f in fts]


METHODS = st.sampled_from(["task_arithmetic", "magmax", "ties", "dare", "breadcrumbs", "pcb"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), METHODS, st.sampled_from(["mean", "random", "magmax"]), st.booleans(), st.integers(0, 2**32))
def test_weave_arrays_match_reference(m, method, pool, include_deltas, seed):
    base, fts = m
    lambdas = [0.3, 0.8, 1.1]
    got = ww.weave_arrays(base, fts, method=method, lambdas=lambdas, pool=pool, include_deltas=include_deltas,
                          seed=seed, chunk_size=5)  # fmt: skip
    tb = {k: torch.from_numpy(v) for k, v in base.items()}
    tf = [{k: torch.from_numpy(v) for k, v in f.items()} for f in fts]
    want = R.weave(tb, tf, method, lambdas, pool=pool, include_deltas=include_deltas, seed=seed)
    tol = rounding_slack(tb, tf, method, lambdas, include_deltas, seed=seed, pcb_abs=1e-6)
    assert_close_ulp({k: torch.from_numpy(v) for k, v in got.items()}, want, atol=tol)
