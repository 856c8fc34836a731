"""The same merges through FusionBench 0.2.33 (each algorithm's class run on a model pool of
transformers models, as its users run it: ``fusionbench_run.py``) and through weightweave's CLI,
on the same Llama-shaped f32 checkpoints, one method after the other in one run. Reports per
method the agreement (largest |difference|, relative to the largest |merged delta|, elements
differing; for DARE, whose masks come from different generators, the kept fraction and the norm of
the merged delta), the documented semantic differences, and wall time and peak RSS of both whole
commands (load, merge, save).

FusionBench goes into its own venv (benches/data/fusionbench-venv, created on first use).

    python benches/fusionbench_compare.py [--hidden 768] [--layers 12] [--vocab 8000] [--wudi-steps 3]

Writes benches/results/fusionbench.md and fusionbench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from mergekit_compare import load_dir, make_models, timed, weightweave_command
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
VENV = DATA / "fusionbench-venv"
FUSIONBENCH = "fusion-bench==0.2.33"
WEIGHTS = [1.0, 0.6, 0.3]

# method: (FusionBench's parameters, weightweave's CLI arguments). Parameters are set to the same
# semantics in both: TIES with `merge_func: mean` (the paper's disjoint mean; FusionBench's default
# is `sum`), DARE's sparsity 0.5 = keep probability 0.5.
METHODS = {
    "task_arithmetic": ({"lam": 0.3}, ["--lam", "0.3"]),
    "ties": ({"lam": 1.0, "threshold": 20}, ["--lam", "1.0", "--set", "density=0.2"]),
    "dare": ({"lam": 1.0, "sparsity": 0.5}, ["--lam", "1.0", "--set", "density=0.5"]),
    "dare_ties": ({"lam": 1.0, "sparsity": 0.5, "threshold": 20},
                  ["--lam", "1.0", "--set", "density=0.5", "--set", "ties_density=0.2"]),
    "magmax": ({"lam": 0.5}, ["--lam", "0.5"]),
    "tsv": ({"lam": 1.0}, ["--lam", "1.0", "--set", "device=cpu"]),
    "iso_c": ({"lam": 1.0}, ["--lam", "1.0", "--set", "device=cpu"]),
    "iso_cts": ({"lam": 1.0, "common_space_fraction": 0.8}, ["--lam", "1.0", "--set", "device=cpu"]),
    "wudi": ({}, ["--lam", "1.0", "--set", "device=cpu"]),
    "model_stock": ({}, []),
    "weighted_average": ({"weights": WEIGHTS}, ["--method", "linear", "--weights", ",".join(map(str, WEIGHTS))]),
}  # fmt: skip
RANDOM = ("dare", "dare_ties")
NOTES = {
    "ties": "FusionBench's default merge_func is `sum` (a disjoint sum); run here with `mean`, the paper's",
    "dare": "random masks from different generators: compared by kept fraction and ‖Δ‖₂",
    "dare_ties": "random masks, as dare",
    "tsv": "FusionBench's k = int(r/T) is 0 when T > r (a zero merge); ours is max(1, ·) (SPEC)",
    "model_stock": "FusionBench averages the pairwise angles, mergekit (our rule, SPEC) the cosines: "
    "a documented semantic difference, so the outputs differ",
    "weighted_average": "FusionBench averages the models' values (no base); ours θ_pre + Σ w τ / Σ w: "
    "the same average, rounded differently",
    "wudi": "few Adam steps on this CPU (each step is a T×m×m product per matrix); the step count is a flag",
}


def ensure_fusionbench() -> Path:
    py = VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import fusion_bench"], capture_output=True).returncode == 0
    if not ok:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", FUSIONBENCH], check=True)
    return py


def compare(method: str, ours: dict, theirs: dict, base: dict) -> dict:
    names = sorted(n for n in theirs if n in ours)
    missing = sorted(set(theirs) ^ set(ours))
    diff = {n: (ours[n].double() - theirs[n].double()).abs() for n in names}
    delta = {n: float((theirs[n].double() - base[n].double()).abs().max()) for n in names}
    row = {
        "method": method,
        "max_abs_diff": max(float(d.max()) for d in diff.values()),
        "max_rel_diff": max(float(diff[n].max()) / (delta[n] or 1.0) for n in names),
        "frac_differ": sum(int((d > 0).sum()) for d in diff.values()) / sum(d.numel() for d in diff.values()),
        "tensors_not_in_both": missing,
    }
    if method in RANDOM:
        total = sum(base[n].numel() for n in names)

        def stats(sd):
            kept = sum(int((sd[n] != base[n]).sum()) for n in names)
            l2 = sum(float((sd[n].double() - base[n].double()).pow(2).sum()) for n in names) ** 0.5
            return kept / total, l2

        row["kept_ours"], row["norm_ours"] = stats(ours)
        row["kept_fusionbench"], row["norm_fusionbench"] = stats(theirs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--wudi-steps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    py = ensure_fusionbench()
    work = DATA / f"fusionbench-{args.hidden}x{args.layers}x{args.vocab}"
    work.mkdir(parents=True, exist_ok=True)
    base, fts = make_models(work / "models", args.hidden, args.layers, args.vocab, low_rank=True)
    base_sd = load_dir(base)
    params = sum(t.numel() for t in base_sd.values())
    rows = []
    for method in args.methods.split(","):
        fb_params, ww_args = METHODS[method]
        if method == "wudi":
            fb_params = {"steps": args.wudi_steps}
            ww_args = [*ww_args, "--set", f"steps={args.wudi_steps}"]
        fb_out, ww_out = work / f"out-fusionbench-{method}.safetensors", work / f"out-weightweave-{method}.safetensors"
        for f in (fb_out, ww_out):
            f.unlink(missing_ok=True)
        t_fb, m_fb = timed([str(py), str(HERE / "fusionbench_run.py"), method, json.dumps(fb_params), str(fb_out),
                            str(base), *map(str, fts)])  # fmt: skip
        cli = ["merge", str(base), *map(str, fts), "-o", str(ww_out), "-q"]
        if "--method" not in ww_args:
            cli += ["--method", method]
        t_ww, m_ww = timed([*weightweave_command(), *cli, *ww_args])
        row = compare(method, load_file(str(ww_out)), load_file(str(fb_out)), base_sd)
        row.update({"seconds_fusionbench": t_fb, "seconds_weightweave": t_ww, "speedup": t_fb / t_ww,
                    "peak_rss_fusionbench": m_fb, "peak_rss_weightweave": m_ww, "memory_ratio": m_fb / m_ww})  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        for f in (fb_out, ww_out):
            f.unlink(missing_ok=True)
    out = HERE / "results"
    result = {"fusionbench": FUSIONBENCH, "params": params, "hidden": args.hidden, "layers": args.layers,
              "vocab": args.vocab, "wudi_steps": args.wudi_steps, "threads": os.cpu_count(), "rows": rows}  # fmt: skip
    (out / "fusionbench.json").write_text(json.dumps(result, indent=2))
    cmd = (f"python benches/fusionbench_compare.py --hidden {args.hidden} --layers {args.layers} "
           f"--vocab {args.vocab} --wudi-steps {args.wudi_steps}")  # fmt: skip
    lines = [f"# weightweave vs {FUSIONBENCH}: the same merges",
             "",
             f"Llama-shaped f32 checkpoints, {params / 1e6:.0f} M parameters (hidden {args.hidden}, {args.layers} "
             f"layers, vocabulary {args.vocab}); base + 3 fine-tunes; {os.cpu_count()} cores, one method after "
             f"the other in one run. Command: `{cmd}`. Times and peak RSS are of the whole commands (load, merge, "
             "save): FusionBench's algorithm class on a model pool of transformers models, weightweave's CLI.",
             "",
             "| method | max abs diff | relative to max \\|M\\| | elements differing | FusionBench s | weightweave s "
             "| speedup | FusionBench peak RSS | weightweave peak RSS | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        note = NOTES.get(r["method"], "")
        if r["method"] in RANDOM:
            note += (f"; kept {r['kept_ours']:.4f} vs {r['kept_fusionbench']:.4f}, "
                     f"‖Δ‖₂ {r['norm_ours']:.4g} vs {r['norm_fusionbench']:.4g}")  # fmt: skip
        lines.append(f"| {r['method']} | {r['max_abs_diff']:.3g} | {r['max_rel_diff']:.2g} | {r['frac_differ']:.2e} "
                     f"| {r['seconds_fusionbench']:.2f} | {r['seconds_weightweave']:.2f} | {r['speedup']:.1f}× "
                     f"| {r['peak_rss_fusionbench'] / 1e6:.0f} MB | {r['peak_rss_weightweave'] / 1e6:.0f} MB "
                     f"| {note} |")  # fmt: skip
    lines += ["",
              "Peak RSS counts the pages of memory-mapped inputs that weightweave touched; its anonymous memory "
              "stays O(chunk × threads × T) for the streamed methods and one tensor's working set for the "
              "SVD methods. FusionBench holds every model in memory."]  # fmt: skip
    (out / "fusionbench.md").write_text("\n".join(lines) + "\n")
    print(textwrap.indent("\n".join(lines), "  "))


if __name__ == "__main__":
    main()
