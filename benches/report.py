"""Turns benchmark rows into ``results.md`` (ratios, growth, capped runs, targets) and ``plot.png``."""

from __future__ import annotations

from pathlib import Path

MIB = 2**20


def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()) and r.get("note", "").find("scope=tensor") < 0:
            return r
    return None


def _s(r) -> str:
    return f"{r['seconds']:.2f}" if r and r["ok"] else ("failed" if r else "–")


def _mib(r) -> str:
    return f"{r['peak_anon'] / MIB:.0f}" if r else "–"


def _ratio(a, b) -> str:
    if a and b and a["ok"] and b["ok"] and b["seconds"]:
        return f"{a['seconds'] / b['seconds']:.1f}×"
    return "–"


def write_report(out: Path, meta: dict, rows: list[dict], capped: list[dict]) -> None:
    sizes = sorted({r["size_b"] for r in rows})
    md = ["# weightweave benchmarks", "",
          f"Machine: {meta['machine']}; Python {meta['python']}; median of {meta['repeats']} runs on a warm page "
          f"cache; whole-command wall time (process start, validation, fsync of the output included); peak "
          f"anonymous (heap) and file-backed resident memory sampled every 10 ms. Run took {meta['minutes']} min.",
          "", "## Read floor", "", "| params (B) | inputs GB | cat s | Rust mmap read s |", "|---|---|---|---|"]  # fmt: skip
    for s in sizes:
        cat, fl = _find(rows, size_b=s, tool="cat"), _find(rows, size_b=s, tool="rust mmap")
        md.append(f"| {s} | {cat['inputs'] / 1e9:.2f} | {_s(cat)} | {_s(fl)} |")

    for s in sizes:
        cat = _find(rows, size_b=s, tool="cat")
        ww = [r for r in rows if r["size_b"] == s and r["tool"] == "weightweave"]
        md += ["", f"## weightweave at {s} B parameters", "",
               "| method | mode | seconds | × cat | GB/s of inputs | peak anon MiB | note |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in ww:
            gbs = f"{r['inputs'] / 1e9 / r['seconds']:.2f}" if r["ok"] else "–"
            md.append(f"| {r['method']} | {r['mode']} | {_s(r)} | {_ratio(r, cat)} | {gbs} | {_mib(r)} | {r['note']} |")

    md += ["", "## Against pure torch and mergekit", "",
           "Pure torch = `weightweave.reference` (whole state dicts, stacked A*, global flatten) loading and saving "
           "with `safetensors.torch`. mergekit 0.1.5 with `dtype: bfloat16` (it computes in bf16; we compute in f32): "
           "task_arithmetic with weight 0.3 = our λ = 0.3; `ties` is per tensor in mergekit, so it is compared with "
           "our `scope=tensor` (and its sign election and normalisation differ in detail); `dare_linear` ↔ our `dare`; "
           "`breadcrumbs` with the same density and gamma.", "",
           "| params (B) | method | mode | weightweave s | torch s | torch / ww | mergekit s | mergekit / ww "
           "| anon MiB ww / torch / mergekit |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in sizes:
        for r in rows:
            if r["size_b"] != s or r["tool"] not in ("pure torch", "mergekit"):
                continue
            if r["tool"] == "mergekit":
                ww = next((x for x in rows if x["size_b"] == s and x["tool"] == "weightweave" and x["method"] == "ties"
                           and "scope=tensor" in x["note"]), None) if r["method"] == "ties" else None  # fmt: skip
                ww = ww or _find(rows, size_b=s, tool="weightweave", method=r["method"], mode="merge")
                md.append(f"| {s} | {r['method']} | merge | {_s(ww)} | – | – | {_s(r)} | {_ratio(r, ww)} | "
                          f"{_mib(ww)} / – / {_mib(r)} |")  # fmt: skip
            else:
                ww = _find(rows, size_b=s, tool="weightweave", method=r["method"], mode=r["mode"])
                md.append(f"| {s} | {r['method']} | {r['mode']} | {_s(ww)} | {_s(r)} | {_ratio(r, ww)} | – | – | "
                          f"{_mib(ww)} / {_mib(r)} / – |")  # fmt: skip

    md += ["", "## Growth with model size", "", "| tool | method | mode | " + " | ".join(f"{s} B s (anon MiB)" for s in sizes)
           + " |", "|---|---|---|" + "---|" * len(sizes)]  # fmt: skip
    for tool, method, mode in [("weightweave", "task_arithmetic", "mean"), ("weightweave", "ties", "merge"),
                               ("pure torch", "task_arithmetic", "mean"), ("mergekit", "task_arithmetic", "merge")]:  # fmt: skip
        cells = []
        for s in sizes:
            r = _find(rows, size_b=s, tool=tool, method=method, mode=mode)
            cells.append(f"{_s(r)} ({_mib(r)})" if r else "–")
        md.append(f"| {tool} | {method} | {mode} | " + " | ".join(cells) + " |")

    if capped:
        md += ["", f"## Under a memory cap ({capped[0]['note']}, cgroup v1; inputs "
               f"{capped[0]['inputs'] / 1e9:.2f} GB)", "", "| tool | method | mode | completed | seconds | peak anon MiB |",
               "|---|---|---|---|---|---|"]  # fmt: skip
        for r in capped:
            md.append(f"| {r['tool']} | {r['method']} | {r['mode']} | {'yes' if r['ok'] else 'no (killed)'} | "
                      f"{_s(r)} | {_mib(r)} |")  # fmt: skip

    md += ["", "## Targets", ""] + _targets(rows, capped, sizes)
    (out / "results.md").write_text("\n".join(md) + "\n")
    _plot(out, rows, sizes)


def _targets(rows: list[dict], capped: list[dict], sizes: list[float]) -> list[str]:
    """Where each of the issue's targets stands, from this run's rows."""
    ref = min(sizes, key=lambda s: abs(s - 0.5))
    cat = _find(rows, size_b=ref, tool="cat")
    lines = []
    for method, mode, limit in [("task_arithmetic", "mean", 2), ("task_arithmetic", "merge", 2), ("ties", "merge", 5),
                                ("pcb", "merge", 8)]:  # fmt: skip
        r = _find(rows, size_b=ref, tool="weightweave", method=method, mode=mode)
        if r and r["ok"] and cat:
            ratio = r["seconds"] / cat["seconds"]
            state = "met" if ratio <= limit else "missed"
            lines.append(f"- {method} {mode} within {limit}× of cat at {ref} B: {ratio:.1f}× — **{state}**")
    for tool in ("pure torch", "mergekit"):
        for s in [s for s in sizes if s >= 0.5]:
            cells, worst = [], float("inf")
            for r in rows:
                if r["size_b"] != s or r["tool"] != tool or r["mode"] != "merge":
                    continue
                ww = None
                if tool == "mergekit" and r["method"] == "ties":
                    ww = next((x for x in rows if x["size_b"] == s and x["tool"] == "weightweave"
                               and x["method"] == "ties" and "scope=tensor" in x["note"]), None)  # fmt: skip
                ww = ww or _find(rows, size_b=s, tool="weightweave", method=r["method"], mode="merge")
                if not (ww and ww["ok"]):
                    continue
                if r["ok"]:
                    ratio = r["seconds"] / ww["seconds"]
                    worst = min(worst, ratio)
                    cells.append(f"{r['method']} {ratio:.1f}×")
                else:
                    cells.append(f"{r['method']}: {tool} did not complete ({r['note']})")
            if cells:
                state = "met" if worst >= 10 else "missed"
                lines.append(f"- ≥ 10× faster than {tool} at {s} B: {'; '.join(cells)} — **{state}**")
    if capped:
        ok = [r for r in capped if r["tool"] == "weightweave"]
        done = all(r["ok"] for r in ok)
        worst = max((r["peak_anon"] for r in ok), default=0) / MIB
        lines.append(f"- every method under {capped[0]['note']} on {capped[0]['inputs'] / 1e9:.2f} GB of inputs: "
                     f"{sum(r['ok'] for r in ok)}/{len(ok)} completed, peak anon ≤ {worst:.0f} MiB — "
                     f"**{'met' if done else 'missed'}**")  # fmt: skip
    lo, hi = sizes[0], sizes[-1]
    if hi > lo:
        for method, mode in [("task_arithmetic", "mean"), ("ties", "merge")]:
            a = _find(rows, size_b=lo, tool="weightweave", method=method, mode=mode)
            b = _find(rows, size_b=hi, tool="weightweave", method=method, mode=mode)
            if a and b:
                lines.append(f"- flat anonymous memory, {method} {mode}: {_mib(a)} MiB at {lo} B → {_mib(b)} MiB "
                             f"at {hi} B (inputs ×{b['inputs'] / a['inputs']:.0f})")  # fmt: skip
    return lines


def _plot(out: Path, rows: list[dict], sizes: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    s0 = sizes[0]
    cat = _find(rows, size_b=s0, tool="cat")
    labels, values, colors = [], [], []
    for r in rows:
        if r["size_b"] != s0 or not r["ok"] or r["tool"] in ("cat", "rust mmap"):
            continue
        if r["tool"] == "weightweave" and r["mode"] not in ("merge", "mean"):
            continue
        scope = " (per tensor)" if "scope=tensor" in r.get("note", "") else ""
        labels.append(f"{r['tool'].replace('weightweave', 'ww')} {r['method']} {r['mode']}{scope}")
        values.append(r["seconds"] / cat["seconds"])
        colors.append({"weightweave": "tab:blue", "pure torch": "tab:orange", "mergekit": "tab:green"}[r["tool"]])
    ax1.barh(labels, values, color=colors)
    ax1.set_xscale("log")
    ax1.set_xlabel("wall time / cat time (log)")
    ax1.set_title(f"Time relative to reading the inputs ({s0} B params, bf16, T=3)")
    ax1.tick_params(axis="y", labelsize=7)
    for tool, method, mode, color in [("weightweave", "task_arithmetic", "mean", "tab:blue"),
                                      ("weightweave", "ties", "merge", "tab:cyan"),
                                      ("pure torch", "task_arithmetic", "mean", "tab:orange"),
                                      ("mergekit", "task_arithmetic", "merge", "tab:green")]:  # fmt: skip
        pts = [
            (s, r["peak_anon"] / MIB)
            for s in sizes
            if (r := _find(rows, size_b=s, tool=tool, method=method, mode=mode))
        ]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{tool} {method} {mode}")
    ax2.set_xlabel("parameters (B)")
    ax2.set_ylabel("peak anonymous memory (MiB, log)")
    ax2.set_yscale("log")
    ax2.set_title("Memory as the model grows")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=110)
