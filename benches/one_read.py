"""TIES and DARE-TIES with their statistics passes against the one-read pass (issue 17).

    python benches/one_read.py                       # 0.1 B Llama-shaped bf16, base + 3
    python benches/one_read.py --size 0.5 --cap-mb 1024

Whole CLI commands, the two paths interleaved (``WEIGHTWEAVE_ONE_READ=0`` / ``=1``), each row the
median of ``--repeats`` runs:
- warm: page cache warm, against the I/O floor (read every input, write and fsync one output);
- cold (root only): caches dropped before every run, in a memory cgroup of ``--cap-mb`` (smaller
  than the inputs), against a cold ``cat`` of the inputs in the same cgroup.
``bytes read`` is the merge's own count (``Report.bytes_read``), over the inputs' size.
Writes ``benches/results/one_read.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from make_checkpoints import make
from measure import can_cap, run_once

HERE = Path(__file__).resolve().parent
CASES = {
    "ties": ["--method", "ties", "--set", "density=0.2"],
    "dare_ties": ["--method", "dare_ties", "--set", "density=0.5", "--set", "ties_density=0.5", "--seed", "1"],
}


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def floor(inputs: list[Path], out: Path, cap: int | None) -> float:
    """Reads every input file once and writes and fsyncs one output of the base's size."""
    base = inputs[0]
    code = (
        "import sys, os\n"
        "files = sys.argv[2:]\n"
        "for f in files:\n"
        "    with open(f, 'rb') as h:\n"
        "        while h.read(1 << 24): pass\n"
        "size = sum(os.path.getsize(f) for f in files if f.startswith(sys.argv[1]))\n"
        "with open(sys.argv[1] + '.floor', 'wb') as o:\n"
        "    block = b'\\0' * (1 << 24)\n"
        "    left = size\n"
        "    while left > 0:\n"
        "        o.write(block[: min(left, len(block))]); left -= len(block)\n"
        "    o.flush(); os.fsync(o.fileno())\n"
    )
    files = [str(f) for d in inputs for f in sorted(d.glob("*.safetensors"))]
    r = run_once([sys.executable, "-c", code, str(base), *files], cap)
    Path(str(base) + ".floor").unlink(missing_ok=True)
    return r.seconds


def merge_cmd(inputs: list[Path], out: Path, case: str) -> list[str]:
    ww = Path(sys.executable).parent / "weightweave"
    return [str(ww), "merge", *map(str, inputs), "-o", str(out), "-q", "--overwrite", *CASES[case]]


def bytes_read(inputs: list[Path], case: str, one: bool) -> float:
    import weightweave as ww

    os.environ["WEIGHTWEAVE_ONE_READ"] = "1" if one else "0"
    params = {"ties": {"density": 0.2}, "dare_ties": {"density": 0.5, "ties_density": 0.5, "seed": 1}}[case]
    size = sum(f.stat().st_size for d in inputs for f in d.glob("*.safetensors"))
    with tempfile.TemporaryDirectory(dir=HERE / "data") as t:
        rep = ww.merge(inputs[0], inputs[1:], Path(t) / "o", method=case, **params)
    return rep.bytes_read / size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=0.1, help="billions of parameters")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cap-mb", type=int, default=256, help="memory cgroup of the cold runs")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "one_read.md")
    args = ap.parse_args()
    inputs = make(HERE / "data" / f"p{args.size:g}", args.size, 3)
    total = sum(f.stat().st_size for d in inputs for f in d.glob("*.safetensors"))
    out = HERE / "data" / "one_read_out"
    cold = can_cap() and drop_caches()
    cap = args.cap_mb << 20
    lines = [
        f"# One read for TIES (`benches/one_read.py --size {args.size:g}`)",
        "",
        f"{args.size:g} B bf16 base + 3 fine-tunes ({total / 1e9:.2f} GB), {os.cpu_count()} cores,"
        f" median of {args.repeats}, {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    warm_floor = min(floor(inputs, out, None) for _ in range(args.repeats))
    cold_cat = None
    if cold:
        runs = []
        for _ in range(args.repeats):
            drop_caches()
            files = [str(f) for d in inputs for f in sorted(d.glob("*.safetensors"))]
            runs.append(run_once(["cat", *files], cap).seconds)
        cold_cat = sorted(runs)[len(runs) // 2]
    lines += [
        f"I/O floor (warm): {warm_floor:.2f} s."
        + (f" Cold `cat` in a {args.cap_mb} MiB cgroup: {cold_cat:.2f} s." if cold_cat else " Cold: not run (needs root)."),
        "",
        "| method | path | bytes read | warm s | × floor | cold s | × cold cat |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        times: dict[str, list[float]] = {"0": [], "1": []}
        colds: dict[str, list[float]] = {"0": [], "1": []}
        for _ in range(args.repeats):
            for mode in "01":
                env = {**os.environ, "WEIGHTWEAVE_ONE_READ": mode}
                run_once(merge_cmd(inputs, out, case), None, env=env)  # warm the cache
                r = run_once(merge_cmd(inputs, out, case), None, env=env)
                times[mode].append(r.seconds)
                if cold:
                    drop_caches()
                    colds[mode].append(run_once(merge_cmd(inputs, out, case), cap, env=env).seconds)
        for mode, name in (("0", "statistics passes"), ("1", "one read")):
            w = sorted(times[mode])[len(times[mode]) // 2]
            c = sorted(colds[mode])[len(colds[mode]) // 2] if cold else None
            reads = bytes_read(inputs, case, mode == "1")
            cold_cells = f"{c:.2f} | {c / cold_cat:.1f}×" if c and cold_cat else "— | —"
            lines.append(f"| {case} | {name} | {reads:.2f}× | {w:.2f} | {w / warm_floor:.1f}× | {cold_cells} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
