"""SPEC.md's hand-checkable cases, exactly, and invariants that need no oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightweave as ww

from conftest import load, make_state, write_models

ZERO = {"w": np.zeros(4, np.float32)}
T1 = {"w": np.array([1, -2, 3, 0], np.float32)}
T2 = {"w": np.array([2, 2, -1, 0], np.float32)}


def test_task_arithmetic_is_a_sum():
    out = ww.merge_arrays(ZERO, [T1, T2], method="task_arithmetic", lam=1.0)
    np.testing.assert_array_equal(out["w"], [3, 0, 2, 0])


def test_magmax_ties_go_to_later_task():
    out = ww.merge_arrays(ZERO, [T1, T2], method="magmax", lam=1.0)
    np.testing.assert_array_equal(out["w"], [2, 2, 3, 0])


def test_weave_mean_hand_case():
    out = ww.weave_arrays(ZERO, [T1, T2], method="task_arithmetic", lambdas=[0.5, 1.0], pool="mean")
    np.testing.assert_array_equal(out["w"], [1.875, 0, 1.25, 0])


def test_weave_without_deltas_is_mean_lambda_times_m():
    out = ww.weave_arrays(ZERO, [T1, T2], method="task_arithmetic", lambdas=[0.5, 1.0], include_deltas=False)
    np.testing.assert_array_equal(out["w"], [2.25, 0, 1.5, 0])


def test_weave_magmax_pool_picks_largest_lambda_times_m_or_delta():
    # Members per element: τ1, τ2, 0.5·M, 1.0·M. Element 0: |3| wins; element 1: τ2's 2 (later
    # than τ1's −2, M = 0); element 2: 3 ties τ1's 3 → the later member (1.0·M = 2)? no: |3| > |2|.
    out = ww.weave_arrays(ZERO, [T1, T2], method="task_arithmetic", lambdas=[0.5, 1.0], pool="magmax")
    np.testing.assert_array_equal(out["w"], [3, 2, 3, 0])


def test_ties_hand_case():
    # density 0.5 of d = 4: kk = 2, so each task keeps its 2nd-smallest |τ| and above.
    # τ1 = [1,-2,3,0] → thr 1 → [1,-2,3,0]; τ2 = [2,2,-1,0] → thr 1 → [2,2,-1,0].
    # sums [3,0,2,0] → signs [+,0,+,0]; majority sign(+1+1) = + fills the zeros.
    # kept: e0 {1,2} → 1.5; e1 {2} → 2; e2 {3} → 3; e3 none → 0.
    out = ww.merge_arrays(ZERO, [T1, T2], method="ties", density=0.5, lam=1.0)
    np.testing.assert_array_equal(out["w"], [1.5, 2, 3, 0])


def test_breadcrumbs_hand_case():
    row = np.array([1.0, -9.0, 3.0, 0.5, -4.0, 2.0, 0.0, 5.0, -0.1, 0.2], np.float32)
    out = ww.merge_arrays(
        {"w": np.zeros(10, np.float32)}, [{"w": row}], method="breadcrumbs", density=0.3, gamma=0.1, lam=1.0
    )
    # drop the top 1 (−9), keep the next 3 (5, −4, 3).
    np.testing.assert_array_equal(out["w"], [0, 0, 3, 0, -4, 0, 0, 5, 0, 0])


@pytest.mark.parametrize("method", ww.METHODS)
@pytest.mark.parametrize("mode", ["merge", "mean", "random", "magmax"])
def test_zero_deltas_return_base_exactly(tmp_path, method, mode):
    base, _ = make_state(3, tasks=0)
    models = [{k: v.clone() for k, v in base.items()} for _ in range(3)]
    bp, mps = write_models(tmp_path, base, models)
    out = tmp_path / "out.safetensors"
    if mode == "merge":
        ww.merge(bp, mps, out, method=method)
    else:
        ww.weave(bp, mps, out, method=method, pool=mode)
    got = load(out)
    for k, v in base.items():
        assert torch.equal(got[k], v), k
