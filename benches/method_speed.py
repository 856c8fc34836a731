"""Every method's time per pass over the inputs, as a ratio to task arithmetic's (one pass), in one
run on the same Llama-shaped f32 checkpoints (those of mergekit_compare.py, made if missing).
Passes are counted from the bytes each merge read (statistics passes and the output pass; the
samples of an exact select are not counted), so a method's ratio is its cost per read of the
inputs: the kernels' arithmetic, not their number of passes. Best of 3 runs, warm page cache.

    python benches/method_speed.py [--hidden 512] [--layers 4]

Writes benches/results/methods.md and methods.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mergekit_compare import DATA, make_models  # noqa: E402

import weightweave as ww  # noqa: E402

W3 = [1.0, 0.6, 0.3]
CASES = {
    "task_arithmetic": (3, {}),
    "ties": (3, {"compat": "mergekit", "weights": W3, "density": [0.5, 0.3, 0.7]}),
    "slerp": (1, {"t": 0.4}),
    "nuslerp": (2, {"weights": [1.0, 0.6]}),
    "multislerp": (3, {"weights": W3}),
    "karcher": (3, {}),
    "nearswap": (1, {"t": 0.001}),
    "passthrough": (1, {"scale": 0.5}),
    "model_stock": (3, {}),
    "model_stock filter_wise": (3, {"filter_wise": True}),
    "della": (3, {"weights": W3, "density": [0.5, 0.3, 0.7], "epsilon": 0.1}),
    "della_linear": (3, {"weights": W3, "density": [0.5, 0.3, 0.7], "epsilon": 0.1}),
    "sce": (3, {}),
    "sce select_topk": (3, {"select_topk": 0.5}),
    "ram": (3, {"epsilon": 0.015}),
    "ramplus_tl": (3, {"epsilon": 0.015}),
    "arcee_fusion": (1, {}),
    # mergekit's arithmetic in bf16 (a config's `dtype: bfloat16`), every operation rounded: the
    # methods whose statistics then take more passes (karcher one per reduction of its iteration).
    "nuslerp bf16": (2, {"weights": [1.0, 0.6], "arith": "bf16"}),
    "multislerp bf16": (3, {"weights": W3, "arith": "bf16"}),
    "karcher bf16": (3, {"arith": "bf16"}),
    "model_stock bf16": (3, {"arith": "bf16"}),
    "sce select_topk bf16": (3, {"select_topk": 0.5, "arith": "bf16"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    work = DATA / f"mergekit-{args.hidden}x{args.layers}"
    base, fts = make_models(work / "models", args.hidden, args.layers)
    sizes = {p: sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in [base, *fts]}
    out = work / "speed.safetensors"
    rows = []
    for name, (k, params) in CASES.items():
        method = name.split()[0]
        best, read = float("inf"), 0
        for _ in range(3):
            t0 = time.perf_counter()
            rep = ww.merge(base, fts[:k], out, method=method, overwrite=True, **params)
            best = min(best, time.perf_counter() - t0)
            read = rep.bytes_read
        inputs = sizes[base] + sum(sizes[f] for f in fts[:k])
        passes = read / inputs
        rows.append({"method": name, "models": k, "seconds": best, "passes": passes, "per_pass": best / passes})
        print(json.dumps(rows[-1]), flush=True)
    ta = rows[0]["per_pass"] / 4  # task arithmetic reads the base and 3 models: per input
    for r in rows:
        r["ratio_to_task_arithmetic"] = r["per_pass"] / (ta * (r["models"] + 1))
    res = HERE / "results"
    (res / "methods.json").write_text(json.dumps({"hidden": args.hidden, "layers": args.layers,
                                                  "threads": os.cpu_count(), "rows": rows}, indent=2))  # fmt: skip
    lines = ["# Time per pass of every mergekit method, relative to task arithmetic",
             "",
             f"Llama-shaped f32 checkpoints, hidden {args.hidden}, {args.layers} layers; {os.cpu_count()} cores; "
             f"best of 3, warm cache. Command: `python benches/method_speed.py --hidden {args.hidden} "
             f"--layers {args.layers}`. The ratio compares seconds per pass per input model (base included) with "
             "task arithmetic's; the target is ≤ 2.",
             "",
             "| method | models | seconds | passes | seconds per pass | ratio to task arithmetic |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['method']} | {r['models']} | {r['seconds']:.2f} | {r['passes']:.0f} | {r['per_pass']:.3f} "
                     f"| {r['ratio_to_task_arithmetic']:.2f} |")  # fmt: skip
    (res / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
