"""Reads of the inputs the global TIES and DARE-TIES take where their deltas are fine-grained.

    python benches/statistics_passes.py                                  # 1 B f16, base + 3
    python benches/statistics_passes.py --compare /tmp/old --compare-label 491658c

The bf16 sets of the other benchmarks have coarse deltas (a few values hold whole quantiles, so a
threshold's window is one key wide and its statistics cheap). Fine-tunes kept at higher precision
have many distinct delta values; there the statistics pass sets aside the elements near each
threshold, and when they do not fit its memory budget it takes more passes over the inputs. This
benchmark writes an f16 set (ten mantissa bits) and reports, per method and build, the merge's
own count of bytes read over the inputs' size (``Report.bytes_read``) and its wall time, warm
page cache, the statistics passes forced (``WEIGHTWEAVE_ONE_READ=0``), builds interleaved, each
row the median of ``--repeats``. ``--compare DIR`` runs another build (installed with
``pip install --target DIR``) and checks both write the same bytes. Writes
``benches/results/statistics_passes.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from make_checkpoints import make

HERE = Path(__file__).resolve().parent
METHODS = ["ties", "dare_ties"]

CHILD = """
import json, os, sys, time, weightweave
base, out, method, *models = sys.argv[1:]
t = time.perf_counter()
r = weightweave.merge(base, models, out, method=method, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t, "bytes_read": r.bytes_read}))
"""


def run(build: str | None, inputs: list[Path], out: Path, method: str) -> dict:
    env = {**os.environ, "WEIGHTWEAVE_ONE_READ": "0"}
    env.pop("WEIGHTWEAVE_DEBUG", None)
    if build:
        env["PYTHONPATH"] = build
    cmd = [sys.executable, "-c", CHILD, str(inputs[0]), str(out), method, *map(str, inputs[1:])]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="billions of parameters")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compare", help="site directory of another weightweave build")
    ap.add_argument("--compare-label")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "statistics_passes.md")
    a = ap.parse_args()
    inputs = make(HERE / "data" / f"h{a.size:g}", a.size, 3, dtype="f16")
    size = sum(f.stat().st_size for d in inputs for f in d.glob("*.safetensors"))
    builds = [(a.compare_label or a.compare, a.compare)] if a.compare else []
    builds.append(("this build", None))
    for d in inputs:  # warm the page cache
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as h:
                while h.read(1 << 24):
                    pass
    rows = []
    with tempfile.TemporaryDirectory(dir=HERE / "data") as tmp:
        for method in METHODS:
            runs: dict[str, list[dict]] = {label: [] for label, _ in builds}
            digests: dict[str, str] = {}
            for _ in range(a.repeats):
                for label, build in builds:
                    out = Path(tmp) / "out.safetensors"
                    runs[label].append(run(build, inputs, out, method))
                    digests[label] = digest(out)
                    out.unlink()
                    subprocess.run(["sync"], check=True)
            if len(set(digests.values())) != 1:
                sys.exit(f"{method}: the builds wrote different bytes: {digests}")
            for label, _ in builds:
                rs = runs[label]
                rows.append(
                    (
                        method,
                        label,
                        rs[-1]["bytes_read"] / size,
                        statistics.median(r["seconds"] for r in rs),
                        " ".join(f"{r['seconds']:.2f}" for r in rs),
                        digests[label],
                    )
                )
                print(rows[-1], flush=True)
    lines = [
        f"# Reads of the statistics passes, fine-grained deltas (`benches/statistics_passes.py --size {a.size:g}`)",
        "",
        f"{a.size:g} B Llama-shaped f16 base + 3 fine-tunes ({size / 1e9:.2f} GB), warm page cache, "
        f"{os.cpu_count()} cores, the statistics passes forced (`WEIGHTWEAVE_ONE_READ=0`), "
        f"builds interleaved, median of {a.repeats}; time of the `weightweave.merge` call.",
        "",
        "| method | build | bytes read | median s | runs s | output digest |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {b} | {r:.2f}× | {s:.2f} | {rs} | `{d}` |" for m, b, r, s, rs, d in rows]
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
