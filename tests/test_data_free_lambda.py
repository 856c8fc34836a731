"""Data-free λ (SPEC "Newest data-free methods and λ"): MetaGPT's weights from the task vectors'
norms and LiNeS's depth scaling, against the reference written from SPEC.md and the LiNeS code
(`weightweave.reference_lambda`), hand cases, and invariants (chunking, threads)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import weightweave as ww
from weightweave import reference as R
from weightweave import reference_lambda as RL
from weightweave.cli import main

from conftest import assert_close_ulp, digest, load, rounding_slack, tree, write_models

BLOCKS = 4
# Blocks 0..3 in three dtypes and ranks, and tensors outside them (embedding, head, a 0-d scale).
SHAPES = {
    "embed.weight": ((19, 12), torch.bfloat16),
    **{f"layers.{i}.attn.weight": ((12, 12), torch.float32) for i in range(BLOCKS)},
    **{f"layers.{i}.mlp.weight": ((17, 12), torch.float16) for i in range(BLOCKS)},
    **{f"layers.{i}.norm.weight": ((12,), torch.float32) for i in range(BLOCKS)},
    "head.weight": ((5, 12), torch.float32),
    "scale": ((), torch.float32),
}


def state(seed: int, tasks: int = 3, scales=(0.02, 0.05, 0.1)):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g).to(dt) for n, (s, dt) in SHAPES.items()}
    base["position_ids"] = torch.arange(7, dtype=torch.int64)
    models = []
    for t in range(tasks):
        models.append({n: (b.float() + scales[t % len(scales)] * torch.randn(b.shape, generator=g)).to(b.dtype)
                       if b.is_floating_point() else b.clone() for n, b in base.items()})  # fmt: skip
    return base, models


@pytest.fixture
def ck(tmp_path):
    base, models = state(5)
    bp, mps = write_models(tmp_path / "in", base, models)
    return base, models, bp, mps


def slack_for(base, models, method, lam, weights=None, extra=0.0, **params):
    s = rounding_slack(base, models, method, [lam], weights=weights, **params)
    return {n: 2 * v + extra for n, v in s.items()}


# ---- MetaGPT ----------------------------------------------------------------------------------


def test_metagpt_hand_case():
    # ‖τ_1‖² = 9 + 16 = 25, ‖τ_2‖² = 75 → λ = (0.25, 0.75); TA at λ = 1: Σ λ_t τ_t.
    base = {"w": np.zeros(2, np.float32), "v": np.zeros(1, np.float32)}
    t1 = {"w": np.array([3.0, 4.0], np.float32), "v": np.zeros(1, np.float32)}
    t2 = {"w": np.array([5.0, 5.0], np.float32), "v": np.array([5.0], np.float32)}
    out = ww.merge_arrays(base, [t1, t2], method="task_arithmetic", lam="metagpt")
    np.testing.assert_array_equal(out["w"], [0.25 * 3 + 0.75 * 5, 0.25 * 4 + 0.75 * 5])
    np.testing.assert_array_equal(out["v"], [3.75])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "magmax", "breadcrumbs", "pcb", "linear"])
def test_metagpt_matches_reference(ck, tmp_path, method):
    base, models, bp, mps = ck
    w = RL.metagpt_weights(base, models)
    assert w[2] > w[1] > w[0] and abs(sum(w) - 1) < 1e-12  # larger fine-tunes weigh more
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method=method, lam="metagpt")
    want = R.merge(base, models, method, 1.0, weights=w)
    assert_close_ulp(load(out), want, atol=slack_for(base, models, method, 1.0, weights=w))
    meta = json.loads(safe_open(str(out), "pt").metadata()["weightweave.recipe"])
    assert meta["weights"] == "metagpt" and meta["lam"] == 1.0


def test_metagpt_weave_and_the_deltas_weighted(ck, tmp_path):
    base, models, bp, mps = ck
    w = RL.metagpt_weights(base, models)
    out = tmp_path / "o.safetensors"
    ww.weave(bp, mps, out, method="ties", weights="metagpt", lambdas=[0.5, 1.0, 1.5])
    want = R.weave(base, models, "ties", [0.5, 1.0, 1.5], weights=w)
    assert_close_ulp(load(out), want, atol=slack_for(base, models, "ties", 1.5, weights=w))


@pytest.mark.parametrize("method", ["iso_c", "tsv"])
def test_metagpt_with_svd_methods_files_and_arrays(ck, tmp_path, method):
    base, models, bp, mps = ck
    w = RL.metagpt_weights(base, models)
    want = R.merge(base, models, method, 1.0, weights=w)
    out = tmp_path / "o.safetensors"
    rep = ww.merge(bp, mps, out, method=method, lam="metagpt", device="cpu")
    slack = {n: v + 1e-4 for n, v in slack_for(base, models, method, 1.0, weights=w).items()}
    assert_close_ulp(load(out), want, atol=slack)
    # The norm pass is one more read of every mergeable input.
    plain = ww.merge(bp, mps, tmp_path / "p.safetensors", method=method, weights=w, device="cpu")
    assert rep.bytes_read > plain.bytes_read
    got = ww.merge_arrays(base, models, method=method, lam="metagpt", device="cpu")
    assert_close_ulp(got, want, atol=slack)


def test_metagpt_is_bit_identical_for_any_chunking_and_threads(ck, tmp_path):
    _, _, bp, mps = ck
    digests = set()
    for i, (threads, chunk) in enumerate([(1, 7), (2, 64), (2, 1 << 18), (1, 1000)]):
        out = tmp_path / f"o{i}.safetensors"
        ww.merge(bp, mps, out, method="task_arithmetic", lam="metagpt", threads=threads, chunk_size=chunk)
        digests.add(digest(out))
    assert len(digests) == 1


def test_metagpt_errors(ck, tmp_path):
    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    with pytest.raises(ww.ParamError, match="not both"):
        ww.merge(bp, mps, out, method="ties", lam="metagpt", weights=[1, 1, 1])
    with pytest.raises(ww.ParamError, match="'lam'"):  # weave's λ are its search space
        ww.weave(bp, mps, out, method="ties", lam="metagpt")
    with pytest.raises(ww.ParamError, match="point 0.*give one of them"):
        ww.weave(bp, mps, out, method="ties", weights="metagpt",
                 search=[{"lam": 1.0, "weights": [1, 2, 3]}])  # fmt: skip
    with pytest.raises(ww.ParamError, match="metagpt"):
        ww.merge(bp, mps, out, method="ties", lam="metagpt-ish")
    # All-zero task vectors: λ_t is 0/0, an error, nothing written.
    zeros = [dict(base) for _ in range(2)]
    zb, zms = write_models(tmp_path / "z", base, zeros)
    with pytest.raises(ww.ParamError, match="every task vector is zero"):
        ww.merge(zb, zms, out, method="task_arithmetic", lam="metagpt")
    assert not out.exists() and tree(tmp_path / "z") == sorted(["base.safetensors", "ft0.safetensors",
                                                                  "ft1.safetensors"])  # fmt: skip


# ---- LiNeS ------------------------------------------------------------------------------------


def test_lines_hand_case():
    # T = 2, L = 2: α = 1/T = 0.5 for task arithmetic; λ = β = 0.4.
    z = np.zeros(2, np.float32)
    base = {"layers.0.w": z, "layers.1.w": z, "head.w": z}
    t1 = {k: np.array([1.0, 2.0], np.float32) for k in base}
    t2 = {k: np.array([3.0, -4.0], np.float32) for k in base}
    out = ww.merge_arrays(base, [t1, t2], method="task_arithmetic", lam=0.4, lines=True)
    m = np.array([4.0, -2.0], np.float32)
    np.testing.assert_allclose(out["layers.0.w"], np.float32(0.5) * m, rtol=0, atol=0)
    np.testing.assert_allclose(out["layers.1.w"], np.float32(0.5 + 0.4) * m, rtol=1e-7)
    np.testing.assert_allclose(out["head.w"], np.float32(0.5) * m, rtol=0, atol=0)
    # An explicit α and L: block ℓ of L = 3 is scaled by α + β·ℓ/2.
    out = ww.merge_arrays(base, [t1, t2], method="task_arithmetic", lam=1.0, lines=True, lines_alpha=0.2,
                          lines_blocks=3)  # fmt: skip
    np.testing.assert_allclose(out["layers.1.w"], np.float32(0.2 + 0.5) * m, rtol=1e-7)
    np.testing.assert_allclose(out["head.w"], np.float32(0.2) * m, rtol=1e-7)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "magmax", "dare_ties", "pcb", "breadcrumbs"])
def test_lines_matches_reference(ck, tmp_path, method):
    base, models, bp, mps = ck
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method=method, lam=0.6, lines=True)
    want = RL.lines_merge(base, models, method, 0.6, BLOCKS)
    # Scales reach α + β (β = λ): the slack of a merge at that λ.
    assert_close_ulp(load(out), want, atol=slack_for(base, models, method, 2.0, extra=1e-7))
    meta = json.loads(safe_open(str(out), "pt").metadata()["weightweave.recipe"])
    assert meta["lines"] == {"alpha": "auto", "blocks": None}


def test_lines_alpha_rule_is_the_norm_ratio(ck):
    base, models, _, _ = ck
    m = R.merged_task_vector(base, models, "ties")
    a = RL.lines_alpha(base, models, m)
    # TIES keeps a fifth of each task vector: its M is far smaller than Σ τ in L1, α > 1/T.
    assert a > 1 / 3
    got = ww.merge_arrays(base, models, method="ties", lam=0.0, lines=True)
    # With β = 0 every tensor is α·M.
    want = R._finish(base, {n: torch.tensor(a, dtype=torch.float32) * x for n, x in m.items()}, None)
    assert_close_ulp(got, want, atol=slack_for(base, models, "ties", 1.0, extra=1e-7))


def test_lines_weave_over_beta_and_alpha(ck, tmp_path):
    base, models, bp, mps = ck
    search = {"lam": [0.2, 0.8], "lines_alpha": [0.1, 0.5]}
    out = tmp_path / "o.safetensors"
    ww.weave(bp, mps, out, method="ties", lines=True, search=search)
    want = RL.lines_weave(base, models, "ties", BLOCKS, search=search)
    assert_close_ulp(load(out), want, atol=slack_for(base, models, "ties", 2.0, extra=1e-7))
    # The default Λ as β, α by the rule, magmax pool.
    ww.weave(bp, mps, out, method="task_arithmetic", lines=True, pool="magmax", overwrite=True)
    want = RL.lines_weave(base, models, "task_arithmetic", BLOCKS, lambdas=ww.default_lambdas("task_arithmetic"),
                          pool="magmax")  # fmt: skip
    assert_close_ulp(load(out), want, atol=slack_for(base, models, "task_arithmetic", 2.0, extra=1e-7))


def test_lines_with_metagpt_and_an_svd_method(ck, tmp_path):
    base, models, bp, mps = ck
    w = RL.metagpt_weights(base, models)
    out = tmp_path / "o.safetensors"
    ww.merge(bp, mps, out, method="iso_c", lam="metagpt", lines=True, lines_alpha=0.3, device="cpu")
    want = RL.lines_merge(base, models, "iso_c", 1.0, BLOCKS, alpha=0.3, weights=w)
    slack = {n: v + 1e-4 for n, v in slack_for(base, models, "iso_c", 2.0, weights=w).items()}
    assert_close_ulp(load(out), want, atol=slack)
    # The α rule needs every M before the first write: refused for the SVD methods, before work.
    with pytest.raises(ww.ParamError, match="give lines_alpha"):
        ww.merge(bp, mps, tmp_path / "x.safetensors", method="tsv", lines=True, device="cpu")
    assert not (tmp_path / "x.safetensors").exists()


def test_lines_is_bit_identical_for_any_chunking_and_threads(ck, tmp_path):
    _, _, bp, mps = ck
    digests = set()
    for i, (threads, chunk) in enumerate([(1, 5), (2, 97), (2, 1 << 18)]):
        out = tmp_path / f"o{i}.safetensors"
        ww.merge(bp, mps, out, method="ties", lines=True, threads=threads, chunk_size=chunk)
        digests.add(digest(out))
    assert len(digests) == 1


def test_lines_errors(tmp_path):
    base, models = state(1)
    with pytest.raises(ww.ParamError, match="lines=True"):
        ww.merge_arrays(base, models, method="ties", lines_alpha=0.3)
    with pytest.raises(ww.ParamError, match="lines_alpha"):
        ww.weave_arrays(base, models, method="ties", search={"lines_alpha": [0.1]})
    with pytest.raises(ww.ParamError, match="tensor 'layers.3"):
        ww.merge_arrays(base, models, method="ties", lines=True, lines_blocks=3)
    with pytest.raises(ww.ParamError, match="at least 2"):
        ww.merge_arrays(base, models, method="ties", lines=True, lines_blocks=1)
    flat = {"a.weight": base["head.weight"], "b.weight": base["embed.weight"]}
    with pytest.raises(ww.ParamError, match="no tensor name holds a block index"):
        ww.merge_arrays(flat, [flat, flat], method="task_arithmetic", lines=True)
    # A zero merged vector leaves α undefined.
    with pytest.raises(ww.ParamError, match="give lines_alpha"):
        ww.merge_arrays(base, [base, base], method="ties", lines=True)


def test_cli_and_recipes(ck, tmp_path):
    base, models, bp, mps = ck
    w = RL.metagpt_weights(base, models)
    out = tmp_path / "cli.safetensors"
    assert main(["merge", str(bp), *map(str, mps), "-o", str(out), "--method", "ties", "--lam", "metagpt",
                 "-q"]) == 0  # fmt: skip
    assert_close_ulp(load(out), R.merge(base, models, "ties", 1.0, weights=w),
                     atol=slack_for(base, models, "ties", 1.0, weights=w))  # fmt: skip
    out2 = tmp_path / "cli2.safetensors"
    grid = ["--grid", "lam=0.2,0.6", "--grid", "lines_alpha=0.1,0.3"]
    assert main(["weave", str(bp), *map(str, mps), "-o", str(out2), "--method", "task_arithmetic",
                 "--set", "lines=true", *grid, "-q"]) == 0  # fmt: skip
    search = {"lam": [0.2, 0.6], "lines_alpha": [0.1, 0.3]}
    want = RL.lines_weave(base, models, "task_arithmetic", BLOCKS, search=search)
    assert_close_ulp(load(out2), want, atol=slack_for(base, models, "task_arithmetic", 2.0, extra=1e-7))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {bp}\nmodels: [{', '.join(map(str, mps))}]\nmethod: ties\nlam: metagpt\n"
                      "params: {lines: true, lines_alpha: 0.25}\n")  # fmt: skip
    out3 = tmp_path / "rec.safetensors"
    assert main(["run", str(recipe), str(out3), "-q"]) == 0
    want = RL.lines_merge(base, models, "ties", 1.0, BLOCKS, alpha=0.25, weights=w)
    assert_close_ulp(load(out3), want, atol=slack_for(base, models, "ties", 2.0, weights=w, extra=1e-7))


@pytest.mark.parametrize("method,kw,k", [("slerp", {"t": 0.5}, 1), ("model_stock", {}, 3), ("karcher", {}, 3),
                                         ("sce", {}, 3), ("ram", {}, 3), ("arcee_fusion", {}, 1),
                                         ("nearswap", {"t": 0.01}, 1), ("passthrough", {}, 1)])  # fmt: skip
def test_methods_without_weights_refuse_them(method, kw, k):
    # mergekit's methods without a `weight` parameter: weights would be ignored, so they are an error.
    base, models = state(2)
    with pytest.raises(ww.ParamError, match="takes no per-model weights"):
        ww.merge_arrays(base, models[:k], method=method, weights=[0.5] * k, **kw)
    with pytest.raises(ww.ParamError, match="MetaGPT"):
        ww.merge_arrays(base, models[:k], method=method, lam="metagpt", **kw)
