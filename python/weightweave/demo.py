"""``weightweave demo``: the main job on a built-in default.

Builds a small transformer-shaped base (bf16 matrices, f32 norms, an int64 buffer) and three
fine-tunes in a temporary directory, Weight-Weaves and merges them with several methods, and
prints what it did.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import numpy as np

from . import _st
from ._rust import ParamError
from .api import inspect, merge, weave

SHAPES = {
    "model.embed_tokens.weight": (512, 128),
    "model.layers.0.self_attn.q_proj.weight": (128, 128),
    "model.layers.0.self_attn.o_proj.weight": (128, 128),
    "model.layers.0.mlp.up_proj.weight": (344, 128),
    "model.layers.0.mlp.down_proj.weight": (128, 344),
    "model.layers.0.input_layernorm.weight": (128,),
    "model.norm.weight": (128,),
    "lm_head.weight": (512, 128),
}


def _write_model(path: str, weights: dict[str, np.ndarray]) -> None:
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for name, w in weights.items():
        tensors[name] = ("F32", w) if w.ndim == 1 else ("BF16", _st.to_bf16_bits(w))
    tensors["model.position_ids"] = ("I64", np.arange(64, dtype=np.int64))
    _st.save(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "vocab_size": 512}, f)


def make_checkpoints(root: str, tasks: int = 3, seed: int = 0) -> tuple[str, list[str]]:
    """Writes ``root/base`` and ``root/task{i}`` model directories; returns their paths."""
    rng = np.random.default_rng(seed)
    base = {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in SHAPES.items()}
    for n in ("model.layers.0.input_layernorm.weight", "model.norm.weight"):
        base[n] = np.ones(SHAPES[n], dtype=np.float32)
    _write_model(os.path.join(root, "base"), base)
    paths = []
    for t in range(tasks):
        # Each task moves a different low-rank direction plus a little noise.
        ft = {}
        for n, w in base.items():
            delta = rng.standard_normal(w.shape).astype(np.float32) * 0.002
            if w.ndim == 2:
                u = rng.standard_normal((w.shape[0], 1)).astype(np.float32)
                v = rng.standard_normal((1, w.shape[1])).astype(np.float32)
                delta += 0.004 * u @ v
            ft[n] = w + delta
        p = os.path.join(root, f"task{t}")
        _write_model(p, ft)
        paths.append(p)
    return os.path.join(root, "base"), paths


RUNS: list[tuple[str, str, dict[str, object]]] = [
    ("weave", "task_arithmetic", {"pool": "mean"}),
    ("weave", "ties", {"pool": "mean"}),
    ("weave", "dare", {"pool": "random", "seed": 1}),
    ("weave", "breadcrumbs", {"pool": "mean", "gamma": 0.01}),
    ("weave", "pcb", {"pool": "magmax"}),
    ("merge", "magmax", {}),
]


def run(root: str | None = None, echo: Callable[[str], None] = print) -> list[str]:
    """Runs the demo; returns the output directories."""
    owned = root is None
    tmp = tempfile.TemporaryDirectory(prefix="weightweave-demo-") if owned else None
    root = tmp.name if tmp else root
    assert root is not None
    try:
        base, models = make_checkpoints(root)
        info = inspect(base)
        echo(f"weightweave demo in {root}")
        echo(
            f"  base: {info['num_params']:,} parameters in {len(info['tensors'])} tensors "
            f"(bf16 matrices, f32 norms, an int64 buffer) + {len(models)} fine-tunes"
        )
        echo(f"  {'mode':6} {'method':16} {'options':28} {'seconds':>8}  output")
        outs = []
        for mode, method, opts in RUNS:
            out = os.path.join(root, f"{mode}-{method}")
            opts = dict(opts)
            if mode == "weave":
                rep = weave(base, models, out, method=method, **opts)  # type: ignore[arg-type]
            else:
                rep = merge(base, models, out, method=method, **opts)  # type: ignore[arg-type]
            files = sorted(os.listdir(out))
            shown = ", ".join(f"{k}={v}" for k, v in opts.items()) or "-"
            echo(f"  {mode:6} {method:16} {shown:28} {rep.seconds:8.3f}  {out} ({', '.join(files)})")
            outs.append(out)
        echo("  every output keeps config.json, the int64 buffer and bf16/f32 dtypes.")
        if owned:
            echo("  (the temporary directory is removed now; `weightweave demo --dir DIR` keeps the files)")
        else:
            echo(f"  `weightweave inspect {outs[0]}` shows one.")
        return outs
    finally:
        if tmp is not None:
            tmp.cleanup()


def run_accuracy(seed: int = 0, echo: Callable[[str], None] = print) -> dict[str, tuple[float, float]]:
    """Does Weight Weaving help? Trains the multi-task miniature (``weightweave.miniature``: real
    handwritten digits, six domains, a small encoder with a frozen head) for one seed and prints
    accuracy at λ = 1 against Weight Weaving (mean pool over the default Λ). Needs torch and
    scikit-learn. Returns {method: (λ = 1, WW)}."""
    try:
        import sklearn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        need = "demo --accuracy needs torch and scikit-learn"
        raise ParamError(f"{need} ({e}); pip install 'weightweave[bench]'") from None
    import time

    from . import miniature as M

    t0 = time.perf_counter()
    echo(f"weightweave demo --accuracy (seed {seed}): pre-training an encoder on real digits, "
         f"fine-tuning it on {len(M.DOMAINS)} domains ...")  # fmt: skip
    zoo = M.build_zoo(seed, continual=False)
    refs = M.references(zoo, "multitask")
    echo(f"  mean accuracy over the domains: zero-shot {100 * refs['zero-shot']:.1f}%, each fine-tune on its own "
         f"domain {100 * refs['fine-tunes alone']:.1f}%, weight averaging {100 * refs['weight averaging']:.1f}%")
    echo(f"  {'method':16} {'λ = 1':>8} {'Weight Weaving':>15}")
    (sc,) = M.scenarios(zoo, "multitask")
    out = {}
    for method in ("task_arithmetic", "ties", "breadcrumbs"):
        blind = sc.score(M.merged(sc.base, sc.models, method, lam=1.0))
        woven = sc.score(M.merged(sc.base, sc.models, method, pool="mean", seed=seed))
        out[method] = (blind, woven)
        echo(f"  {method:16} {100 * blind:7.1f}% {100 * woven:14.1f}%")
    echo(f"  ({time.perf_counter() - t0:.0f} s; the full study over 3 setups, 7 methods and 5 seeds: "
         "python benches/paper/run.py)")
    return out
