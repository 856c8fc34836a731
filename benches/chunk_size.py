"""The default chunk size, measured: whole ``weightweave merge`` commands at several ``--chunk-size``
values, interleaved round by round (so that a slow spell of the machine hits every size alike),
warm page cache, on the Llama-shaped bf16 checkpoints of ``make_checkpoints.py``. Each row gives
the median time and its ratio to the first size listed; every size must write the same bytes
(outputs do not depend on chunking), which the script checks.

    python benches/chunk_size.py                       # 0.5 B, sizes 2^18 2^17 2^16 2^15
    python benches/chunk_size.py --size 0.1 --sizes 262144,65536 --rounds 5

Writes benches/results/chunk_size.md and chunk_size.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_checkpoints import make  # noqa: E402

METHODS = {
    "task_arithmetic": [],
    "magmax": [],
    "dare": ["--seed", "1"],
    "ties": [],
    "breadcrumbs": [],
    "pcb": [],
    "ties (mergekit)": ["--compat", "mergekit", "--set", "density=0.5"],
}


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:12]


def run(inputs: list[Path], method: str, extra: list[str], chunk: int, out: Path) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    name = method.split()[0]
    cmd = [sys.executable, "-m", "weightweave", "merge", *map(str, inputs), "--method", name, "-o", str(out),
           "-q", "--chunk-size", str(chunk), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0, digest(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=0.5, help="billions of parameters")
    ap.add_argument("--sizes", default="262144,131072,65536,32768", help="chunk sizes; the first is the reference")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "chunk_size.md")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    inputs = make(HERE / "data" / f"p{args.size:g}", args.size, 3)
    for d in inputs:  # warm the page cache
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    times: dict[tuple[str, int], list[float]] = {}
    digests: dict[str, set[str]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        out = Path(tmp) / "out"
        for r in range(args.rounds):
            for m in methods:
                for c in sizes:
                    s, h = run(inputs, m, METHODS[m], c, out)
                    times.setdefault((m, c), []).append(s)
                    digests.setdefault(m, set()).add(h)
                    print(f"round {r + 1}: {m} chunk {c}: {s:.2f} s {h}", flush=True)
    bad = {m: d for m, d in digests.items() if len(d) != 1}
    if bad:
        raise SystemExit(f"outputs differ between chunk sizes: {bad}")
    rows = []
    for m in methods:
        ref = statistics.median(times[(m, sizes[0])])
        for c in sizes:
            med = statistics.median(times[(m, c)])
            rows.append({"method": m, "chunk": c, "median_s": round(med, 3), "runs": [round(t, 3) for t in times[(m, c)]],
                         "vs_first": round(med / ref, 3), "digest": next(iter(digests[m]))})
    inputs_gb = sum(f.stat().st_size for d in inputs for f in d.glob("*.safetensors")) / 1e9
    lines = [
        "# Chunk size (`benches/chunk_size.py`)",
        "",
        f"{args.size:g} B bf16 base + 3 fine-tunes ({inputs_gb:.2f} GB), warm page cache, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), whole `weightweave merge` "
        f"commands, sizes interleaved in each of {args.rounds} rounds, median; every size wrote the same bytes "
        f"(digest per method below). {time.strftime('%Y-%m-%d')}.",
        "",
        "| method | chunk (elements) | median s | × chunk " + str(sizes[0]) + " | runs s | output digest |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['chunk']} | {row['median_s']:.2f} | {row['vs_first']:.2f}× | "
                     f"{' '.join(f'{t:.2f}' for t in row['runs'])} | `{row['digest']}` |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
