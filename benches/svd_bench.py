"""Time and peak memory of weaving the SVD methods on a model with several 4096×4096 matrices,
against pure torch with every state dict in memory on the same device.

    python benches/svd_bench.py [--matrices 3] [--size 4096] [--tasks 3] [--device cpu|cuda]
                                [--methods iso_c,tsv] [--baseline]

Each run is a subprocess whose anonymous resident memory is sampled every 10 ms (the memory
maps of the inputs are file-backed and not counted). ``--baseline`` adds, per method, the
in-RAM pure-torch run: the state dicts loaded onto the device, M computed once by
``weightweave.reference`` (SPEC's literal code: its TSV keeps every factor), A* of the default Λ
stacked and mean-pooled, the result saved; and the largest difference of its output from
weightweave's. Both timings include reading the inputs and writing the output. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from weightweave._st import save, to_bf16_bits

# A child's start: its arguments and a thread that samples its anonymous resident memory.
SAMPLER = r"""
import json, sys, threading, time
import torch
import weightweave as ww

def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
base, models, out, method, device = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4], sys.argv[5]
start, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
"""
CHILD = (
    SAMPLER
    + r"""
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
ww.weave(base, models, out, method=method, device=device)
secs = time.perf_counter() - t0
done.set()
gpu = torch.cuda.max_memory_allocated() if device == "cuda" else 0
print(json.dumps({"seconds": secs, "peak_anon": peak[0], "start_anon": start, "gpu_peak": gpu}))
"""
)

BASELINE = (
    SAMPLER
    + r"""
from safetensors.torch import load_file, save_file
from weightweave import reference as R
torch.set_default_device(device)
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
b = load_file(base, device=device)
ms = [load_file(m, device=device) for m in models]
m = R.merged_task_vector(b, ms, method, 0, None)
p = R.weave(b, ms, method, ww.default_lambdas(method), pool="mean", merged=lambda ws, ps: m)
save_file({k: v.contiguous().cpu() for k, v in p.items()}, out)
secs = time.perf_counter() - t0
done.set()
gpu = torch.cuda.max_memory_allocated() if device == "cuda" else 0
print(json.dumps({"seconds": secs, "peak_anon": peak[0], "start_anon": start, "gpu_peak": gpu}))
"""
)


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return max(float((v.double() - y[n].double()).abs().max()) for n, v in x.items())


def make(root: Path, matrices: int, size: int, tasks: int) -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(0)
    base = {f"layers.{i}.weight": rng.standard_normal((size, size), dtype=np.float32) * 0.02 for i in range(matrices)}
    base["norm.weight"] = np.ones(size, np.float32)
    paths = []
    for t in range(-1, tasks):
        tensors = {}
        for n, w in base.items():
            if t >= 0:
                w = w + rng.standard_normal(w.shape, dtype=np.float32) * 0.002
            tensors[n] = ("BF16", to_bf16_bits(w)) if w.ndim == 2 else ("F32", w)
        p = root / ("base.safetensors" if t < 0 else f"ft{t}.safetensors")
        save(tensors, p)
        paths.append(p)
    return paths[0], paths[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--matrices", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="iso_c,tsv")
    ap.add_argument("--baseline", action="store_true", help="also time pure torch in memory on the device")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base, models = make(root, a.matrices, a.size, a.tasks)
        tensor_mb = a.size * a.size * 4 / 2**20
        print(f"{a.matrices} matrices of {a.size}x{a.size} (one f32 copy = {tensor_mb:.0f} MiB), T = {a.tasks}, "
              f"device {a.device}\n")  # fmt: skip
        print("| method | run | seconds | s per matrix | peak anon MiB | in f32 copies of one matrix | GPU peak MiB "
              "| max abs difference from weightweave |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        runs = [("weightweave", CHILD)] + ([("pure torch, in memory", BASELINE)] if a.baseline else [])
        for method in a.methods.split(","):
            outs = []
            for label, code in runs:
                out = root / f"{method}-{len(outs)}.safetensors"
                cmd = [sys.executable, "-c", code, str(base), ",".join(map(str, models)), str(out), method, a.device]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{label} {method} failed:\n{done.stderr}")
                r = json.loads(done.stdout.splitlines()[-1])
                outs.append(out)
                extra = (r["peak_anon"] - r["start_anon"]) / 2**20
                diff = f"{max_diff(outs[0], out):.2e}" if len(outs) > 1 else ""
                print(f"| {method} | {label} | {r['seconds']:.1f} | {r['seconds'] / a.matrices:.2f} | {extra:.0f} | "
                      f"{extra / tensor_mb:.1f} | {r['gpu_peak'] / 2**20:.0f} | {diff} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
