"""Every method with the inputs bigger than memory (issue 17): a cold page cache, in a memory cgroup
smaller than the inputs, against one cold read of them.

    sudo python benches/cold.py                                    # 0.1 B bf16, base + 3, 256 MiB
    sudo python benches/cold.py --size 0.5 --cap-mb 1024
    sudo python benches/cold.py --compare /tmp/old --compare-label 9ab797c   # A/B a previous wheel
    sudo python benches/cold.py --methods ties@tensor        # METHOD@SCOPE: --set scope=SCOPE

Root only (it drops the page cache before every run and makes cgroup-v1 memory groups). Each row
is the median of ``--repeats`` whole CLI commands (``weightweave merge``), caches dropped before
each, run in the cgroup; the baselines are measured the same way in the same run:
- ``cat``: one cold read of every input file;
- ``floor``: one cold read of every input and one write + fsync of an output of the base's size.
``--compare DIR`` runs a second build of weightweave (installed with ``pip install --target DIR``,
used through ``PYTHONPATH``) interleaved with this one. Writes ``benches/results/cold.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from make_checkpoints import make
from measure import can_cap, run_once
from one_read import drop_caches

HERE = Path(__file__).resolve().parent
METHODS = {
    "task_arithmetic": [],
    "magmax": [],
    "dare": ["--seed", "1"],
    "ties": [],
    "dare_ties": ["--seed", "1"],
    "breadcrumbs": [],
    "pcb": [],
    # Per-tensor statistics (mergekit's semantics): batches of tensors (`pipeline/batches.rs`).
    "ties@tensor": [],
    "dare_ties@tensor": ["--seed", "1"],
}
FLOOR = (
    "import os, sys\n"
    "files = sys.argv[2:]\n"
    "for f in files:\n"
    "    with open(f, 'rb') as h:\n"
    "        while h.read(1 << 24): pass\n"
    "left = sum(os.path.getsize(f) for f in files if f.startswith(sys.argv[1]))\n"
    "with open(sys.argv[1] + '.floor', 'wb') as o:\n"
    "    block = b'\\0' * (1 << 24)\n"
    "    while left > 0:\n"
    "        o.write(block[: min(left, len(block))]); left -= len(block)\n"
    "    o.flush(); os.fsync(o.fileno())\n"
)


def cold(cmd: list[str], cap: int, repeats: int, env: dict | None = None) -> float:
    runs = []
    for _ in range(repeats):
        drop_caches()
        r = run_once(cmd, cap, env=env)
        if r.rc != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
        runs.append(r.seconds)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=0.1, help="billions of parameters")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cap-mb", type=int, default=256, help="memory cgroup of every run")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--compare", type=Path, help="site directory of another weightweave build")
    ap.add_argument("--compare-label", help="its name in the table (default: the directory)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cold.md")
    args = ap.parse_args()
    if not (can_cap() and drop_caches()):
        raise SystemExit("needs root: it drops the page cache and makes memory cgroups")
    inputs = make(HERE / "data" / f"p{args.size:g}", args.size, 3)
    files = [str(f) for d in inputs for f in sorted(d.glob("*.safetensors"))]
    total = sum(os.path.getsize(f) for f in files)
    cap = args.cap_mb << 20
    out = HERE / "data" / "cold_out"
    cat = cold(["cat", *files], cap, args.repeats)
    floor = cold([sys.executable, "-c", FLOOR, str(inputs[0]), *files], cap, args.repeats)
    Path(str(inputs[0]) + ".floor").unlink(missing_ok=True)
    builds = [("this build", None)]
    if args.compare:
        builds.insert(0, (args.compare_label or f"`{args.compare}`", str(args.compare)))
    lines = [
        f"# Inputs bigger than memory (`benches/cold.py --size {args.size:g} --cap-mb {args.cap_mb}`)",
        "",
        f"{args.size:g} B bf16 base + 3 fine-tunes ({total / 1e9:.2f} GB of inputs) in a {args.cap_mb} MiB"
        f" memory cgroup, page cache dropped before every run; {os.cpu_count()} cores; median of"
        f" {args.repeats}; {time.strftime('%Y-%m-%d')}.",
        "",
        f"Cold `cat` of the inputs: {cat:.2f} s. Cold I/O floor (read the inputs, write and fsync one"
        f" output): {floor:.2f} s.",
        "",
        "| method | build | seconds | × cold cat | × cold floor |",
        "|---|---|---|---|---|",
    ]
    for m in args.methods.split(","):
        method, _, scope = m.partition("@")
        cmd = [sys.executable, "-m", "weightweave", "merge", *map(str, inputs), "-o", str(out)]
        cmd += ["-q", "--overwrite", "--method", method, *METHODS.get(m, [])]
        cmd += ["--set", f"scope={scope}"] if scope else []
        times: dict[str, list[float]] = {name: [] for name, _ in builds}
        for _ in range(args.repeats):
            for name, site in builds:
                env = dict(os.environ)
                if site:
                    env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
                times[name].append(cold(cmd, cap, 1, env))
        for name, _ in builds:
            t = statistics.median(times[name])
            lines.append(f"| {m} | {name} | {t:.2f} | {t / cat:.1f}× | {t / floor:.1f}× |")
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
