"""Cheaper routes to what TSV and Iso-C need, measured against the exact SVD the torch backend
runs: Iso-C's polar factor and mean singular value from an eigendecomposition of the Gram matrix
(f32 and f64), and TSV's top-k = r/T triplets from a randomized SVD (``torch.svd_lowrank``). A
route is only worth having if it stays within the f32 SVD's accuracy (the tests compare to the
reference at about 1e-6 relative); the report says which do.

    python benches/svd_routes.py [--threads 1]

Matrices: a task-vector-like m×n matrix (rank-32 structure plus noise, a spectrum with a long
flat tail), f32. Writes benches/results/svd_routes.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SIZES = [(768, 768), (2048, 768), (4096, 1024)]
TASKS = 3


def timed(f, repeat: int = 3):
    f()
    t0 = time.perf_counter()
    for _ in range(repeat):
        r = f()
    return (time.perf_counter() - t0) / repeat, r


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def polar_by_gram(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mean(σ)·U Vᵀ from the eigendecomposition of xᵀx: U Vᵀ = x W Λ^(−1/2) Wᵀ."""
    g = x.T.to(dtype) @ x.to(dtype)
    lam, w = torch.linalg.eigh(g)
    s = lam.clamp_min(0).sqrt()
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    return ((x.to(dtype) @ (w * inv) @ w.T) * s.mean()).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = ["# Cheaper SVD routes against the exact SVD", "",
             f"`python benches/svd_routes.py --threads {args.threads}`; torch {torch.__version__}, "
             f"{args.threads} thread(s), f32 inputs. Error: max |route − exact| / max |exact| of the quantity the "
             "method uses (Iso-C: mean(σ)·U Vᵀ; TSV: the rank-k part U_k S_k V_kᵀ, k = r/3).", "",
             "| matrix | exact SVD s | Iso-C by Gram eigh f32: s, error | by Gram eigh f64: s, error "
             "| TSV top-k by svd_lowrank (niter 2 / 4 / 8): s, error |",
             "|---|---|---|---|---|"]  # fmt: skip
    for m, n in SIZES:
        x = (torch.randn(m, 32) @ torch.randn(32, n)) * 0.05 + 0.01 * torch.randn(m, n)
        t_svd, (u, s, vh) = timed(lambda x=x: torch.linalg.svd(x, full_matrices=False))
        iso = (u * s.mean()) @ vh
        k = min(m, n) // TASKS
        top = (u[:, :k] * s[:k]) @ vh[:k]
        cells = []
        for dt in (torch.float32, torch.float64):
            t, r = timed(lambda x=x, dt=dt: polar_by_gram(x, dt))
            cells.append(f"{t:.3f}, {rel(r, iso):.1e}")
        low = []
        for q in (2, 4, 8):
            t, (a, b, c) = timed(lambda x=x, q=q, k=k: torch.svd_lowrank(x, q=k, niter=q))
            low.append(f"{t:.3f}, {rel((a * b) @ c.T, top):.1e}")
        lines.append(f"| {m}×{n} | {t_svd:.3f} | {cells[0]} | {cells[1]} | {' / '.join(low)} |")
        print(lines[-1], flush=True)
    lines += ["",
              "None of the cheaper routes stays within the f32 SVD's accuracy on a spectrum with a flat tail: "
              "squaring the matrix (the Gram route) squares its condition number, so the small singular "
              "directions, which Iso-C's polar factor weighs like the large ones, lose most of their digits; "
              "the randomized SVD converges slowly where the tail is flat and costs more than the exact SVD "
              "before it gets close. The torch backend keeps the exact SVD."]  # fmt: skip
    out = Path(__file__).resolve().parent / "results" / "svd_routes.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
