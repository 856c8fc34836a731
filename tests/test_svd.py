"""TSV, Iso-C and Iso-CTS (torch backend, streamed through the Rust core) against the reference and
against properties that hold by construction."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference as R
from weightweave import torch_backend

from conftest import assert_close_ulp, digest, load, write_models

SVD_SHAPES = {"tall": (48, 20), "wide": (12, 40), "square": (16, 16), "thin": (30, 2)}
OTHER = {"bias": (20,), "scale": (), "conv": (2, 3, 2, 2)}


def state(seed: int, tasks: int):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in {**SVD_SHAPES, **OTHER}.items()}
    base["half"] = torch.randn(10, 6, generator=g).to(torch.bfloat16)
    base["ids"] = torch.arange(4)
    models = [
        {n: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point() else t
         for n, t in base.items()}
        for _ in range(tasks)
    ]  # fmt: skip
    return base, models


# The backend runs its SVDs on CUDA when there is one (its default device), so the reference computes
# M there too. Two devices' SVDs agree only as far as each matrix's conditioning allows: on these
# tiny fixtures (T = 5 tasks' subspaces packed into 16 dimensions) an H200's and a CPU's differ by
# 1e-4 relative, beyond svd_slack, while the same device's agree within it.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(f, *args, **kw):
    """f (a reference function) on DEVICE, its state-dict and tensor arguments moved there and its
    result brought back to the CPU."""

    def there(x):
        if isinstance(x, torch.Tensor):
            return x.to(DEVICE)
        if isinstance(x, dict):
            return {n: there(t) for n, t in x.items()}
        return [there(m) for m in x] if isinstance(x, list) else x

    with torch.device(DEVICE):
        out = f(*map(there, args), **kw)
    return {n: t.cpu() for n, t in out.items()} if isinstance(out, dict) else out.cpu()


def ref_weave(base, models, method, lambdas, seed=0, **params):
    """R.weave with M computed on DEVICE (pooling stays R's, on the CPU)."""

    def merged(weights, ps):
        return on_device(R.merged_task_vector, base, models, method, seed, weights, **ps)

    return R.weave(base, models, method, lambdas, seed=seed, merged=merged, **params)


def ref_merge(base, models, method, lam, **params):
    """R.merge (θ + λ·M) with M computed on DEVICE: a weave of one point and no deltas."""
    return ref_weave(base, models, method, [lam], include_deltas=False, **params)


def svd_slack(base, models, method, lambdas, **params):
    """SVDs agree to f32 accuracy, not to the ulp: a relative slack on the size of each merge."""
    m = R.merged_task_vector(base, models, method, **params)
    lam = max(abs(x) for x in lambdas)
    scale = {n: lam * x.abs().max().item() + max(tv[n].abs().max().item() for tv in R.task_vectors(base, models))
             for n, x in m.items()}  # fmt: skip
    return {n: 2e-5 * v for n, v in scale.items()}


@pytest.mark.parametrize("tasks", [1, 2, 3, 5])
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_files_match_reference(tmp_path, method, tasks):
    base, models = state(tasks, tasks)
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "out.safetensors"
    lambdas = ww.default_lambdas(method)
    extra = {"steps": 40, "lr": 1e-3} if method == "wudi" else {}  # defaults: the arrays test
    ww.weave(bp, mps, out, method=method, chunk_size=64, **extra)
    want = ref_weave(base, models, method, lambdas, **extra)
    assert_close_ulp(load(out), want, atol=svd_slack(base, models, method, lambdas, **extra))
    plain = tmp_path / "plain.safetensors"
    ww.merge(bp, mps, plain, method=method, lam=0.7, **extra)
    assert_close_ulp(load(plain), ref_merge(base, models, method, 0.7, **extra),
                     atol=svd_slack(base, models, method, [0.7], **extra))  # fmt: skip


def test_more_tasks_than_rank(tmp_path):
    # "thin" has r = 2 < T = 5: k = 1 and tasks 2..4 contribute nothing.
    base, models = state(9, 5)
    got = ww.merge_arrays(base, models, method="tsv", lam=1.0)
    assert_close_ulp(got, ref_merge(base, models, "tsv", 1.0), atol=svd_slack(base, models, "tsv", [1.0]))
    thin = R.task_vectors(base, models)
    only_first_two = on_device(R._tsv, [thin[0]["thin"], thin[1]["thin"]])  # slots 0 and 1 with k = 1
    torch.testing.assert_close(got["thin"] - base["thin"], only_first_two, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "random", "magmax"])
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_arrays_and_pools_match_reference(method, pool):
    base, models = state(4, 3)
    got = ww.weave_arrays(base, models, method=method, pool=pool, lambdas=[0.5, 1.5], seed=3)
    want = ref_weave(base, models, method, [0.5, 1.5], pool=pool, seed=3)
    assert_close_ulp(got, want, atol=svd_slack(base, models, method, [0.5, 1.5]))


def test_iso_c_spectrum_is_flat_and_subspace_kept():
    g = torch.Generator().manual_seed(1)
    zero = {"w": torch.zeros(30, 8)}
    taus = [torch.randn(30, 8, generator=g) for _ in range(3)]
    m = ww.merge_arrays(zero, [{"w": t} for t in taus], method="iso_c", lam=1.0)["w"]
    total = sum(taus)
    s_total = torch.linalg.svdvals(total)
    s_m = torch.linalg.svdvals(m)
    torch.testing.assert_close(s_m, torch.full_like(s_m, s_total.mean().item()), rtol=1e-5, atol=1e-5)
    u = torch.linalg.svd(total, full_matrices=False).U
    proj = u @ (u.T @ m)  # M's columns lie in the column space of Σ τ_t
    torch.testing.assert_close(proj, m, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("frac", [0.8, 0.5, 0.25])
def test_iso_cts_spectrum_is_flat_and_holds_each_task(frac):
    # By construction: M's singular values all equal the mean of the kept ones; with T tasks the
    # rank splits into the common subspace of Σ τ_t and s directions per task (SPEC's split).
    g = torch.Generator().manual_seed(3)
    zero = {"w": torch.zeros(40, 12)}
    taus = [torch.randn(40, 12, generator=g) for _ in range(3)]
    m = ww.merge_arrays(zero, [{"w": t} for t in taus], method="iso_cts", lam=1.0,
                        common_space_fraction=frac)["w"]  # fmt: skip
    r = 12
    common = int(r * frac)
    common = r - round((r - common) / 3) * 3
    per_task = (r - common) // 3
    s_m = torch.linalg.svdvals(m)
    total = sum(taus)
    s_total = torch.linalg.svdvals(total)
    # The kept values: the common part's top singular values and each task's top ones outside it.
    u_c = torch.linalg.svd(total, full_matrices=False).U[:, :common]
    kept = [s_total[:common]]
    for t in taus:
        kept.append(torch.linalg.svdvals(t - u_c @ (u_c.T @ t))[:per_task])
    mean = torch.cat(kept).sum() / r
    torch.testing.assert_close(s_m, torch.full_like(s_m, mean.item()), rtol=1e-4, atol=1e-5)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, models = state(11, 3)
    a = ww.merge_arrays(base, models, method="iso_cts", lam=1.0, common_space_fraction=1.0)
    b = ww.merge_arrays(base, models, method="iso_c", lam=1.0)
    for n in SVD_SHAPES:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5)
    # Elsewhere Iso-CTS keeps its reference's running mean (m += (τ_t − m)/t), bit for bit.
    tvs = R.task_vectors(base, models)
    for n in OTHER:
        m = tvs[0][n].clone()
        for i in range(1, 3):
            m += (tvs[i][n] - m) / (i + 1)
        assert torch.equal(a[n], base[n] + m), n


def test_iso_cts_refuses_a_rank_too_small_before_any_work(tmp_path):
    # r = 10, fraction 0.1: int(1) common, then round(9/6)·6 = 12 task-specific columns > 10.
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(10, 12, generator=g)}
    models = [{"w": base["w"] + torch.randn(10, 12, generator=g)} for _ in range(6)]
    with pytest.raises(ww.ParamError, match="iso_cts: tensor 'w'.*rank 10"):
        ww.merge_arrays(base, models, method="iso_cts", common_space_fraction=0.1)
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "o.safetensors"
    with pytest.raises(ww.ParamError, match="iso_cts: tensor 'w'"):
        ww.merge(bp, mps, out, method="iso_cts", common_space_fraction=0.1)
    assert not out.exists()
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ww.ParamError, match="common_space_fraction"):
            ww.merge_arrays(base, models, method="iso_cts", common_space_fraction=bad)
    ww.merge(bp, mps, out, method="iso_cts", common_space_fraction=0.5)  # fine with a larger fraction
    assert out.exists()


def _wudi_loss(m, taus):
    return sum(((m - t) @ t.T).square().sum() / t.square().sum() for t in taus)


def test_wudi_hand_cases():
    g = torch.Generator().manual_seed(5)
    zero = {"w": torch.zeros(16, 10)}
    # One task: M = τ has zero loss and zero gradient, so Adam never moves it.
    tau = torch.randn(16, 10, generator=g)
    m = ww.merge_arrays(zero, [{"w": tau}], method="wudi", lam=1.0, steps=30, lr=1e-2)["w"]
    assert torch.equal(m, tau)
    # Tasks on disjoint columns: (Σ τ − τ_t) τ_tᵀ = τ_s τ_tᵀ = 0 for s ≠ t, so M stays Σ τ_t.
    a, b = torch.zeros(16, 10), torch.zeros(16, 10)
    a[:, :5], b[:, 5:] = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    m = ww.merge_arrays(zero, [{"w": a}, {"w": b}], method="wudi", lam=1.0, steps=30, lr=1e-2)["w"]
    assert torch.equal(m, a + b)
    # Overlapping tasks: the descent lowers the interference it measures.
    taus = [torch.randn(16, 10, generator=g) for _ in range(3)]
    m = ww.merge_arrays(zero, [{"w": t} for t in taus], method="wudi", lam=1.0, steps=50, lr=1e-2)["w"]
    assert _wudi_loss(m, taus) < 0.9 * _wudi_loss(sum(taus), taus)
    # A zero delta has no interference: its term (0/0 in FusionBench, which turns M into NaN) is
    # left out, and the other tasks' merge is what it would be without it.
    with_zero = ww.merge_arrays(zero, [{"w": t} for t in taus] + [zero], method="wudi", lam=1.0, steps=50,
                                lr=1e-2)["w"]  # fmt: skip
    assert torch.equal(with_zero, m)
    for bad in ({"steps": 1.5}, {"steps": -1}, {"lr": 0.0}, {"lr": float("nan")}):
        with pytest.raises(ww.ParamError):
            ww.merge_arrays(zero, [{"w": tau}], method="wudi", **bad)


def test_tsv_single_task_reproduces_a_low_rank_delta():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(24, 3, generator=g) @ torch.randn(3, 18, generator=g)  # rank 3
    m = ww.merge_arrays({"w": torch.zeros(24, 18)}, [{"w": tau}], method="tsv", lam=1.0)["w"]
    torch.testing.assert_close(m, tau, rtol=1e-4, atol=1e-4)


def test_svd_exclude_routes_to_the_mean(tmp_path):
    base, models = state(5, 3)
    got = ww.merge_arrays(base, models, method="tsv", lam=1.0, svd_exclude="^(tall|wide)$")
    tvs = R.task_vectors(base, models)
    for n in ("tall", "wide"):
        mean = torch.stack([tv[n] for tv in tvs]).mean(dim=0)
        torch.testing.assert_close(got[n], base[n] + mean, rtol=0, atol=1e-6)
    bp, mps = write_models(tmp_path / "in", base, models)
    ww.merge(bp, mps, tmp_path / "o.safetensors", method="tsv", lam=1.0, svd_exclude="^(tall|wide)$")
    assert_close_ulp(load(tmp_path / "o.safetensors"), got, atol=1e-6)
    with pytest.raises(ww.ParamError):
        ww.merge(bp, mps, tmp_path / "x.safetensors", method="tsv", svd_exclude="(")


def test_deterministic_and_sharded(tmp_path):
    base, models = state(6, 3)
    bp, mps = write_models(tmp_path / "in", base, models)
    a, b = tmp_path / "a", tmp_path / "b"
    # The same `threads`: on the CPU, LAPACK's SVD may change in its last bits with torch's
    # thread count (MKL 2024.2 on an AMD EPYC does for the 12×40 tensor here), which `threads`
    # pins (README, cluster determinism). Chunking and sharding must not change a bit.
    ww.weave(bp, mps, a, method="tsv", pool="random", seed=1, shard_size=2000, threads=2)
    ww.weave(bp, mps, b, method="tsv", pool="random", seed=1, shard_size=2000, threads=2, chunk_size=7)
    assert digest(a) == digest(b)
    assert (a / "model.safetensors.index.json").exists()


def test_too_big_for_the_device_falls_back_to_cpu_with_a_warning(tmp_path, monkeypatch):
    base, models = state(7, 2)
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.setattr(torch_backend, "_fits", lambda *_: False)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        ww.merge(bp, mps, tmp_path / "o.safetensors", method="iso_c", lam=1.0)
    assert_close_ulp(load(tmp_path / "o.safetensors"), R.merge(base, models, "iso_c", lam=1.0),
                     atol=svd_slack(base, models, "iso_c", [1.0]))  # fmt: skip


def test_errors_leave_nothing(tmp_path):
    base, models = state(8, 2)
    bp, mps = write_models(tmp_path / "in", base, models)
    bad = dict(models[1])
    bad["tall"] = torch.zeros(5, 5)
    from safetensors.torch import save_file

    save_file(bad, str(tmp_path / "in" / "bad.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ww.MismatchError, match="tall"):
        ww.weave(bp, [mps[0], tmp_path / "in" / "bad.safetensors"], out, method="tsv")
    assert not out.exists()

    def boom(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ww.weave(bp, mps, out, method="tsv", progress=boom)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(
        ["base.safetensors", "ft0.safetensors", "ft1.safetensors", "bad.safetensors"]
    )


def test_cli_runs_tsv(tmp_path):
    from weightweave.cli import main

    base, models = state(10, 2)
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "o.safetensors"
    assert main(["weave", str(bp), *map(str, mps), "-o", str(out), "--method", "iso_c",
                 "--set", "svd_exclude=^conv", "--set", "device=cpu", "-q"]) == 0  # fmt: skip
    assert_close_ulp(load(out), R.weave(base, models, "iso_c", ww.default_lambdas("iso_c"), svd_exclude="^conv"),
                     atol=svd_slack(base, models, "iso_c", ww.default_lambdas("iso_c")))  # fmt: skip


def test_cli_and_recipe_run_iso_cts(tmp_path):
    from weightweave.cli import main

    base, models = state(12, 3)
    bp, mps = write_models(tmp_path / "in", base, models)
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(bp), *map(str, mps), "-o", str(out), "--method", "iso_cts", "--lam", "0.6",
                 "--set", "common_space_fraction=0.5", "--set", "device=cpu", "-q"]) == 0  # fmt: skip
    want = R.merge(base, models, "iso_cts", lam=0.6, common_space_fraction=0.5)
    slack = svd_slack(base, models, "iso_cts", [0.6], common_space_fraction=0.5)
    assert_close_ulp(load(out), want, atol=slack)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"base: {bp}\nmodels: [{', '.join(map(str, mps))}]\nmethod: iso_cts\nlam: 0.6\n"
        f"params: {{common_space_fraction: 0.5}}\nout: {tmp_path / 'r.safetensors'}\n"
    )
    assert main(["run", str(recipe), "-q"]) == 0
    assert_close_ulp(load(tmp_path / "r.safetensors"), want, atol=slack)


def test_gpu_share_of_a_cluster_unit():
    """Hand-worked: the working set is (8 + T held deltas) f32 words per element, against 16 GiB,
    in eighths of a GPU, at least one, at most eight."""
    from weightweave.torch_backend import gpu_share

    assert gpu_share((1024, 1024), 3, "tsv") == 0.125  # 32 MiB
    assert gpu_share((16384, 16384), 3, "tsv") == 0.5  # 8 GiB: 4 eighths
    assert gpu_share((16384, 16384 + 1), 3, "tsv") == 0.625  # just over: 5 eighths
    assert gpu_share((16384, 16384), 8, "iso_cts") == 1.0  # 16 words: 16 GiB
    assert gpu_share((32768, 32768), 8, "wudi") == 1.0  # more than a GPU: a whole one
