"""A merge on Ray against the same merge on one machine, in one run, and a model on paper of
larger clusters from the measured figures.

On this machine a "cluster" of k workers is a local Ray runtime with k CPUs (`ray.init(num_cpus=k)`,
one process per k, started fresh): what it shows is Ray's overhead (start-up of the workers, the
node checks, one task per unit) against the local run's rayon pool over the same cores, not the
scaling of a real cluster, whose nodes each bring their own disks and cores. Every output is
checked bit-identical to the local one. Times are whole calls, best of `--repeat`, warm page cache.

    python benches/ray_scaling.py [--hidden 512] [--layers 4] [--workers 1,2,4]

Writes benches/results/ray_scaling.md and ray_scaling.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mergekit_compare import DATA, make_models  # noqa: E402

from weightweave.torch_backend import gpu_share  # noqa: E402

METHODS = {"task_arithmetic": {"lam": 0.3}, "ties": {"density": 0.3}, "tsv": {"device": "cpu"}}

CHILD = """
import json, sys, time, ray, weightweave as ww
k, base, out, repeat, *models = sys.argv[1:]
k, repeat = int(k), int(repeat)
t0 = time.perf_counter()
if k:
    ray.init(num_cpus=k, include_dashboard=False, log_to_driver=False)
start = time.perf_counter() - t0
res = {}
for method, kw in json.loads(sys.stdin.read()).items():
    best = None
    for r in range(repeat):
        t = time.perf_counter()
        # TSV pins one thread locally too: LAPACK's last bits change with torch's threads.
        threads = 1 if k or method == "tsv" else None
        rep = ww.merge(base, models, f"{out}/{method}", method=method, overwrite=True, threads=threads,
                       cluster="ray" if k else None, **kw)
        best = min(best or 1e9, time.perf_counter() - t)
    res[method] = {"seconds": best, "bytes_read": rep.bytes_read}
print(json.dumps({"start": start, "runs": res}))
"""


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def run(k: int, base: Path, fts: list[Path], out: Path, repeat: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, "-c", CHILD, str(k), str(base), str(out), str(repeat), *map(str, fts)],
                       input=json.dumps(METHODS), capture_output=True, text=True)  # fmt: skip
    if p.returncode:
        raise SystemExit(f"the run with {k} workers failed:\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for m in METHODS:
        res["runs"][m]["digest"] = digest(out / m)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    base, fts = make_models(DATA / f"mergekit-{args.hidden}x{args.layers}" / "models", args.hidden, args.layers)
    work = DATA / "ray-scaling"
    cores = os.cpu_count() or 1
    local = run(0, base, fts, work / "local", args.repeat)
    rows = {"local": local}
    for k in map(int, args.workers.split(",")):
        rows[f"ray {k}"] = run(k, base, fts, work / f"ray{k}", args.repeat)
    inputs = sum(f.stat().st_size for d in [base, *fts] for f in d.glob("*.safetensors"))
    lines = [
        "# weightweave on Ray: a local Ray runtime of k workers against one process",
        "",
        f"Llama-shaped f32 checkpoints, hidden {args.hidden}, {args.layers} layers, base + 3 fine-tunes "
        f"({inputs / 1e9:.2f} GB of inputs); {cores} cores. Command: `python benches/ray_scaling.py "
        f"--hidden {args.hidden} --layers {args.layers} --workers {args.workers}`. Times are whole `ww.merge` "
        f"calls, best of {args.repeat}, warm page cache; each Ray row is a fresh local runtime "
        "(`ray.init(num_cpus=k)`, its start-up not counted) with one thread per unit and 2k units, TIES's global "
        "statistics gathered over the units pass by pass; TSV on the CPU (`device='cpu'`), its local run on one "
        "thread too, since LAPACK's last bits change with torch's threads; every "
        "output is bit-identical to the local one (checked).",
        "",
        "| run | " + " | ".join(f"{m} s | × local" for m in METHODS) + " | identical |",
        "|---|" + "---|---|" * len(METHODS) + "---|",
    ]
    for name, r in rows.items():
        cells = []
        for m in METHODS:
            s = r["runs"][m]["seconds"]
            cells.append(f"{s:.2f} | {s / local['runs'][m]['seconds']:.2f}×")
        same = all(r["runs"][m]["digest"] == local["runs"][m]["digest"] for m in METHODS)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
        if not same:
            raise SystemExit(f"{name}: output differs from the local run")
    ties_local = local["runs"]["ties"]
    rate = ties_local["bytes_read"] / ties_local["seconds"]
    work = svd_work(matrices(base), 3)
    per_core = work / local["runs"]["tsv"]["seconds"]
    llama70 = svd_work(LLAMA_70B, 4)
    hours = llama70 / per_core / 3600
    lines += ["", MODEL.format(rate=rate / 1e9, ta=inputs / local["runs"]["task_arithmetic"]["seconds"] / 1e9,
                               per_core=per_core / 1e9, core_hours=hours, h64=hours / 64, h512=hours / 512,
                               tsv_local=local["runs"]["tsv"]["seconds"], equiv=llama70 / BIG,
                               e8=llama70 / BIG / 8, e64=llama70 / BIG / 64,
                               share=gpu_share((28672, 8192), 4, "tsv"),
                               share_emb=gpu_share((128256, 8192), 4, "tsv"))]  # fmt: skip
    (HERE / "results" / "ray_scaling.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / "ray_scaling.json").write_text(json.dumps(
        {"hidden": args.hidden, "layers": args.layers, "cores": cores, "inputs": inputs, "rows": rows,
         "when": time.strftime("%Y-%m-%d")}, indent=2))  # fmt: skip
    print("\n".join(lines))


# Llama-3-70B's 2-D matrices per layer (80 layers): q, o (8192²), k, v (1024 × 8192), gate, up, down
# (28672 × 8192); with the embedding and the head (128256 × 8192).
BIG = 28672 * 8192 * 8192
LLAMA_70B = [(8192, 8192)] * 160 + [(1024, 8192)] * 160 + [(28672, 8192)] * 240 + [(128256, 8192)] * 2


def matrices(base: Path) -> list[tuple[int, int]]:
    """The 2-D tensors' shapes of a checkpoint directory."""
    from safetensors import safe_open

    out = []
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out += [tuple(st.get_slice(n).get_shape()) for n in st.keys() if len(st.get_slice(n).get_shape()) == 2]
    return out


def svd_work(shapes: list[tuple[int, int]], tasks: int) -> float:
    """TSV's work in units of m·n·min(m, n): T SVDs of the deltas, two of the stacked bases."""
    return float(sum(m * n * min(m, n) * (tasks + 2) for m, n in shapes))


MODEL = """## A model on paper of larger runs

Measured here: one process merges task arithmetic at {ta:.2f} GB/s of inputs and TIES (global, exact) reads
at {rate:.2f} GB/s on 2 cores, so the arithmetic is not what limits a node whose disk or network link is
slower than that per core pair. Every pass is the units': each reads its own tensors, in the statistics
passes (TIES's and PCB's global threshold and majority sign, gathered as partials the driver merges) and in
the output pass, so the cluster reads exactly the bytes one process reads (`Report.bytes_read`, checked
equal by tests/test_ray.py) and the driver reads none; a statistics pass costs one round of tasks.

- **405 B parameters in bf16, base + 4 fine-tunes, 8 nodes, one shared file system.** Inputs 4.05 TB,
  output 0.81 TB. At 2 GB/s per node from a file system serving 16 GB/s in aggregate (a Lustre or cloud
  file store of that class), one read of the inputs takes 4.05 TB / 16 GB/s ≈ 4.2 min, against 34 min on
  one node at 2 GB/s: task arithmetic (and every per-tensor method) ≈ 4.2 min, global TIES (a statistics
  read, then the output read; two when the sampled windows hold) ≈ 8.4 min against 68 min.
- **TSV on a 70 B model.** TSV's work per 2-D matrix is about (T + 2) SVDs of cost ∝ m·n·min(m, n)
  (T of the deltas, two of the stacked bases). Measured here: {tsv_local:.2f} s for the bench model's
  matrices on one thread, {per_core:.2f} G units of m·n·min(m, n) per second per core. Llama-3-70B with 4
  fine-tunes (560 layer matrices, the embedding and the head) is then ≈ {core_hours:.0f} core-hours of
  CPU SVD at this small model's rate per core (large matrices usually run faster per unit of work):
  ≈ {h64:.1f} h on 64 cores, ≈ {h512:.2f} h on 512, since units share nothing but the file system
  (each reads its own matrices: ≈ 0.7 TB of bf16 inputs in all, minutes at the rates above).
  On GPUs the same division holds per unit; the per-GPU rate is not measured here (no GPU was lent to
  this task). In GPU terms the 70 B model's work is ≈ {equiv:.0f} SVDs of one 8192 × 28672 matrix: with a
  GPU that does one in s seconds, ≈ {equiv:.0f}·s seconds on 1 GPU, {e8:.0f}·s on 8, {e64:.0f}·s on 64. A unit
  of 8192 × 28672 matrices asks Ray for {share:g} of a GPU, one holding the embedding for {share_emb:g}
  (`torch_backend.gpu_share`: the working set against 16 GiB)."""


if __name__ == "__main__":
    main()
