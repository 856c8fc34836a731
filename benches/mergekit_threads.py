"""Is mergekit's own f32 result defined by the config? mergekit 0.1.5 run three times on the same
config and the same inputs: with 1 torch thread, with 2 (``OMP_NUM_THREADS``), and with 1 thread and
another instruction set for torch's kernels (``ATEN_CPU_CAPABILITY``: AVX2 where this CPU has
AVX-512, else torch's portable code); outputs compared bit for bit against the first run.

torch's CPU reductions (the norms, dots and sums that slerp-family methods, model_stock and karcher
take over whole tensors) split a large tensor among the threads and add the threads' partial sums:
the f32 result then depends on the thread count, that is on the machine. The third run asks
whether the width of torch's vector kernels matters as well (it did not, on torch 2.15: the
partial sums are laid out the same for AVX2 and AVX-512). The inputs are a small
Llama-shaped f32 model (hidden 512, 1 layer, 1000-token vocabulary: tensors of 262k–512k elements,
past torch's parallel grain) with two fine-tunes of it, and three unrelated models of that shape
(whether the f32 rounding of a reduction flips an output depends on the data). Where mergekit's result changes with the
thread count, no tool can be bit-equal to "mergekit's model" on every machine; the README's corpus
section cites this table for the f32 differences that remain.

    python benches/mergekit_threads.py

Writes benches/results/mergekit_threads.md and mergekit_threads.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mergekit_compare import ensure_mergekit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _runs() -> list[tuple[str, dict[str, str]]]:
    """The reference run, then the variants compared with it."""
    native = torch.backends.cpu.get_cpu_capability()
    other = ("avx2", "AVX2") if native == "AVX512" else ("default", "no vector ISA")
    return [("1 thread", {"OMP_NUM_THREADS": "1"}), ("2 threads", {"OMP_NUM_THREADS": "2"}),
            (f"1 thread, {other[1]}", {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": other[0]})]  # fmt: skip

CONFIGS = {
    "slerp": "merge_method: slerp\nbase_model: ./a\nmodels:\n  - model: ./a\n  - model: ./b\nparameters:\n  t: 0.3\n",
    "nuslerp": "merge_method: nuslerp\nbase_model: ./a\nmodels:\n  - model: ./b\n    parameters: {weight: 0.4}\n"
               "  - model: ./c\n    parameters: {weight: 0.6}\n",
    "multislerp": "merge_method: multislerp\nbase_model: ./a\nmodels:\n  - model: ./b\n    parameters: {weight: 0.4}\n"
                  "  - model: ./c\n    parameters: {weight: 0.6}\n",
    "model_stock": "merge_method: model_stock\nbase_model: ./a\nmodels:\n  - model: ./b\n  - model: ./c\n",
    "karcher": "merge_method: karcher\nmodels:\n  - model: ./a\n  - model: ./b\n  - model: ./c\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: ./a\nmodels:\n  - model: ./b\n"
                       "    parameters: {weight: 0.4}\n  - model: ./c\n    parameters: {weight: 0.6}\n",
    "ties": "merge_method: ties\nbase_model: ./a\nmodels:\n  - model: ./b\n    parameters: {weight: 0.4, density: 0.5}\n"
            "  - model: ./c\n    parameters: {weight: 0.6, density: 0.5}\n",
}  # fmt: skip


def _models(work: Path, related: bool) -> None:
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                                   num_key_value_heads=8, vocab_size=1000, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    root = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    g = torch.Generator().manual_seed(1)
    for name, noise in (("a", 0.0), ("b", 0.02), ("c", 0.03)):
        m = transformers.LlamaForCausalLM(cfg).to(torch.float32)  # unrelated: a fresh random init
        if related:
            with torch.no_grad():
                for p, q in zip(m.parameters(), root.parameters(), strict=True):
                    p.copy_(q + noise * torch.randn(q.shape, generator=g))
        m.save_pretrained(work / name)


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    exe = ensure_mergekit()
    runs = _runs()
    rows = []
    for inputs, related in (("fine-tunes", True), ("unrelated", False)):
        with tempfile.TemporaryDirectory(prefix="mkthreads-") as tmp:
            work = Path(tmp)
            _models(work, related)
            for method, text in CONFIGS.items():
                (work / f"{method}.yml").write_text(text + "dtype: float32\n")
                outs = []
                for _, extra in runs:
                    out = work / f"{method}-{len(outs)}"
                    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
                    env.update(HF_HUB_OFFLINE="1", **extra)
                    subprocess.run([str(exe), f"{method}.yml", str(out), "--no-write-model-card"], cwd=work, env=env,
                                   check=True, capture_output=True, timeout=900)  # fmt: skip
                    outs.append(_weights(out))
                a = outs[0]
                total = sum(a[k].numel() for k in a)
                row = {"method": method, "inputs": inputs, "elements": total, "variants": []}
                for (label, _), b in zip(runs[1:], outs[1:], strict=True):
                    diff = sum(int((a[k] != b[k]).sum()) for k in a)
                    top = max(float((a[k] - b[k]).abs().max()) for k in a)
                    row["variants"].append({"run": label, "differing": diff, "max_diff": top})
                    print(f"{method} ({inputs}): {diff} of {total} elements differ, {runs[0][0]} vs {label} "
                          f"(max {top:.3g})", flush=True)  # fmt: skip
                rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mergekit_threads.json").write_text(json.dumps(rows, indent=1))
    labels = [label for label, _ in runs[1:]]
    lines = ["# mergekit 0.1.5's f32 output across thread counts and instruction sets", "",
             "Same config, same f32 inputs (hidden 512, 1 layer, 1000 tokens; `dtype: float32`); each run compared "
             f"bit for bit with the run on {runs[0][0]} (torch's {torch.backends.cpu.get_cpu_capability()} kernels); "
             "`OMP_NUM_THREADS` sets the threads, `ATEN_CPU_CAPABILITY` the instruction set "
             "(`python benches/mergekit_threads.py`).", "",
             "| method | inputs | " + " | ".join(f"{x}: elements differing (max diff)" for x in labels) + " |",
             "|---|---|" + "---|" * len(labels)]  # fmt: skip
    for r in rows:
        cells = [f"{v['differing']} of {r['elements']} ({v['max_diff']:.3g})" for v in r["variants"]]
        lines.append(f"| {r['method']} | {r['inputs']} | " + " | ".join(cells) + " |")
    (RESULTS / "mergekit_threads.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
