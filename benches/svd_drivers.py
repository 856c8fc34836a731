"""Which exact SVD the torch backend should call on CUDA: time and accuracy of cuSOLVER's drivers
(``torch.linalg.svd(driver=...)``: the default, gesvd, gesvdj, gesvda) and of the CPU's LAPACK,
on task-vector-like f32 matrices, each against an f64 SVD of the same matrix.

    python benches/svd_drivers.py [--sizes 4096x4096,4096x1024,768x768] [--repeat 3] [--out FILE]

Error: max |route − f64| / max |f64| of what the methods use: Iso-C's mean(σ)·U Vᵀ and TSV's
rank-k part U_k S_k V_kᵀ (k = r/3). A driver is only worth switching to if it is faster and no less
accurate than the one used today (the default). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

TASKS = 3


def timed(f, repeat: int):
    """Median seconds of ``repeat`` calls after one warm-up, and the last result."""
    r = f()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = f()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], r


def used(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = max(1, s.numel() // TASKS)
    return (u * s.mean()) @ vh, (u[:, :k] * s[:k]) @ vh[:k]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096x4096,4096x1024,768x768")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "svd_drivers.md")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("svd_drivers: needs a CUDA device")
    torch.manual_seed(0)
    routes = [("default", None), ("gesvd", "gesvd"), ("gesvdj", "gesvdj"), ("gesvda", "gesvda")]
    lines = [
        "# Exact SVD routes on CUDA",
        "",
        f"`python benches/svd_drivers.py --sizes {a.sizes} --repeat {a.repeat}`; torch {torch.__version__}, "
        f"{torch.cuda.get_device_name()}, CPU LAPACK with {torch.get_num_threads()} threads. Median seconds of "
        f"{a.repeat} calls; error: max |route − f64 SVD| / max |f64| of Iso-C's mean(σ)·U Vᵀ, then of TSV's rank-k "
        "part (k = r/3).",
        "",
        "| matrix | "
        + " | ".join(f"CUDA {n}: s, Iso-C error, TSV error" for n, _ in routes)
        + " | CPU: s, Iso-C error, TSV error |",
        "|---|" + "---|" * (len(routes) + 1),
    ]
    for size in a.sizes.split(","):
        m, n = map(int, size.split("x"))
        x = ((torch.randn(m, 32) @ torch.randn(32, n)) * 0.05 + 0.01 * torch.randn(m, n)).cuda()
        want = used(*torch.linalg.svd(x.double(), full_matrices=False))
        cells = []
        for _, driver in routes:
            try:
                t, r = timed(lambda d=driver, x=x: torch.linalg.svd(x, full_matrices=False, driver=d), a.repeat)
                iso, top = used(*r)
                cells.append(f"{t:.3f}, {rel(iso, want[0]):.1e}, {rel(top, want[1]):.1e}")
            except RuntimeError as e:  # a driver that refuses this shape
                cells.append(f"fails: {str(e).splitlines()[0][:60]}")
        xc, want_c = x.cpu(), tuple(w.cpu() for w in want)
        t0 = time.perf_counter()
        r = torch.linalg.svd(xc, full_matrices=False)
        iso, top = used(*r)
        cells.append(f"{time.perf_counter() - t0:.3f}, {rel(iso, want_c[0]):.1e}, {rel(top, want_c[1]):.1e}")
        lines.append(f"| {m}×{n} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
