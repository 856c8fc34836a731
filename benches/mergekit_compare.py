"""The same mergekit YAML recipes through mergekit and through weightweave (``weightweave run``,
which reads mergekit's schema and runs it with mergekit's semantics), on the same Llama-shaped
f32 checkpoints. Reports per method: the largest |difference|, the fraction of elements that
differ, and the time and peak-memory ratios; for DARE (random masks in both tools, from different
generators) the kept fraction and the norm of the merged delta instead.

mergekit goes into its own venv (benches/data/mergekit-venv, created on first use).

    python benches/mergekit_compare.py [--hidden 1024] [--layers 8] [--results mergekit]

Writes benches/results/mergekit.md and mergekit.json (``--results NAME``: NAME.md and NAME.json,
e.g. for a larger model beside the usual table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
VENV = DATA / "mergekit-venv"
MERGEKIT = "mergekit==0.1.5"

WEIGHTS = [1.0, 0.6, 0.3]
DENSITIES = [0.5, 0.3, 0.7]
METHODS = {
    "linear": {"per_model": {"weight": WEIGHTS}, "shared": {"normalize": True}},
    "task_arithmetic": {"per_model": {"weight": WEIGHTS}, "shared": {}},
    "ties": {"per_model": {"weight": WEIGHTS, "density": DENSITIES}, "shared": {"normalize": True}},
    "dare_ties": {"per_model": {"weight": WEIGHTS, "density": DENSITIES}, "shared": {}},
    "dare_linear": {"per_model": {"weight": WEIGHTS, "density": DENSITIES}, "shared": {}},
    "breadcrumbs": {"per_model": {"weight": WEIGHTS, "density": DENSITIES, "gamma": [0.01, 0.02, 0.0]},
                    "shared": {}},
    "breadcrumbs_ties": {"per_model": {"weight": WEIGHTS, "density": DENSITIES, "gamma": [0.01, 0.02, 0.0]},
                         "shared": {}},
    "della": {"per_model": {"weight": WEIGHTS, "density": DENSITIES, "epsilon": [0.1, 0.1, 0.2]}, "shared": {}},
    "della_linear": {"per_model": {"weight": WEIGHTS, "density": DENSITIES, "epsilon": [0.1, 0.1, 0.2]},
                     "shared": {}},
    # k: how many fine-tunes; list_base: the base is listed among the models, as published
    # configs do; no_base: the config has no base_model.
    "slerp": {"k": 1, "list_base": True, "per_model": {}, "shared": {"t": 0.4}},
    "nuslerp": {"k": 2, "per_model": {"weight": [1.0, 0.6]}, "shared": {}},
    "multislerp": {"per_model": {"weight": WEIGHTS}, "shared": {}},
    "karcher": {"no_base": True, "per_model": {}, "shared": {}},
    "nearswap": {"k": 1, "per_model": {}, "shared": {"t": 0.001}},
    "passthrough": {"k": 1, "no_base": True, "per_model": {"scale": [0.5]}, "shared": {}},
    "model_stock": {"list_base": True, "per_model": {}, "shared": {"filter_wise": False}},
    "sce": {"per_model": {}, "shared": {"select_topk": 0.5}},
    "ram": {"per_model": {}, "shared": {"epsilon": 0.015}},
    "ramplus_tl": {"per_model": {}, "shared": {"epsilon": 0.015, "r": 0.3, "alpha": 0.2}},
    "arcee_fusion": {"k": 1, "per_model": {}, "shared": {}},
    # Per-tensor parameters as published configs write them: layer gradients and filters.
    "slerp_gradient": {"method": "slerp", "k": 1, "list_base": True, "per_model": {},
                       "shared": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "ties_gradient": {"method": "ties", "shared": {"normalize": True},
                      "per_model": {"weight": [[1.0, 0.5], 0.6, 0.3],
                                    "density": [[0.2, 0.9], 0.3, [{"filter": "mlp", "value": 0.4}, {"value": 0.8}]]}},
    "task_arithmetic_filter": {"method": "task_arithmetic", "per_model": {"weight": WEIGHTS},
                               "shared": {"lambda": [{"filter": "self_attn", "value": [0.5, 1.5]}, {"value": 1.0}]}},
    # mergekit's arithmetic in bf16 (dtype: bfloat16): rounded after every operation, as mergekit.
    "task_arithmetic_bf16": {"method": "task_arithmetic", "dtype": "bfloat16", "per_model": {"weight": WEIGHTS},
                             "shared": {"normalize": True, "lambda": 0.7}},
    "ties_bf16": {"method": "ties", "dtype": "bfloat16", "per_model": {"weight": WEIGHTS, "density": DENSITIES},
                  "shared": {"normalize": True}},
    "karcher_bf16": {"method": "karcher", "dtype": "bfloat16", "no_base": True, "per_model": {}, "shared": {}},
    "multislerp_bf16": {"method": "multislerp", "dtype": "bfloat16", "per_model": {"weight": WEIGHTS}, "shared": {}},
    "model_stock_bf16": {"method": "model_stock", "dtype": "bfloat16", "list_base": True, "per_model": {},
                         "shared": {"filter_wise": False}},
    "sce_bf16": {"method": "sce", "dtype": "bfloat16", "per_model": {}, "shared": {"select_topk": 0.5}},
    "nuslerp_bf16": {"method": "nuslerp", "dtype": "bfloat16", "k": 2, "per_model": {"weight": [1.0, 0.6]},
                     "shared": {}},
    "nearswap_bf16": {"method": "nearswap", "dtype": "bfloat16", "k": 1, "per_model": {}, "shared": {"t": 0.001}},
    "ram_bf16": {"method": "ram", "dtype": "bfloat16", "per_model": {}, "shared": {"epsilon": 0.015}},
    "ramplus_tl_bf16": {"method": "ramplus_tl", "dtype": "bfloat16", "per_model": {},
                        "shared": {"epsilon": 0.015, "r": 0.3, "alpha": 0.2}},
    # Slices: a passthrough frankenmerge (layers stacked from two models, a zeroed copy) and a
    # slerp whose t restarts in each slice.
    "passthrough_slices": {"method": "passthrough", "per_model": {}, "shared": {}, "slices": "stack"},
    "slerp_slices": {"method": "slerp", "per_model": {}, "shared": {"t": [{"filter": "self_attn", "value": [0, 1]},
                                                                          {"value": 0.4}]}, "slices": "split"},
    "ties_slices_unequal": {"method": "ties", "per_model": {}, "shared": {"normalize": True, "density": 0.5},
                            "slices": "unequal"},
    # A vision-language model (Qwen2.5-VL layout: a text decoder of 4 layers, a vision tower of 6
    # blocks, a projector), whose modules mergekit plans apart: mergekit's own vlm-ties.yml
    # gradients, and a `modules:` config.
    "vlm_ties_gradient": {"method": "ties", "vlm": "gradient", "per_model": {}, "shared": {}},
    "vlm_modules": {"method": "task_arithmetic", "vlm": "modules", "per_model": {}, "shared": {}},
    "vlm_modules_unequal": {"method": "ties", "vlm": "unequal", "per_model": {}, "shared": {}},
}  # fmt: skip
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
# Known causes of differences, by method (beyond rounding, which the ulps column shows).
NOTES = {
    "slerp": "norms and dot summed in f64 here, in f32 by torch; acos/sin from the C library here, SLEEF/MKL there",
    "nuslerp": "as slerp", "multislerp": "its 4 per-tensor scalars from the Gram matrix here (1 pass), f32 reductions of the intermediate tensors there", "model_stock": "norms and dots (f64)",
    "karcher": "iterated on the Gram matrix here (1 pass), element-wise in f32 there",
    "sce": "mean squares in f64; the elements beyond 64 ulps are ties in variance at the top-k cut (torch's topk order)",
    "arcee_fusion": "mergekit takes quantiles of a random sample of 10^6 elements in larger tensors; ours are exact",
    "slerp_gradient": "t by filter and layer gradient; the rest as slerp",
    "ties_gradient": "density and weight gradients; the elements beyond 64 ulps are ties in \\|τ\\| at model 1's cut "
                     "in lm_head.weight (density 0.3), as in the ties row",
    "task_arithmetic_filter": "lambda by filter and layer gradient",
    "passthrough_slices": "layers stacked from two models, o_proj/down_proj zeroed in the second slice",
    "slerp_slices": "two slices, t restarting in each; the rest as slerp",
    "ties_slices_unequal": "slices of 4, 2 and 1 sources (the base and 3 models, the base and 1, the base alone)",
    "vlm_ties_gradient": "Qwen2.5-VL layout: density and weight gradients over each module's own layers (text 4, "
                         "vision 6), as mergekit's examples/vlm-ties.yml",
    "vlm_modules": "Qwen2.5-VL layout, `modules:` with λ and weights per module and per model in a module",
    "vlm_modules_unequal": "Qwen2.5-VL layout, `modules:` of TIES merging 2, 1 and no models (the projector the "
                           "base's)",
    "task_arithmetic_bf16": "f32 inputs loaded as bf16 and every operation rounded to bf16, as mergekit",
    "karcher_bf16": "as task_arithmetic_bf16, the iterate held between passes (3 per iteration; a tensor of one chunk "
                    "iterates whole in one); f32 norms and dots "
                    "are exact sums here, in torch's f32 order there",
    "model_stock_bf16": "as task_arithmetic_bf16; norms and dots of the rounded offsets are exact sums here, in "
                        "torch's f32 order there (the likely cause of the elements one bf16 step apart; not traced "
                        "tensor by tensor)",
    "multislerp_bf16": "as task_arithmetic_bf16; its norms and dots are exact sums here, in torch's f32 order there; "
                       "3 passes where the predicted roundings hold (4 and 5 for the tensors where they miss)",
    "sce_bf16": "as task_arithmetic_bf16; bf16 variances tie often at the top-k cut: of the tied elements mergekit "
                "keeps those torch's topk returns, we keep the first by position (every mask difference is such a tie, "
                "checked against mergekit's sce_mask: 46288 elements in 39 tensors)",
    "nuslerp_bf16": "as task_arithmetic_bf16",
    "nearswap_bf16": "as task_arithmetic_bf16", "ram_bf16": "as task_arithmetic_bf16",
    "ramplus_tl_bf16": "as task_arithmetic_bf16; its f32 λ makes the rest f32, and the model f32 in both tools",
    "ties_bf16": "as task_arithmetic_bf16, but these inputs are f32: the kept elements are ranked by their exact "
                 "deltas here, by the deltas of the bf16-rounded inputs in mergekit, and among equal bf16 \\|τ\\| "
                 "by torch's unstable sort there (on bf16 checkpoints only those ties differ: tests/test_mergekit_dtype.py)",
}  # fmt: skip


def weightweave_command() -> list[str]:
    """The `weightweave` command as a user runs it, its package byte-compiled first: pip writes
    .pyc files for an installed package (mergekit's venv has them), and an editable install
    writes them on first import unless PYTHONDONTWRITEBYTECODE is set (as on some CI machines),
    where every run would compile the package again (0.1 s)."""
    import compileall

    import weightweave

    compileall.compile_dir(str(Path(weightweave.__file__).parent), quiet=1)
    exe = Path(sys.executable).parent / "weightweave"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "weightweave"]


def ensure_mergekit() -> Path:
    exe = VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", MERGEKIT], check=True)
    return exe


def make_models(root: Path, hidden: int, layers: int, vocab: int = 32000,
                low_rank: bool = False) -> tuple[Path, list[Path]]:  # fmt: skip
    """A Llama-shaped base and three fine-tunes (base + noise of different sizes), f32. With
    ``low_rank`` each 2-D fine-tune delta also has a low-rank part (structure for the SVD methods)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir = root / "base"
    if (base_dir / "config.json").exists():
        return base_dir, sorted(root.glob("ft*"))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                      vocab_size=vocab, torch_dtype="float32")  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(base_dir, safe_serialization=True)
    fts = []
    for i, scale in enumerate((0.01, 0.02, 0.005)):
        m = LlamaForCausalLM(cfg)
        sd = {}
        for k, v in base.state_dict().items():
            d = scale * torch.randn_like(v)
            if low_rank and v.dim() == 2:
                r = max(1, min(v.shape) // 16)
                d += scale * 4 * (torch.randn(v.shape[0], r) @ torch.randn(r, v.shape[1])) / r
            sd[k] = v + d
        m.load_state_dict(sd)
        fts.append(root / f"ft{i}")
        m.save_pretrained(fts[-1], safe_serialization=True)
    return base_dir, fts


VLM_TEXT, VLM_VISION, VLM_HIDDEN = 4, 6, 256


def make_vlm_models(root: Path) -> tuple[Path, list[Path]]:
    """A Qwen2.5-VL-shaped base and two fine-tunes, f32, with the tensor names mergekit 0.1.5's
    architecture file lists (the layout of the published checkpoints)."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig

    base_dir = root / "base"
    if (base_dir / "config.json").exists():
        return base_dir, sorted(root.glob("ft*"))
    h, v, vocab = VLM_HIDDEN, VLM_HIDDEN // 2, 4096
    cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": h, "intermediate_size": 2 * h, "num_hidden_layers": VLM_TEXT,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab},
        vision_config={"depth": VLM_VISION, "hidden_size": v, "out_hidden_size": h, "intermediate_size": 2 * v,
                       "num_heads": 4, "in_chans": 3, "patch_size": 2, "temporal_patch_size": 2,
                       "spatial_merge_size": 2, "fullatt_block_indexes": [VLM_VISION - 1]},
        architectures=["Qwen2_5_VLForConditionalGeneration"])  # fmt: skip
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h),
              "visual.patch_embed.proj.weight": (v, 3, 2, 2, 2), "visual.merger.ln_q.weight": (v,),
              "visual.merger.mlp.0.weight": (4 * v, 4 * v), "visual.merger.mlp.0.bias": (4 * v,),
              "visual.merger.mlp.2.weight": (h, 4 * v), "visual.merger.mlp.2.bias": (h,)}  # fmt: skip
    for i in range(VLM_TEXT):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "mlp.down_proj.weight": (h, 2 * h), p + "mlp.gate_proj.weight": (2 * h, h),
                   p + "mlp.up_proj.weight": (2 * h, h), p + "self_attn.o_proj.weight": (h, h)}  # fmt: skip
        for x, rows in (("q", h), ("k", h // 2), ("v", h // 2)):
            shapes |= {p + f"self_attn.{x}_proj.weight": (rows, h), p + f"self_attn.{x}_proj.bias": (rows,)}
    for j in range(VLM_VISION):
        p = f"visual.blocks.{j}."
        shapes |= {p + "attn.qkv.weight": (3 * v, v), p + "attn.qkv.bias": (3 * v,), p + "attn.proj.weight": (v, v),
                   p + "attn.proj.bias": (v,), p + "norm1.weight": (v,), p + "norm2.weight": (v,)}  # fmt: skip
        for x, shape in (("gate", (2 * v, v)), ("up", (2 * v, v)), ("down", (v, 2 * v))):
            shapes |= {p + f"mlp.{x}_proj.weight": shape, p + f"mlp.{x}_proj.bias": shape[:1]}
    g = torch.Generator().manual_seed(0)
    base = {n: 0.02 * torch.randn(s, generator=g) for n, s in shapes.items()}
    out = []
    for k, scale in enumerate((0.0, 0.01, 0.02)):
        d = base_dir if k == 0 else root / f"ft{k - 1}"
        d.mkdir(parents=True)
        save_file({n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
        cfg.save_pretrained(d)
        out.append(d)
    return out[0], out[1:]


def vlm_recipe(kind: str, base: Path, fts: list[Path]) -> str:
    if kind == "gradient":
        # mergekit's examples/vlm-ties.yml, with its models replaced by these.
        cfg: dict = {"models": [{"model": str(fts[0]), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                                {"model": str(fts[1]), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}}],
                     "merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True},
                     "dtype": "float32"}  # fmt: skip
    elif kind == "unequal":
        cfg = {"modules": {
            "text_decoder": {"models": [{"model": str(fts[0]), "parameters": {"weight": 0.5}},
                                        {"model": str(fts[1]), "parameters": {"weight": [1.0, 0.2]}}]},
            "multi_modal_projector": {"models": [{"model": str(base)}]},
            "vision_tower": {"models": [{"model": str(fts[1]), "parameters": {"weight": 0.8}}]}},
            "merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True, "density": 0.5},
            "dtype": "float32"}  # fmt: skip
    else:
        def entries(w0, w1):  # noqa: E306
            return [{"model": str(fts[0]), **({"parameters": {"weight": w0}} if w0 is not None else {})},
                    {"model": str(fts[1]), **({"parameters": {"weight": w1}} if w1 is not None else {})}]

        cfg = {"modules": {
            "text_decoder": {"models": entries([1.0, 0.2], None), "parameters": {"lambda": [0.5, 1.5]}},
            "multi_modal_projector": {"models": entries(0.0, None)},
            "vision_tower": {"models": entries(None, 0.1),
                             "parameters": {"lambda": [{"filter": "mlp", "value": [2.0, 0.0]}, {"value": 0.7}]}}},
            "merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 0.6, "lambda": 1.0},
            "dtype": "float32"}  # fmt: skip
    return json.dumps(cfg, indent=1) + "\n"


def recipe(method: str, base: Path, fts: list[Path]) -> str:
    spec = METHODS[method]
    if "vlm" in spec:
        return vlm_recipe(spec["vlm"], base, fts)
    if "slices" in spec:
        return slices_recipe(spec, base, fts)
    method = spec.get("method", method)
    lines = [f"merge_method: {method}"]
    if method != "linear" and not spec.get("no_base"):
        lines.append(f"base_model: {base}")
    lines.append("models:")
    if spec.get("list_base"):
        lines.append(f"  - model: {base}")
    for i, ft in enumerate(fts[: spec.get("k", len(fts))]):
        params = ", ".join(f"{k}: {json.dumps(v[i])}" for k, v in spec["per_model"].items())
        lines.append(f"  - model: {ft}" + (f"\n    parameters: {{{params}}}" if params else ""))
    if spec["shared"]:
        lines.append("parameters:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in spec["shared"].items()]
    lines.append(f"dtype: {spec.get('dtype', 'float32')}")
    return "\n".join(lines) + "\n"


def slices_recipe(spec: dict, base: Path, fts: list[Path]) -> str:
    """A ``slices`` config over the models' layers (their count from the base's config.json)."""
    n = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    h = n // 2
    cfg: dict = {"merge_method": spec["method"], "dtype": "float32"}
    if spec["slices"] == "stack":
        zero = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]
        cfg["slices"] = [{"sources": [{"model": str(fts[0]), "layer_range": [0, h + 1]}]},
                         {"sources": [{"model": str(fts[1]), "layer_range": [h - 1, n], "parameters": {"scale": zero}}]}]
    elif spec["slices"] == "unequal":
        cfg["base_model"] = str(base)
        cfg["parameters"] = spec["shared"]
        cfg["slices"] = [{"sources": [{"model": str(m), "layer_range": r, **({"parameters": {"weight": w}} if w else {})}
                                      for m, w in zip((base, *fts), (None, *WEIGHTS), strict=True)][:k]}
                         for r, k in (([0, h], 4), ([h, n - 1], 2), ([n - 1, n], 1))]  # fmt: skip
    else:
        cfg["base_model"] = str(base)
        cfg["parameters"] = spec["shared"]
        cfg["slices"] = [{"sources": [{"model": str(m), "layer_range": r} for m in (base, fts[0])]}
                         for r in ([0, h], [h, n])]  # fmt: skip
    return json.dumps(cfg, indent=1) + "\n"


# Started from a small launcher: a child forked from this (large) process would count the pages
# it inherited in its peak RSS.
LAUNCH = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
secs = time.perf_counter() - t0
print(json.dumps({"rc": r.returncode, "secs": secs, "err": r.stderr[-3000:],
                  "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command in its own process. Dirty pages are
    flushed first: otherwise the other tool's just-written output is still being written back
    while this one runs, and an fsync waits behind it."""
    os.sync()
    out = subprocess.run([sys.executable, "-c", LAUNCH, *cmd], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r['err']}")
    return r["secs"], r["rss"]


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def tied_cut(method: str, name: str, base: dict, fts: list[dict]) -> bool:
    """Whether some model's per-tensor magnitude cut falls between equal |τ| (where mergekit's
    unstable sort and our earlier-position rule may keep different elements)."""
    spec = METHODS[method]["per_model"]
    for t, ft in enumerate(fts):
        tau = (ft[name].float() - base[name].float()).abs().reshape(-1)
        v = torch.sort(tau, descending=True).values
        n, d = v.numel(), spec["density"][t]
        if d >= 1:
            continue
        if method.startswith("breadcrumbs"):
            k = int(d * n)
            g = min(int(spec["gamma"][t] * n), n - k)
            cuts = [g, g + k]
        else:
            cuts = [max(1, int(d * n))]
        if any(0 < c < n and v[c - 1] == v[c] for c in cuts):
            return True
    return False


def truth(method: str, name: str, base: dict, fts: list[dict]) -> torch.Tensor | None:
    """The method computed in f64 (the pure-torch reference on f64 inputs), for the methods whose
    results hang on reductions over a whole tensor: which tool is closer to the exact result."""
    from weightweave import reference_mergekit_methods as R

    spec = METHODS[method]
    b = base[name].double()
    ms = [f[name].double() for f in fts][: spec.get("k", len(fts))]
    w = spec["per_model"].get("weight")
    if method == "slerp":
        return R.slerp(spec["shared"]["t"], b, ms[0])
    if method == "multislerp":
        return R.multislerp(ms, w, b)
    if method == "karcher":
        return R.karcher(ms)
    if method == "model_stock":
        return R.model_stock(b, ms, False)
    if method == "nuslerp":
        return b + R.nuslerp(w[1] / (w[0] + w[1]), ms[0] - b, ms[1] - b, False, True)
    return None


def compare(method: str, ours: dict, theirs: dict, base: dict, fts: list[dict]) -> dict:
    names = sorted(n for n in theirs if n in ours)
    missing = sorted(set(theirs) ^ set(ours))
    diff = max(float((ours[n].double() - theirs[n].double()).abs().max()) for n in names)
    differ = sum(int((ours[n] != theirs[n]).sum()) for n in names)
    total = sum(ours[n].numel() for n in names)
    # The largest difference in ulps of each tensor's scale (its largest |value| in any input):
    # per-tensor coefficients that differ in their last bit move every element by about that.
    # (A stacked model's new layers have no input of their name: their own values stand in.)
    scale = {n: max([float(sd[n].abs().max()) for sd in [base, *fts] if n in sd] or [float(theirs[n].abs().max())])
             for n in names}  # fmt: skip
    ulps = max(float((ours[n].double() - theirs[n].double()).abs().max()) / (scale[n] * 2.0**-23 or 1.0)
               for n in names)  # fmt: skip
    # Elements off by more than 64 ulps of their tensor's scale: a discrete difference (a mask, a
    # tie at a cut, a sampled quantile), not rounding.
    beyond = sum(int(((ours[n].double() - theirs[n].double()).abs() > 64 * scale[n] * 2.0**-23).sum())
                 for n in names)  # fmt: skip
    row = {"method": method, "max_abs_diff": diff, "max_ulps_of_scale": ulps, "frac_differ": differ / total,
           "beyond_64_ulps": beyond, "tensors_not_in_both": missing}  # fmt: skip
    if truth(method, names[0], base, fts) is not None:
        off = {"ours": 0.0, "mergekit": 0.0}
        for n in names:
            exact = truth(method, n, base, fts)
            for who, sd in (("ours", ours), ("mergekit", theirs)):
                err = float((sd[n].double() - exact).abs().max()) / (scale[n] * 2.0**-23 or 1.0)
                off[who] = max(off[who], err)
        row["ulps_off_f64_ours"], row["ulps_off_f64_mergekit"] = off["ours"], off["mergekit"]
    differing = [n for n in names if not torch.equal(ours[n], theirs[n])]
    row["tensors_differing"] = len(differing)
    if method not in RANDOM and method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        row["differing_with_tied_cut"] = sum(tied_cut(method, n, base, fts) for n in differing)
    if method in RANDOM:
        def stats(sd):  # noqa: E306
            kept = sum(int((sd[n] != base[n]).sum()) for n in names)
            l2 = sum(float((sd[n].double() - base[n].double()).pow(2).sum()) for n in names) ** 0.5
            return kept / total, l2

        row["kept_ours"], row["norm_ours"] = stats(ours)
        row["kept_mergekit"], row["norm_mergekit"] = stats(theirs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=2, help="runs of each tool per method (the best is kept)")
    ap.add_argument("--results", default="mergekit", help="name of the results files under benches/results")
    args = ap.parse_args()
    exe = ensure_mergekit()
    work = DATA / f"mergekit-{args.hidden}x{args.layers}"
    work.mkdir(parents=True, exist_ok=True)
    base, fts = make_models(work / "models", args.hidden, args.layers)
    size = sum(t.numel() * t.element_size() for t in load_dir(base).values())
    rows = []
    for method in args.methods.split(","):
        models = (base, fts)
        if "vlm" in METHODS[method]:
            models = make_vlm_models(DATA / "mergekit-vlm" / "models")
        cfg = work / f"{method}.yml"
        cfg.write_text(recipe(method, *models[:2]))
        mk_out, ww_out = work / f"out-mergekit-{method}", work / f"out-weightweave-{method}"
        for d in (mk_out, ww_out):
            subprocess.run(["rm", "-rf", str(d)], check=True)
        # Best of --repeat consecutive runs of each tool: the first run after the other tool's is
        # slowed by what that left behind (seen here: weightweave 0.75-0.85 s right after
        # mergekit, even after a sync and 5 s, 0.31-0.39 s after itself), which a single run
        # would charge to whichever tool runs second.
        def best(cmd: list[str], out: Path) -> tuple[float, int]:
            t_best, rss = float("inf"), 0
            for _ in range(args.repeat):
                subprocess.run(["rm", "-rf", str(out)], check=True)
                t, rss = timed(cmd)
                t_best = min(t_best, t)
            return t_best, rss

        t_mk, m_mk = best([str(exe), str(cfg), str(mk_out)], mk_out)
        t_ww, m_ww = best([*weightweave_command(), "run", str(cfg), str(ww_out), "-q"], ww_out)
        # The state dicts are loaded only now: held through the timed runs, they would take the
        # page cache from the inputs of a large model.
        row = compare(method, load_dir(ww_out), load_dir(mk_out), load_dir(models[0]), [load_dir(f) for f in models[1]])
        for d in (mk_out, ww_out):
            subprocess.run(["rm", "-rf", str(d)], check=True)  # outputs of every row would fill the disk
        row.update({"seconds_mergekit": t_mk, "seconds_weightweave": t_ww, "speedup": t_mk / t_ww,
                    "peak_rss_mergekit": m_mk, "peak_rss_weightweave": m_ww, "memory_ratio": m_mk / m_ww})  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = HERE / "results"
    # A run over some methods keeps the other methods' rows of an earlier run on the same models.
    old = out / f"{args.results}.json"
    if old.exists():
        prev = json.loads(old.read_text())
        if (prev.get("hidden"), prev.get("layers")) == (args.hidden, args.layers):
            done = {r["method"] for r in rows}
            kept = {r["method"]: r for r in prev["rows"] if r["method"] not in done}
            rows = [kept.get(m) or next(r for r in rows if r["method"] == m)
                    for m in METHODS if m in kept or m in done]  # fmt: skip
    result = {"mergekit": MERGEKIT, "model_bytes": size, "hidden": args.hidden, "layers": args.layers,
              "threads": os.cpu_count(), "rows": rows}  # fmt: skip
    (out / f"{args.results}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# weightweave vs {MERGEKIT}: the same YAML recipes",
             "",
             f"Llama-shaped f32 checkpoints, hidden {args.hidden}, {args.layers} layers, "
             f"{size / 1e9:.2f} GB per model; base + 3 fine-tunes; weights {WEIGHTS}, densities {DENSITIES}; "
             f"{os.cpu_count()} cores. Command: `python benches/mergekit_compare.py --hidden {args.hidden} "
             f"--layers {args.layers}" + (f" --results {args.results}" if args.results != "mergekit" else "")
             + f"`. Times: whole commands, best of {args.repeat} "
             "consecutive runs of each tool (rows re-run with `--methods` keep the other rows' times).",
             "",
             "| method | max abs diff | in ulps of the tensor's scale | elements differing | beyond 64 ulps "
             "| mergekit s | weightweave s | speedup | mergekit peak RSS | weightweave peak RSS | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        note = ""
        if "differing_with_tied_cut" in r and r["tensors_differing"]:
            note = (f"{r['tensors_differing']} tensor(s) differ, {r['differing_with_tied_cut']} of them with equal "
                    "\\|τ\\| across a cut (mergekit's unstable sort there)")  # fmt: skip
        note = NOTES.get(r["method"], note)
        if "ulps_off_f64_ours" in r:
            note += (f"; off an f64 computation by {r['ulps_off_f64_ours']:.1f} ulps of scale (ours) vs "
                     f"{r['ulps_off_f64_mergekit']:.1f} (mergekit)")  # fmt: skip
        if r["method"] in RANDOM:
            note = (f"random masks: kept {r['kept_ours']:.4f} vs {r['kept_mergekit']:.4f}, "
                    f"‖Δ‖₂ {r['norm_ours']:.4g} vs {r['norm_mergekit']:.4g}")  # fmt: skip
        lines.append(f"| {r['method']} | {r['max_abs_diff']:.3g} | {r['max_ulps_of_scale']:.1f} "
                     f"| {r['frac_differ']:.2e} | {r['beyond_64_ulps']} | {r['seconds_mergekit']:.2f} "
                     f"| {r['seconds_weightweave']:.2f} | {r['speedup']:.1f}× | {r['peak_rss_mergekit'] / 1e6:.0f} MB "
                     f"| {r['peak_rss_weightweave'] / 1e6:.0f} MB | {note} |")  # fmt: skip
    lines += ["",
              "Peak RSS counts the pages of memory-mapped inputs that weightweave touched (about the size of the "
              "inputs); its anonymous memory stays O(chunk × threads × T). Differences in deterministic methods "
              "are listed with their cause; DARE's masks are random in both tools (different generators), so "
              "they are compared by the fraction of elements changed from the base and the L2 norm of the merged "
              "delta."]  # fmt: skip
    (out / f"{args.results}.md").write_text("\n".join(lines) + "\n")
    print(textwrap.indent("\n".join(lines), "  "))


if __name__ == "__main__":
    main()
