"""The benchmark suite: weightweave against the read floor, pure torch and mergekit.

    python benches/run.py                 # 0.1 B: every tool and method, and the capped runs (~15 min)
    python benches/run.py --full          # 0.1, 0.5 and 1.0 B: the run behind benches/results (~1 h)
    python benches/run.py --quick         # 0.1 B, weightweave and the read floors only (< 1 min)

Writes ``benches/results/results.md`` (tables), ``results.json`` and ``plot.png``. Checkpoints
are generated once into ``benches/data/`` (Llama-shaped bf16, base + 3 fine-tunes). mergekit is
run if ``mergekit-yaml`` is found (``--mergekit``; see benches/README.md to install it apart).
Times are medians of ``--repeats`` runs on a warm page cache; memory is the peak anonymous and
file-backed resident memory of the process, sampled every 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from make_checkpoints import make
from measure import Result, can_cap, measure, run_once

HERE = Path(__file__).resolve().parent
METHODS = ["task_arithmetic", "ties", "dare", "breadcrumbs", "magmax", "pcb"]
MODES = ["merge", "mean", "random", "magmax"]
# mergekit name and parameters for the methods it shares, and our matching configuration.
MERGEKIT = {
    "task_arithmetic": ("task_arithmetic", {"weight": 0.3}, {}, {"normalize": False}),
    "ties": ("ties", {"weight": 1.0, "density": 0.2}, {"scope": "tensor"}, {"normalize": True}),
    "dare": ("dare_linear", {"weight": 1.0, "density": 0.5}, {}, {"normalize": False}),
    "breadcrumbs": ("breadcrumbs", {"weight": 1.0, "density": 0.15, "gamma": 0.006}, {}, {"normalize": False}),
}


def _weightweave() -> str:
    """The console script of the running interpreter's environment (not a shim on PATH, whose
    start-up would be timed too)."""
    here = Path(sys.executable).parent / "weightweave"
    return str(here) if here.exists() else (shutil.which("weightweave") or "weightweave")


def baseline_cap() -> int | None:
    """A memory cap for torch and mergekit runs, so one that outgrows the machine is killed
    cleanly (and reported) instead of taking the machine down."""
    if not can_cap():
        return None
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    return total - 4 * 2**30


def ww_cmd(base: Path, fts: list[Path], out: Path, method: str, mode: str, extra: dict | None = None) -> list[str]:
    cmd = [_weightweave(), "merge" if mode == "merge" else "weave", str(base), *map(str, fts), "-o", str(out)]
    cmd += ["--method", method, "-q"]
    if mode != "merge":
        cmd += ["--pool", mode]
    for k, v in (extra or {}).items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def mergekit_config(path: Path, base: Path, fts: list[Path], method: str) -> None:
    name, params, _, top = MERGEKIT[method]
    lines = [f"merge_method: {name}", f"base_model: {base}", "models:"]
    for f in fts:
        lines += [f"  - model: {f}", f"    parameters: {json.dumps(params)}"]
    lines += [f"parameters: {json.dumps(top)}", "dtype: bfloat16"]
    path.write_text("\n".join(lines) + "\n")


def _failure(res: Result) -> str:
    r = res.runs[0]
    if r.rc < 0:
        return f"killed (signal {-r.rc})" + (f", over the {r.cap_bytes / 2**30:.0f} GiB cap" if r.cap_bytes else "")
    return f"failed: {r.stderr.strip().splitlines()[-1:]}"


def row(size: float, tool: str, method: str, mode: str, res: Result, inputs: int, note: str = "") -> dict:
    return {
        "size_b": size,
        "tool": tool,
        "method": method,
        "mode": mode,
        "ok": res.ok,
        "seconds": res.seconds if res.ok else None,
        "peak_anon": res.peak_anon,
        "peak_file": res.peak_file,
        "inputs": inputs,
        "note": note if res.ok else (f"{note}; " if note else "") + _failure(res),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1", help="billions of parameters, comma-separated")
    ap.add_argument("--full", action="store_true", help="sizes 0.1,0.5,1.0 (the published results)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smallest size, weightweave and floors only")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path to mergekit-yaml")
    ap.add_argument("--cap-mb", type=int, default=512, help="memory cap for the capped runs (0: skip)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()
    sizes = [0.1, 0.5, 1.0] if a.full else [float(s) for s in a.sizes.split(",")]
    if a.quick:
        sizes, a.no_torch, a.mergekit, a.cap_mb = sizes[:1], True, None, 0
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("WW_BENCH_TMP", "/tmp")) / f"ww-bench-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    bcap = baseline_cap()
    rows: list[dict] = []
    t_start = time.time()

    def out_clean(p: Path):
        def clean():
            shutil.rmtree(p, ignore_errors=True)
            p.unlink(missing_ok=True) if p.is_file() else None

        return clean

    for size in sizes:
        dirs = make(HERE / "data" / f"p{size}", size, 3)
        base, fts = dirs[0], dirs[1:]
        files = sorted(str(f) for d in dirs for f in d.glob("*.safetensors"))
        inputs = sum(os.path.getsize(f) for f in files)
        first = size == sizes[0]
        print(f"== {size} B parameters: {inputs / 1e9:.2f} GB of inputs", flush=True)
        cat = measure(["sh", "-c", 'cat "$@" > /dev/null', "sh", *files], a.repeats)
        rows.append(row(size, "cat", "read floor", "-", cat, inputs))
        floor = measure([py, "-c", "import sys, weightweave._rust as r; r.read_floor(sys.argv[1:])", *files], a.repeats)
        rows.append(row(size, "rust mmap", "read floor", "-", floor, inputs))
        print(f"   cat {cat.seconds:.2f}s, rust read floor {floor.seconds:.2f}s", flush=True)

        out = work / "out"
        # Beyond the first size: every method plain and woven (mean) up to 0.5 B, then the two
        # that show growth. Baselines run every shared method up to 0.5 B, task arithmetic beyond.
        full = size <= 0.5
        configs = (
            [(m, mode) for m in METHODS for mode in MODES]
            if first
            else [(m, mode) for m in (METHODS if full else ["task_arithmetic", "ties"]) for mode in ("merge", "mean")]
        )
        for method, mode in configs:
            res = measure(ww_cmd(base, fts, out, method, mode), a.repeats, warmup=False, cleanup=out_clean(out))
            rows.append(row(size, "weightweave", method, mode, res, inputs))
            print(f"   weightweave {method:16} {mode:7} {res.seconds if res.ok else float('nan'):7.2f}s "
                  f"anon {res.peak_anon / 2**20:6.0f} MiB", flush=True)  # fmt: skip
        if a.mergekit:
            res = measure(ww_cmd(base, fts, out, "ties", "merge", {"scope": "tensor"}), a.repeats, warmup=False,
                          cleanup=out_clean(out))  # fmt: skip
            rows.append(row(size, "weightweave", "ties", "merge", res, inputs, "scope=tensor (as mergekit)"))

        if not a.no_torch:
            tmethods = METHODS if first else list(MERGEKIT) if full else ["task_arithmetic"]
            for method in tmethods:
                for mode in ["merge", "mean"]:
                    if mode == "mean" and method != "task_arithmetic":
                        continue
                    tout = work / "torch.safetensors"
                    cmd = [py, str(HERE / "torch_baseline.py"), str(base), *map(str, fts), "-o", str(tout),
                           "--method", method] + ([] if mode == "merge" else ["--weave", mode])  # fmt: skip
                    res = measure(cmd, a.repeats, warmup=False, cap_bytes=bcap, cleanup=out_clean(tout), timeout=900)
                    rows.append(row(size, "pure torch", method, mode, res, inputs))
                    print(f"   torch       {method:16} {mode:7} {res.seconds if res.ok else float('nan'):7.2f}s "
                          f"anon {res.peak_anon / 2**20:6.0f} MiB", flush=True)  # fmt: skip

        if a.mergekit:
            for method in MERGEKIT if full else ["task_arithmetic"]:
                cfg = work / f"{method}.yml"
                mergekit_config(cfg, base, fts, method)
                mout = work / "mk"
                res = measure([a.mergekit, str(cfg), str(mout), "--no-copy-tokenizer"], a.repeats, warmup=False,
                              cap_bytes=bcap, cleanup=out_clean(mout), timeout=1800)  # fmt: skip
                rows.append(row(size, "mergekit", method, "merge", res, inputs, f"mergekit {MERGEKIT[method][0]}"))
                print(f"   mergekit    {method:16} merge   {res.seconds if res.ok else float('nan'):7.2f}s "
                      f"anon {res.peak_anon / 2**20:6.0f} MiB", flush=True)  # fmt: skip

    capped: list[dict] = []
    if a.cap_mb and can_cap():
        size = min(sizes, key=lambda s: abs(s - 0.5))
        dirs = make(HERE / "data" / f"p{size}", size, 3)
        inputs = sum(os.path.getsize(f) for d in dirs for f in d.glob("*.safetensors"))
        cap = a.cap_mb * 2**20
        for method in METHODS:
            out = work / "capped"
            out_clean(out)()
            r = run_once(ww_cmd(dirs[0], dirs[1:], out, method, "mean"), cap_bytes=cap, timeout=1800)
            res = Result([r])
            capped.append(row(size, "weightweave", method, "mean", res, inputs, f"cap {a.cap_mb} MiB"))
            print(f"   capped {a.cap_mb} MiB: weave {method:16} rc={r.rc} {r.seconds:.1f}s", flush=True)
        if a.mergekit:
            cfg = work / "cap-ta.yml"
            mergekit_config(cfg, dirs[0], dirs[1:], "task_arithmetic")
            r = run_once([a.mergekit, str(cfg), str(work / "mkcap"), "--no-copy-tokenizer"], cap_bytes=cap)
            capped.append(row(size, "mergekit", "task_arithmetic", "merge", Result([r]), inputs, f"cap {a.cap_mb} MiB"))
        if not a.no_torch:
            cmd = [py, str(HERE / "torch_baseline.py"), str(dirs[0]), *map(str, dirs[1:]), "-o",
                   str(work / "t.safetensors"), "--method", "task_arithmetic", "--weave", "mean"]  # fmt: skip
            r = run_once(cmd, cap_bytes=cap)
            capped.append(
                row(size, "pure torch", "task_arithmetic", "mean", Result([r]), inputs, f"cap {a.cap_mb} MiB")
            )
    shutil.rmtree(work, ignore_errors=True)

    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "repeats": a.repeats,
        "minutes": round((time.time() - t_start) / 60, 1),
    }
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "capped": capped}, indent=1))
    from report import write_report

    write_report(a.out, meta, rows, capped)
    print(f"wrote {a.out}/results.md and plot.png in {meta['minutes']} min", flush=True)


if __name__ == "__main__":
    main()
