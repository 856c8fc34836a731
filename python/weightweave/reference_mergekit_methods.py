"""A pure-torch reference of mergekit 0.1.5's other merge methods (``slerp``, ``nuslerp``,
``multislerp``, ``nearswap``, ``passthrough``, ``model_stock``, ``della``, ``della_linear``,
``sce``, ``ram``, ``ramplus_tl``, ``karcher``, ``arcee_fusion``), written from mergekit's own code
(``merge_methods/*.py``, ``sparsify.py``): whole tensors in memory, torch's f32 operations in
mergekit's order. It is what the streamed kernels are tested against. Where mergekit leaves the
outcome to chance or to an unspecified order, the reference takes this project's rules: DELLA's
Bernoulli draws come from the project's counter-based generator (element index within the tensor,
one stream per model), and equal magnitudes or variances rank by position (earlier first).

Reductions over a tensor (norms, dots, sums of squares) are torch's f32 ones by default, as in
mergekit, and so are the few transcendental functions of per-tensor scalars (acos, sin, cos: torch
takes them from SLEEF or MKL, so mergekit's own bits vary with the machine). With
``exact_reductions=True`` the sums are taken in f64 and rounded once to f32, and those functions
come from the C library's f32 ones, which is what weightweave computes: its kernels must then agree
bit for bit, and with torch's reductions and functions to an ulp or so of the results.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence

import numpy as np
import torch

from .reference import StateDict, Tensor, draws, mergeable_names, per_task

F32 = torch.float32
_EXACT = [False]
_LIBM = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
for _f in ("acosf", "sinf", "cosf"):
    getattr(_LIBM, _f).restype = ctypes.c_float
    getattr(_LIBM, _f).argtypes = [ctypes.c_float]


def _fn(name: str, x: Tensor) -> Tensor:
    """torch's acos/sin/cos, or (exact mode) the C library's f32 ones, element by element."""
    if not _EXACT[0]:
        return getattr(torch, name)(x)
    f = getattr(_LIBM, name + "f")
    flat = [f(float(v)) for v in x.reshape(-1).tolist()]
    return torch.tensor(flat, dtype=F32).reshape(x.shape).to(x.dtype)


def _vnorm(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """The L2 norm over `dim` (everything when None): torch's, or exact then rounded."""
    if not _EXACT[0]:
        return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)
    d = x.double().square()
    s = d.sum() if dim is None else d.sum(dim=dim, keepdim=keepdim)
    return s.sqrt().to(F32).to(x.dtype)  # torch's norm of a bf16/f16 tensor is one


def _rsum(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """A sum over a tensor's elements: torch's f32 one, or exact then rounded."""
    if not _EXACT[0]:
        return x.sum() if dim is None else x.sum(dim=dim, keepdim=keepdim)
    d = x.double()
    return (d.sum() if dim is None else d.sum(dim=dim, keepdim=keepdim)).to(F32).to(x.dtype)


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """mergekit's ``slerp`` of one tensor: norms and the dot over the whole tensor."""
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=F32).reshape(-1, 1)
    norm_a = _vnorm(a, dim=1, keepdim=True)
    norm_b = _vnorm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = _rsum((a / norm_a) * (b / norm_b), dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = _fn("acos", torch.where(linear, 0, dot))
    sin_theta = _fn("sin", theta)
    coef_a = torch.where(linear, 1 - tt, _fn("sin", (1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, _fn("sin", tt * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def nuslerp(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    """mergekit's ``nuslerp`` kernel (``dim`` = 0 with row_wise, else −1)."""
    shape = v0.shape
    dim = 0 if row_wise else -1

    def normalize(x: Tensor) -> Tensor:
        return x / _vnorm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = _rsum(normalize(v0) * normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = _fn("acos", torch.where(colinear, 0, cos))
    sin_theta = _fn("sin", theta)
    result = (_fn("sin", (1 - t) * theta) * v0 + _fn("sin", t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def multislerp(tensors: list[Tensor], weights: Sequence[float], base: Tensor | None, normalize_weights: bool = True,
               eps: float = 1e-8) -> Tensor:  # fmt: skip
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(tensors, dim=0)
    if base is not None:
        x = x - base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(list(weights), dtype=x.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = _vnorm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = _vnorm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise ValueError("the weighted sum of the input tensors is zero")
        res = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return res + base if base is not None else res
    mean = mean / mean_norm
    dots = _rsum(units * mean, dim=-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tn = _vnorm(tangent) + eps
    result = mean * _fn("cos", tn) + tangent * (_fn("sin", tn) / tn)
    result = (result * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return result + base if base is not None else result


def nearswap(t: float, a: Tensor, b: Tensor) -> Tensor:
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def model_stock(w_0: Tensor, ws: list[Tensor], filter_wise: bool) -> Tensor:
    shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            prod = _vnorm(a, dim=-1) * _vnorm(b, dim=-1)
            cos.append((_rsum(a * b, dim=-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(den), den))
    return (t * (sum(ws) / n) + (1 - t) * w_0).reshape(shape)


def _ram(deltas: list[Tensor], base: Tensor, epsilon: float, plus: bool, r: float, alpha: float) -> Tensor:
    tv = torch.stack(deltas, dim=0).view(len(deltas), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    z = tv * nonzero
    if plus:
        shared_n = (nonzero & overlap).sum(dim=1)
        unique_n = (nonzero & unique).sum(dim=1)
        lam = 1 + r * (shared_n / unique_n.clamp(min=epsilon)).clamp(min=0, max=alpha)
        merged = (z * unique * lam.unsqueeze(-1)) + (z * overlap / counts.clamp(min=1))
    else:
        merged = (z * unique) + (z * overlap / counts.clamp(min=1))
    return base + merged.sum(dim=0, keepdim=True).reshape_as(base)


def della_mask(x: Tensor, density: float, epsilon: float, seed: int, task: int, name: str) -> Tensor:
    """della_magprune's Bernoulli mask, with ranks along dimension 1 (ties by position) and the
    project's generator at each element's index."""
    t = x.unsqueeze(0) if x.dim() < 2 else x
    mags = t.abs()
    order = torch.sort(mags, dim=1, stable=True).indices
    ranks = order.argsort(dim=1).to(F32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    u = (draws(seed, task, name, x.numel()) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    u = torch.from_numpy(u).reshape(t.shape)
    return (u < probs).to(F32).reshape(x.shape)


def _gta_mix(deltas: list[Tensor], weights: Sequence[float], consensus: bool, normalize: bool) -> Tensor:
    d = torch.stack(deltas)
    w = torch.tensor(list(weights), dtype=F32).reshape(-1, *([1] * (d.dim() - 1)))
    d = d * w
    if consensus:
        majority = (d.sum(dim=0) >= 0).to(F32) * 2 - 1
        mask = (d.sign() == majority).to(F32)
        mixed, divisor = (d * mask).sum(dim=0), (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = d.sum(dim=0), w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if normalize else mixed


def della(base: Tensor, deltas: list[Tensor], weights, name: str, seed: int, consensus: bool, **p) -> Tensor:
    normalize = bool(p.get("normalize", consensus))
    rescale = bool(p.get("rescale", True))
    pruned = []
    for k, tau in enumerate(deltas):
        density, eps = per_task(p.get("density", 1.0), k), per_task(p.get("epsilon", 0.15), k)
        if density >= 1:
            pruned.append(tau)
            continue
        if density <= 0:
            pruned.append(torch.zeros_like(tau))
            continue
        masked = tau * della_mask(tau, density, eps, seed, k, name)
        if rescale:
            before, after = _rsum(tau.abs()), _rsum(masked.abs())
            if not (before < 1e-7 or after < 1e-7):
                masked = masked * (before / after)
        pruned.append(masked)
    return base + _gta_mix(pruned, weights, consensus, normalize)


def _welford_var(tvs: Tensor) -> Tensor:
    """torch's CPU var(unbiased=False) over dim 0: Welford's update in f64, rounded to the
    tensors' dtype."""
    mean = torch.zeros(tvs.shape[1:], dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    for i, x in enumerate(tvs.double()):
        delta = x - mean
        mean = mean + delta / (i + 1)
        m2 = m2 + delta * (x - mean)
    return (m2 / tvs.shape[0]).to(tvs.dtype)


def sce(base: Tensor, deltas: list[Tensor], select_topk: float = 1.0) -> Tensor:
    tvs = torch.stack(deltas, dim=0)
    if select_topk < 1:
        if select_topk <= 0:
            mask = torch.zeros_like(tvs[0])
        else:
            var = _welford_var(tvs)
            k = int(torch.count_nonzero(var) * select_topk)
            mask = torch.zeros_like(var)
            if k > 0:
                order = torch.sort(var.abs().reshape(-1), descending=True, stable=True).indices
                mask.view(-1)[order[:k]] = 1
        tvs = tvs * mask.unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = tvs.sign() == majority
    squares = tvs.square().reshape(tvs.shape[0], -1)
    # torch's mean in bf16/f16 rounds once; in f32 (and exact mode) it is the sum ÷ n.
    w = _rsum(squares, dim=1) / tvs[0].numel() if tvs.dtype == F32 else squares.mean(dim=1)
    total = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
    ew = w.reshape(-1, *([1] * (tvs.dim() - 1))) * erase
    return base + (tvs * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``torch.dot`` (exact products accumulated in f32, one rounding to the dtype), or exact."""
    if not _EXACT[0]:
        return torch.dot(a, b)
    return (a.double() * b.double()).sum().to(F32).to(a.dtype)


def karcher(tensors: list[Tensor], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """mergekit's ``karcher_merge_tensors`` with equal weights, in the tensors' dtype: norms in
    f32 (f64 for f64 tensors), everything else in the dtype, cast back where mergekit casts."""
    if len(tensors) == 1:
        return tensors[0]
    wide = torch.float64 if tensors[0].dtype == torch.float64 else F32
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms, units = [], []
    for x in tensors:
        n = _vnorm(x.to(wide))
        norms.append(n)
        units.append(torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    na = [alphas[i] / total for i in valid]
    vu = [units[i] for i in valid]
    mean = torch.zeros_like(vu[0])
    for a, u in zip(na, vu, strict=True):
        mean += a * u
    mn = _vnorm(mean.to(wide))
    mean = vu[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(na, vu, strict=True):
            dot = torch.clamp(_dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = _fn("acos", dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / _fn("sin", theta)) * (u - dot * mean)
        tn = _vnorm(tangent.to(wide))
        if tn.item() < tol:
            break
        mean = (_fn("cos", tn) * mean + _fn("sin", tn) * (tangent / tn)).to(mean.dtype)
        un = _vnorm(mean.to(wide))
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


def arcee_fusion(base: Tensor, model: Tensor) -> Tensor:
    """mergekit's ``arcee_fusion`` with exact quantiles (mergekit samples past 10^6 elements)."""
    diff = (model - base).abs()
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    imp = diff * _rsum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = torch.sort(imp.reshape(-1)).values
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long()
    q1, med, q3 = flat[idx]
    mask = (imp >= med + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask


def merge_in_dtype(base: StateDict, models: Sequence[StateDict], method: str, dtype: torch.dtype,
                   weights: Sequence[float] | None = None, relative: bool = True, exact_reductions: bool = False,
                   **p: object) -> dict[str, Tensor]:  # fmt: skip
    """mergekit's merged model with the tensors loaded in ``dtype`` and every operation in it, as
    mergekit's run with that ``dtype`` computes (torch's own reductions; with
    ``exact_reductions`` the f32 norms and dots of the methods that take them through
    ``_vnorm``/``_dot`` are exact sums rounded once, and acos/sin/cos the C library's); each
    tensor as the method returns it (arcee_fusion's result is f32)."""
    _EXACT[0] = exact_reductions
    try:
        return _merge(base, models, method, weights, 0, relative, compute=dtype, **p)
    finally:
        _EXACT[0] = False


def merge(base: StateDict, models: Sequence[StateDict], method: str, weights: Sequence[float] | None = None,
          seed: int = 0, relative: bool = True, exact_reductions: bool = False,
          **p: object) -> dict[str, Tensor]:  # fmt: skip
    """mergekit's merged model (f32 arithmetic, written in the base's dtype)."""
    _EXACT[0] = exact_reductions
    try:
        return _merge(base, models, method, weights, seed, relative, **p)
    finally:
        _EXACT[0] = False


def _merge(base, models, method, weights, seed, relative, compute=None, **p):
    ws = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    out = {}
    for n, b0 in base.items():
        if n not in mergeable_names(base):
            out[n] = b0.clone()
            continue
        b = b0.to(compute or F32)
        vals = [m[n].to(compute or F32) for m in models]
        deltas = [v - b for v in vals]
        if method == "slerp":
            r = slerp(float(p["t"]), b, vals[0])
        elif method == "nearswap":
            r = nearswap(float(p["t"]), b, vals[0])
        elif method == "passthrough":
            s = p.get("scale")
            r = vals[0] if s is None else vals[0] * float(s)
        elif method == "nuslerp":
            total = ws[0] + ws[1]
            t = 0.5 if abs(total) < 1e-6 else ws[1] / total
            row_wise, flatten = bool(p.get("nuslerp_row_wise", False)), bool(p.get("nuslerp_flatten", True))
            r = b + nuslerp(t, deltas[0], deltas[1], row_wise, flatten) if relative else nuslerp(
                t, vals[0], vals[1], row_wise, flatten)
        elif method == "multislerp":
            r = multislerp(vals, ws, b if relative else None, bool(p.get("normalize_weights", True)),
                           float(p.get("eps", 1e-8)))  # fmt: skip
        elif method == "model_stock":
            r = model_stock(b, vals, bool(p.get("filter_wise", False)))
        elif method in ("ram", "ramplus_tl"):
            r = _ram(deltas, b, float(p.get("epsilon", 1e-5)), method == "ramplus_tl", float(p.get("r", 0.1)),
                     float(p.get("alpha", 0.2)))  # fmt: skip
        elif method in ("della", "della_linear"):
            r = della(b, deltas, ws, n, seed, method == "della", **p)
        elif method == "karcher":
            r = karcher(([b] if p.get("with_base") else []) + vals, int(p.get("max_iter", 10)),
                        float(p.get("tol", 1e-5)))  # fmt: skip
        elif method == "arcee_fusion":
            r = arcee_fusion(b, vals[0])
        elif method == "sce":
            r = sce(b, deltas, float(p.get("select_topk", 1.0)))
        else:
            raise ValueError(f"unknown method {method}")
        out[n] = r if compute is not None else r.to(b0.dtype)
    return out


__all__ = ["merge", "merge_in_dtype", "slerp", "nuslerp", "multislerp", "nearswap", "model_stock", "della", "sce"]
