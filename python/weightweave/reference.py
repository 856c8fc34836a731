"""A pure-torch reference implementation of every method, written literally from SPEC.md.

Whole state dicts in memory, the global task vector flattened exactly as the authors' code does
(``torch.cat`` of every mergeable tensor in name order), ``kthvalue`` for TIES, sorts for PCB and
Breadcrumbs, and A* stacked explicitly. It is the test oracle and the benchmark baseline, never
the fast path. The counter-based generator is re-implemented here in numpy from its definition
(see ``rust/core/src/rng.rs``), independently of the Rust code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]

MERGEABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
POOL_STREAM = _MASK
DEFAULT_LAM = {"task_arithmetic": 0.3, "magmax": 0.5}
# SPEC: default Λ per method, step 0.1, both ends included.
DEFAULT_LAMBDAS = {
    **{m: (1, 10) for m in ("task_arithmetic", "linear", "dare", "magmax", "breadcrumbs")},
    "ties": (1, 15), "dare_ties": (1, 15), "pcb": (1, 25), "tsv": (5, 20), "iso_c": (1, 20), "iso_cts": (1, 20),
    "wudi": (1, 20),
}  # fmt: skip
OUT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}


# ---- the counter-based generator ---------------------------------------------------------------


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _fnv1a64(name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & _MASK
    return h


def draws(seed: int, stream: int, name: str, n: int) -> np.ndarray:
    """The generator's 64-bit draws for elements 0..n-1 of tensor ``name``."""
    key = _mix_int(_mix_int(seed ^ _mix_int((stream + _GOLDEN) & _MASK)) ^ _fnv1a64(name))
    idx = np.arange(1, n + 1, dtype=np.uint64)
    return _mix(np.uint64(key) + idx * np.uint64(_GOLDEN))


def dare_mask(seed: int, task: int, name: str, n: int, density: float) -> np.ndarray:
    u = (draws(seed, task, name, n) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    return u < np.float32(density)


def pick(seed: int, name: str, n: int, members: int) -> np.ndarray:
    x = draws(seed, POOL_STREAM, name, n) >> np.uint64(32)
    return ((x * np.uint64(members)) >> np.uint64(32)).astype(np.int64)


# ---- task vectors ------------------------------------------------------------------------------


def mergeable_names(base: StateDict) -> list[str]:
    return sorted(n for n, t in base.items() if t.dtype in MERGEABLE)


def task_vectors(
    base: StateDict, models: Sequence[StateDict], weights: Sequence[float] | None = None
) -> list[dict[str, Tensor]]:
    """τ'_t = w_t·τ_t (SPEC: per-model weights, default 1), in f32."""
    names = mergeable_names(base)
    tvs = [{n: m[n].to(torch.float32) - base[n].to(torch.float32) for n in names} for m in models]
    if weights is not None:
        ws = [torch.tensor(w, dtype=torch.float32) for w in weights]
        tvs = [{n: w * x for n, x in tv.items()} for w, tv in zip(ws, tvs, strict=True)]
    return tvs


def _flatten(tv: Mapping[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([tv[n].reshape(-1) for n in names]) if names else torch.zeros(0)


def _unflatten(flat: Tensor, like: Mapping[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    out, i = {}, 0
    for n in names:
        k = like[n].numel()
        out[n] = flat[i : i + k].reshape(like[n].shape)
        i += k
    return out


def per_task(v: object, t: int) -> float:
    """SPEC: a parameter given as a list holds one value per task; a scalar applies to all."""
    return float(v[t]) if isinstance(v, (list, tuple)) else float(v)  # type: ignore[arg-type]


def _dare(tvs: list[dict[str, Tensor]], seed: int, density: object, rescale: bool) -> list[dict[str, Tensor]]:
    out = []
    for t, tv in enumerate(tvs):
        p = per_task(density, t)
        d = {}
        for n, x in tv.items():
            m = torch.from_numpy(dare_mask(seed, t, n, x.numel(), p)).reshape(x.shape)
            d[n] = x * m / p if rescale else x * m
        out.append(d)
    return out


# ---- methods -----------------------------------------------------------------------------------


def _ties_flat(x: Tensor, density: object) -> Tensor:
    """TIES on a T×d matrix, literally: kthvalue trim (per task, with its density), sign
    election, disjoint mean."""
    d = x.shape[1]
    rows = []
    for t in range(x.shape[0]):
        kk = d - int(d * per_task(density, t))
        if kk > 0:
            thr = x[t].abs().kthvalue(kk).values
            rows.append(x[t] * (x[t].abs() >= thr))
        else:
            rows.append(x[t].clone())
    trimmed = torch.stack(rows)
    s = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(s.sum())
    s[s == 0] = majority
    keep = ((s > 0) & (trimmed > 0)) | ((s < 0) & (trimmed < 0))
    selected = trimmed * keep
    count = (selected != 0).sum(dim=0).float()
    return selected.sum(dim=0) / torch.clamp(count, min=1)


def _crumbs(x: Tensor, density: float, gamma: float) -> Tensor:
    if x.dim() == 0:
        return x.clone()
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    g, b = int(n * gamma), int(n * density)
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).expand_as(order).contiguous())
    mask = (ranks >= g) & (ranks < g + b)
    return (rows * mask).reshape(x.shape)


def _clamp(x: Tensor, lo: float, hi: float) -> Tensor:
    d = x.shape[1]
    s = torch.sort(x, dim=1).values
    a = s[:, int(d * lo)].unsqueeze(1)
    b = s[:, max(int(d * (1 - hi) - 1), 0)].unsqueeze(1)
    return torch.clamp(x, a, b)


def _norm(x: Tensor) -> Tensor:
    mn = x.min(dim=1, keepdim=True).values
    mx = x.max(dim=1, keepdim=True).values
    den = mx - mn
    return torch.where(den > 0, (x - mn) / torch.where(den > 0, den, 1), torch.zeros_like(x))


def _pcb_flat(x: Tensor, ratio: float) -> Tensor:
    t = x.shape[0]
    a = _clamp(x.abs(), 0.01, 0.01)
    xc = torch.sign(x) * a
    na = _norm(a)
    nn = torch.sign(x) * na
    intra = torch.exp(t * na**2)
    inter = torch.zeros_like(x)
    for j in range(t):
        inter = inter + torch.tanh(nn * nn[j : j + 1])
    b = intra * inter
    s = _norm(_clamp(b, 1 - ratio, 0))
    return (s * xc).sum(dim=0) / torch.clamp(s.sum(dim=0), min=1e-12)


def _tsv(taus: list[Tensor]) -> Tensor:
    """SPEC.md's TSV for one 2-D tensor, literally (reference compute_and_sum_svd_mem_reduction)."""
    t_count = len(taus)
    m, n = taus[0].shape
    r = min(m, n)
    k = max(1, int(r / t_count))
    u_bar, s_bar, v_bar = torch.zeros(m, r), torch.zeros(r), torch.zeros(r, n)
    for t, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        lo, hi = t * k, min(t * k + k, r)
        if lo >= r:
            continue
        u_bar[:, lo:hi] = u[:, : hi - lo]
        s_bar[lo:hi] = s[: hi - lo]
        v_bar[lo:hi, :] = vh[: hi - lo, :]
    u_u, _, v_u = torch.linalg.svd(u_bar, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(v_bar, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(s_bar), u_v, v_v))


def _iso_c(taus: list[Tensor]) -> Tensor:
    """SPEC.md's Iso-C for one 2-D tensor: the sum's spectrum replaced by its mean."""
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(dim=0), full_matrices=False)
    return u @ torch.diag(torch.full_like(s, s.mean().item())) @ vh


def _iso_cts(taus: list[Tensor], common_space_fraction: float) -> Tensor:
    """SPEC.md's Iso-CTS for one 2-D tensor, in the reference's order of operations
    (danielm1405/iso-merging `iso_cts`)."""
    shape = taus[0].shape
    n_tasks = len(taus)
    combined = sum(taus)
    common = int(min(shape) * common_space_fraction)
    specific_total = round((min(shape) - common) / n_tasks) * n_tasks
    common = min(shape) - specific_total
    u, s, v = torch.linalg.svd(combined, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per_task = int((min(shape) - common) / n_tasks)
    # The reference allocates these as zeros_like the first task's SVD factors: the same shapes.
    r = min(shape)
    space_u, space_s, space_v = torch.zeros(shape[0], r), torch.zeros(r), torch.zeros(r, shape[1])
    for i, w in enumerate(taus):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        space_u[:, i * per_task : (i + 1) * per_task] = u_ts[:, :per_task]
        space_s[i * per_task : (i + 1) * per_task] = s_ts[:per_task]
        space_v[i * per_task : (i + 1) * per_task, :] = v_ts[:per_task, :]
    at = n_tasks * per_task
    space_u[:, at : at + common] = cu
    space_s[at : at + common] = cs
    space_v[at : at + common, :] = cv
    uu, _, vu = torch.linalg.svd(space_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(space_v, full_matrices=False)
    space_s = torch.ones_like(space_s) * space_s.mean()
    return torch.linalg.multi_dot((uu @ vu, torch.diag(space_s), uv @ vv))


def _wudi(taus: list[Tensor], steps: int, lr: float) -> Tensor:
    """SPEC.md's WUDI for one 2-D tensor, as FusionBench's ``wudi_merging`` computes it."""
    tvs = torch.stack(taus)
    merged = torch.nn.Parameter(torch.sum(tvs, dim=0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    l2_norms = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
    # SPEC's exception to the reference: a zero τ_t's term (0/0 there) is left out.
    tvs, l2_norms = tvs[l2_norms > 0], l2_norms[l2_norms > 0]
    with torch.enable_grad():
        for _ in range(steps if len(tvs) else 0):
            disturbing = merged.unsqueeze(0) - tvs
            product = torch.matmul(disturbing, tvs.transpose(1, 2))
            loss = torch.sum(torch.square(product) / l2_norms.unsqueeze(-1).unsqueeze(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return merged.detach()


def _running_mean(s: Tensor) -> Tensor:
    """Iso-CTS's reference mean elsewhere: m = τ_1, then m += (τ_t − m)/t."""
    m = s[0].clone()
    for i in range(1, len(s)):
        m += (s[i] - m) / (i + 1)
    return m


def merged_task_vector(
    base: StateDict,
    models: Sequence[StateDict],
    method: str,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    **params: float | bool | str,
) -> dict[str, Tensor]:
    """f_merge(τ'_1..τ'_T) → M for every mergeable tensor (f32)."""
    names = mergeable_names(base)
    tvs = task_vectors(base, models, weights)
    if method in ("dare", "dare_ties"):
        tvs = _dare(tvs, seed, params.get("density", 0.5), bool(params.get("rescale", True)))
    stack = {n: torch.stack([tv[n] for tv in tvs]) for n in names}
    if method in ("task_arithmetic", "dare"):
        return {n: s.sum(dim=0) for n, s in stack.items()}
    if method == "linear":  # M = Σ w_t τ_t / Σ w_t (normalize), or the plain weighted sum
        total = float(sum(weights)) if weights is not None else float(len(models))
        norm = bool(params.get("normalize", True))
        return {n: s.sum(dim=0) / total if norm else s.sum(dim=0) for n, s in stack.items()}
    if method == "magmax":
        out = {}
        for n, s in stack.items():
            best = s[0].clone()
            for x in s[1:]:
                best = torch.where(x.abs() >= best.abs(), x, best)
            out[n] = best
        return out
    if method in ("ties", "dare_ties"):
        density = params.get("ties_density" if method == "dare_ties" else "density", 0.2)
        if params.get("scope", "global") == "tensor":
            return {n: _ties_flat(s.reshape(len(tvs), -1), density).reshape(s.shape[1:]) for n, s in stack.items()}
        flat = torch.stack([_flatten(tv, names) for tv in tvs])
        return _unflatten(_ties_flat(flat, density), tvs[0], names)
    if method == "breadcrumbs":
        density, gamma = params.get("density", 0.15), params.get("gamma", 0.006)
        return {
            n: sum(_crumbs(x, per_task(density, t), per_task(gamma, t)) for t, x in enumerate(s))  # type: ignore[misc]
            for n, s in stack.items()
        }
    if method in ("tsv", "iso_c"):
        pattern = params.get("svd_exclude")
        svd = _tsv if method == "tsv" else _iso_c
        return {
            n: svd(list(s)) if s.dim() == 3 and not (pattern and re.search(str(pattern), n)) else s.mean(dim=0)
            for n, s in stack.items()
        }
    if method == "wudi":
        pattern = params.get("svd_exclude")
        steps, lr = int(params.get("steps", 400)), float(params.get("lr", 1e-5))
        return {
            n: _wudi(list(s), steps, lr) if s.dim() == 3 and not (pattern and re.search(str(pattern), n))
            else s.sum(dim=0) / len(s)
            for n, s in stack.items()
        }
    if method == "iso_cts":
        pattern = params.get("svd_exclude")
        frac = float(params.get("common_space_fraction", 0.8))
        return {
            n: _iso_cts(list(s), frac) if s.dim() == 3 and not (pattern and re.search(str(pattern), n))
            else _running_mean(s)
            for n, s in stack.items()
        }
    if method == "pcb":
        flat = torch.stack([_flatten(tv, names) for tv in tvs])
        return _unflatten(_pcb_flat(flat, float(params.get("ratio", 0.05))), tvs[0], names)
    raise ValueError(f"unknown method {method}")


def _finish(base: StateDict, p: Mapping[str, Tensor], out_dtype: str | None) -> dict[str, Tensor]:
    out = {}
    for n, t in base.items():
        if n in p:
            dt = OUT_DTYPES[out_dtype] if out_dtype else t.dtype
            out[n] = (t.to(torch.float32) + p[n]).to(dt)
        else:
            out[n] = t.clone()
    return out


def merge(
    base: StateDict,
    models: Sequence[StateDict],
    method: str,
    lam: float | None = None,
    seed: int = 0,
    out_dtype: str | None = None,
    weights: Sequence[float] | None = None,
    **params: float | bool | str,
) -> dict[str, Tensor]:
    """θ_pre + λ·M."""
    lam = DEFAULT_LAM.get(method, 1.0) if lam is None else lam
    m = merged_task_vector(base, models, method, seed, weights, **params)
    return _finish(base, {n: lam * x for n, x in m.items()}, out_dtype)


def search_points(method: str, lambdas: Sequence[float] | None, search: object) -> list[dict[str, object]]:
    """SPEC's search space as its list of points: Λ alone, a grid (the Cartesian product in
    row-major order of the names as given; the default Λ first when it names no ``lam``), or an
    explicit list."""
    if search is None:
        if lambdas is None:
            a, b = DEFAULT_LAMBDAS.get(method, (1, 10))
            lambdas = [k / 10 for k in range(a, b + 1)]
        return [{"lam": lam} for lam in lambdas]
    if isinstance(search, Mapping):
        axes = list(search.items())
        if "lam" not in search:
            a, b = DEFAULT_LAMBDAS.get(method, (1, 10))
            axes.insert(0, ("lam", [k / 10 for k in range(a, b + 1)]))
        points = [{}]
        for name, values in axes:
            points = [{**p, name: v} for p in points for v in values]
        return points
    return [dict(p) for p in search]  # type: ignore[union-attr]


def weave(
    base: StateDict,
    models: Sequence[StateDict],
    method: str,
    lambdas: Sequence[float] | None = None,
    pool: object = "mean",
    include_deltas: bool = True,
    seed: int = 0,
    out_dtype: str | None = None,
    weights: Sequence[float] | None = None,
    search: object = None,
    merged: object = None,
    **params: float | bool | str,
) -> dict[str, Tensor]:
    """Weight Weaving with A* stacked explicitly, as the paper's code does: the weighted deltas
    τ'_t, then λ_p·M(params_p) for every point p of the search space (a point's own ``weights``
    weight M only). ``pool`` may be a function of A* (N × numel, float32 numpy) → P.
    ``merged(weights, params)`` computes M (default: this module's ``merged_task_vector``)."""

    def default_merged(ws, ps):
        return merged_task_vector(base, models, method, seed, ws, **ps)

    merged = merged or default_merged
    ms = []
    for pt in search_points(method, lambdas, search):
        ps = {**params, **{k: v for k, v in pt.items() if k not in ("lam", "weights")}}
        ms.append((float(pt["lam"]), merged(pt.get("weights", weights), ps)))  # type: ignore[arg-type]
    tvs = task_vectors(base, models, weights)
    p = {}
    for n in ms[0][1]:
        members = ([tv[n] for tv in tvs] if include_deltas else []) + [lam * m[n] for lam, m in ms]
        p[n] = pool_members(torch.stack(members), pool, seed, n)
    return _finish(base, p, out_dtype)


def pool_members(a_star: Tensor, pool: object, seed: int, name: str) -> Tensor:
    """P = pool(A*) of one tensor, A* stacked along dimension 0 (SPEC's pools, or a function)."""
    shape, members = a_star.shape[1:], a_star.shape[0]
    if callable(pool):
        flat = a_star.reshape(members, -1).numpy()
        return torch.from_numpy(np.asarray(pool(flat), dtype=np.float32)).reshape(shape)
    if pool == "mean":
        return a_star.mean(dim=0)
    if pool == "random":
        idx = torch.from_numpy(pick(seed, name, int(np.prod(shape, dtype=np.int64)), members)).reshape(1, *shape)
        return torch.gather(a_star, 0, idx)[0]
    if pool == "magmax":
        best = a_star[0].clone()
        for x in a_star[1:]:
            best = torch.where(x.abs() >= best.abs(), x, best)
        return best
    raise ValueError(f"unknown pool {pool}")
