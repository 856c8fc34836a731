"""A pure-torch reference of the data-free λ options, written from SPEC.md and the papers' code.

MetaGPT (Zhou et al. 2024): λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² over the whole model, used as per-task
weights with λ = 1. LiNeS (Wang et al. 2025; ``wang-kee/LiNeS`` ``src/eval/eval.py::LiNeS_scaling``
and ``aggregation.py``): the merged task vector of block ℓ (0-based in the code) is scaled by
α + β·ℓ/(L − 1), α outside the blocks; for merging α = ‖Σ_t τ_t‖₁ / ‖M‖₁ / T and β is the searched
scaling coefficient. The block of a name is, as in that code, the first i in 0..L−1 whose ``.i.``
the name contains. Whole state dicts in memory; the test oracle, never the fast path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .reference import (
    StateDict,
    Tensor,
    _finish,
    merged_task_vector,
    pool_members,
    search_points,
    task_vectors,
)


def metagpt_weights(base: StateDict, models: Sequence[StateDict]) -> list[float]:
    """λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖², the norms over every mergeable element (in f64)."""
    tvs = task_vectors(base, models)
    norms = [sum(float((x.double() ** 2).sum()) for x in tv.values()) for tv in tvs]
    total = sum(norms)
    return [n / total for n in norms]


def lines_block(name: str, blocks: int) -> int | None:
    """The LiNeS code's block of a tensor name: the first i whose ``.i.`` it contains."""
    for i in range(blocks):
        if f".{i}." in name:
            return i
    return None


def lines_scales(names: Sequence[str], alpha: float, beta: float, blocks: int) -> dict[str, float]:
    """α + β·ℓ/(L − 1) for names in block ℓ, α for the rest."""
    out = {}
    for n in names:
        b = lines_block(n, blocks)
        out[n] = alpha if b is None else alpha + beta * (b / (blocks - 1))
    return out


def lines_alpha(base: StateDict, models: Sequence[StateDict], m: Mapping[str, Tensor],
                weights: Sequence[float] | None = None) -> float:  # fmt: skip
    """‖Σ_t τ'_t‖₁ / ‖M‖₁ / T, both norms over the whole flattened model (as ``aggregation.py``)."""
    tvs = task_vectors(base, models, weights)
    summed = sum(float(sum(tv[n] for tv in tvs).double().abs().sum()) for n in m)
    norm_m = sum(float(x.double().abs().sum()) for x in m.values())
    return summed / norm_m / len(models)


def lines_merge(
    base: StateDict,
    models: Sequence[StateDict],
    method: str,
    beta: float,
    blocks: int,
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    **params: float | bool | str,
) -> dict[str, Tensor]:
    """θ_pre + LiNeS-scaled M: the merge's λ is β."""
    m = merged_task_vector(base, models, method, seed, weights, **params)
    a = lines_alpha(base, models, m, weights) if alpha is None else alpha
    s = lines_scales(list(m), a, beta, blocks)
    return _finish(base, {n: s[n] * x for n, x in m.items()}, None)


def lines_weave(
    base: StateDict,
    models: Sequence[StateDict],
    method: str,
    blocks: int,
    search: object = None,
    lambdas: Sequence[float] | None = None,
    alpha: float | None = None,
    pool: str = "mean",
    include_deltas: bool = True,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    **params: float | bool | str,
) -> dict[str, Tensor]:
    """Weight Weaving over LiNeS-scaled merges, A* stacked explicitly: a point's λ is β, its
    ``lines_alpha`` (else ``alpha``, else the rule for its M) is α."""
    members_m = []
    for pt in search_points(method, lambdas, search):
        ps = {**params, **{k: v for k, v in pt.items() if k not in ("lam", "weights", "lines_alpha")}}
        m = merged_task_vector(base, models, method, seed, pt.get("weights", weights), **ps)  # type: ignore[arg-type]
        a = pt.get("lines_alpha", alpha)
        a = lines_alpha(base, models, m, weights) if a is None else float(a)  # type: ignore[arg-type]
        s = lines_scales(list(m), a, float(pt["lam"]), blocks)  # type: ignore[arg-type]
        members_m.append({n: s[n] * x for n, x in m.items()})
    tvs = task_vectors(base, models, weights)
    p = {}
    for n in members_m[0]:
        a_star = torch.stack(([tv[n] for tv in tvs] if include_deltas else []) + [m[n] for m in members_m])
        p[n] = pool_members(a_star, pool, seed, n)
    return _finish(base, p, None)
