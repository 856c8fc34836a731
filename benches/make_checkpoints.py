"""Writes a Llama-shaped bf16 (or f16) base and T fine-tunes (= base + small noise) for benchmarks.

Each tensor is generated and written on its own, so the generator needs memory for one tensor,
not one model. Sizes: ``--params 0.1`` (≈0.1 B) up to ``--params 1`` or more.

    python benches/make_checkpoints.py --out benches/data/p0.5 --params 0.5 --tasks 3 [--shard-size 1GB]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from weightweave._st import to_bf16_bits


def llama_shapes(params_b: float) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Tensor shapes of a Llama-like model with about ``params_b`` billion parameters."""
    vocab, hidden, inter = 32000, 1536, 4096
    if params_b >= 0.9:
        hidden, inter = 2048, 5632
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params_b * 1e9 - 2 * vocab * hidden) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
    }
    return shapes, config


def _groups(shapes: dict[str, tuple[int, ...]], shard_size: int | None) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        b = int(np.prod(shape)) * 2
        if shard_size and used and used + b > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += b
    return groups


def write_model(
    out: Path,
    shapes: dict[str, tuple[int, ...]],
    config: dict,
    seed: int,
    base_seed: int,
    noise: float,
    shard_size: int | None,
    dtype: str = "bf16",
) -> None:
    """Tensor values are regenerated from seeds: the base from ``base_seed``; a fine-tune adds
    noise from ``seed`` (seed == base_seed writes the base itself). ``dtype`` "f16" keeps ten
    mantissa bits, so the deltas take many distinct values (bf16's 7 make them coarse: a few
    values hold whole quantiles), as in fine-tunes kept at higher precision."""
    out.mkdir(parents=True, exist_ok=True)
    groups = _groups(shapes, shard_size)
    weight_map = {}
    for k, names in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for n in names:
            size = int(np.prod(shapes[n])) * 2
            header[n] = {
                "dtype": "F16" if dtype == "f16" else "BF16",
                "shape": list(shapes[n]),
                "data_offsets": [off, off + size],
            }
            off += size
            weight_map[n] = fname
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for n in names:
                idx = list(shapes).index(n)
                rng = np.random.default_rng([base_seed, idx])
                w = rng.standard_normal(shapes[n], dtype=np.float32) * np.float32(0.02)
                if n.endswith("norm.weight"):
                    w += np.float32(1.0)
                if seed != base_seed:
                    w += np.random.default_rng([seed, idx]).standard_normal(shapes[n], dtype=np.float32) * np.float32(
                        noise
                    )
                f.write(w.astype(np.float16).tobytes() if dtype == "f16" else to_bf16_bits(w).tobytes())
    if len(groups) > 1:
        total = sum(int(np.prod(s)) * 2 for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))


def make(
    out: Path,
    params_b: float,
    tasks: int,
    shard_size: int | None = None,
    noise: float = 0.002,
    dtype: str = "bf16",
) -> list[Path]:
    """Writes ``out/base`` and ``out/ft{i}``; skips what already exists. Returns [base, *fine-tunes]."""
    shapes, config = llama_shapes(params_b)
    if dtype == "f16":
        config = {**config, "torch_dtype": "float16"}
    dirs = [out / "base"] + [out / f"ft{i}" for i in range(tasks)]
    for i, d in enumerate(dirs):
        if (d / "config.json").exists():
            continue
        write_model(d, shapes, config, seed=i, base_seed=0, noise=noise, shard_size=shard_size, dtype=dtype)
    return dirs


def main() -> None:
    from weightweave.cli import parse_size

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", type=float, default=0.1, help="billions of parameters")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--shard-size", type=parse_size)
    a = ap.parse_args()
    dirs = make(a.out, a.params, a.tasks, a.shard_size)
    total = sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors"))
    print(f"{len(dirs)} models in {a.out}: {total / 1e9:.2f} GB", flush=True)
    os.sync()


if __name__ == "__main__":
    main()
