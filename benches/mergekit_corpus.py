"""Published mergekit configs, run unchanged through mergekit 0.1.5 and through ``weightweave run``.

Each config in benches/mergekit_corpus/ is kept verbatim as its author published it (mergekit's
own examples, model cards, guides), with its source in a comment on the first line. Every model it
names is replaced by a tiny local model of one layout (a Llama-shaped bf16 model: 64 wide, as many
layers as the config's layer ranges need, a shared 64-token tokenizer; each model is the same
root plus its own noise, so they are fine-tunes of one another):

- a hub id (``org/name``) becomes a directory of that name where both tools run: mergekit 0.1.5
  asks the hub for a repository's file list even when it is cached, so offline it cannot run a
  hub id otherwise (weightweave's cache lookup is tested in tests/test_hub.py); the config's text
  is not touched;
- a local path (``C:\\...``, ``/intermediate/model/A``, ``model_a``) is the one edit: it is
  replaced in the text by a tiny model's directory.

Then both tools run the config (mergekit in its own venv, as benches/mergekit_compare.py sets it
up) and the outputs are compared tensor by tensor (rows of vocabulary tensors by token), with the
tokenizers (vocabulary, rendered chat template) and config.json's layer count and vocabulary size.

    python benches/mergekit_corpus.py [--only 07,12] [--keep DIR]

Writes benches/results/mergekit_corpus.md and mergekit_corpus.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mergekit_compare import ensure_mergekit, weightweave_command  # noqa: E402

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "mergekit_corpus"
RESULTS = HERE / "results"
HIDDEN, VOCAB = 64, 64
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
CONV = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"}]  # fmt: skip


def _refs(cfg) -> list[str]:
    """Every model a config names (mergekit's ModelReference fields), in order of appearance."""
    out: list[str] = []

    def walk(v, key=None):
        if isinstance(v, dict):
            for k, x in v.items():
                if k in ("model", "base_model") and isinstance(x, str):
                    out.append(x)
                elif k in ("tokenizer_source", "source") and isinstance(x, str) and x not in ("base", "union"):
                    out.append(x)
                else:
                    walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)

    walk(cfg)
    return list(dict.fromkeys(out))


def _layers(cfg) -> int:
    ends = []

    def walk(v):
        if isinstance(v, dict):
            if isinstance(v.get("layer_range"), list) and len(v["layer_range"]) == 2:
                ends.append(int(v["layer_range"][1]))
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(cfg)
    return max(ends, default=4)


def _tokenizer(dst: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(dst)  # fmt: skip


def _model(dst: Path, ref: str, layers: int, root: dict[str, torch.Tensor], cfg_json: dict, tok: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(zlib.crc32(ref.encode()))
    sd = {k: (v + 0.02 * torch.randn(v.shape, generator=g)).to(torch.bfloat16).contiguous() for k, v in root.items()}
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg_json, indent=1))
    for f in tok.iterdir():
        shutil.copy(f, dst / f.name)


def _adapter(dst: Path, ref: str, root: dict[str, torch.Tensor]) -> None:
    """A PEFT LoRA adapter for the tiny Llama: rank 4, α 8, random bf16 factors on two of the
    attention/MLP projections (which two, from the name)."""
    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(zlib.crc32(b"lora:" + ref.encode()))
    pairs = [("q_proj", "v_proj"), ("k_proj", "o_proj"), ("q_proj", "down_proj"), ("v_proj", "up_proj")]
    targets = pairs[zlib.crc32(ref.encode()) % len(pairs)]
    sd = {}
    for name, w in root.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            out, inp = w.shape
            sd[f"base_model.model.{module}.lora_A.weight"] = (0.1 * torch.randn(4, inp, generator=g)).to(torch.bfloat16)
            sd[f"base_model.model.{module}.lora_B.weight"] = (0.1 * torch.randn(out, 4, generator=g)).to(torch.bfloat16)
    save_file(sd, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": None}, indent=1))  # fmt: skip


def _root(layers: int) -> tuple[dict[str, torch.Tensor], dict]:
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   tie_word_embeddings=False, torch_dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    return {k: v.detach().float() for k, v in m.state_dict().items()}, d


def _hub(ref: str) -> bool:
    from weightweave.hub import looks_like_hub_id

    return not os.path.isabs(ref) and looks_like_hub_id(ref) and "\\" not in ref


def prepare(path: Path, work: Path) -> tuple[Path, dict]:
    """The config with local paths replaced, its cache and models; returns (config, info)."""
    text = path.read_text()
    cfg = yaml.safe_load(text)
    layers = _layers(cfg)
    root, cfg_json = _root(layers)
    tok = work / "tokenizer"
    _tokenizer(tok)
    local = work / "local"
    refs, adapters = [], []
    for ref in _refs(cfg):
        # model+lora: the model, and a PEFT adapter for it.
        model, plus, lora = ref.partition("+")
        refs.append(model)
        if plus:
            adapters.append(lora)
    for ref in sorted(set(adapters), key=len, reverse=True):
        dst = work / ref if _hub(ref) else local / re.sub(r"[^A-Za-z0-9]+", "_", ref).strip("_")
        _adapter(dst, ref, root)
        if not _hub(ref):
            text = re.sub(r"(?<![\w./\\-])" + re.escape(ref) + r"(?![\w./\\-])", lambda _m, d=dst: str(d), text)
    for ref in sorted(set(refs), key=len, reverse=True):
        if _hub(ref):
            # mergekit 0.1.5 asks the hub for a repository's file list even when the files are
            # cached (common.py, local_path), so offline it runs a hub id only as a directory of
            # that name: both tools run in the directory that holds them.
            _model(work / ref.partition("@")[0], ref, layers, root, cfg_json, tok)
        else:
            dst = local / re.sub(r"[^A-Za-z0-9]+", "_", ref).strip("_")
            _model(dst, ref, layers, root, cfg_json, tok)
            text = re.sub(r"(?<![\w./\\-])" + re.escape(ref) + r"(?![\w./\\-])", lambda _m, d=dst: str(d), text)
    out = work / "config.yml"
    out.write_text(text)
    return out, {"layers": layers, "method": cfg.get("merge_method") if isinstance(cfg, dict) else None}


def _run(cmd: list[str], cwd: Path, env: dict) -> tuple[int, float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    tail = (p.stderr or p.stdout).strip().splitlines()
    return p.returncode, time.perf_counter() - t, tail[-1] if tail else ""


def _weights(d: Path) -> dict[str, torch.Tensor] | None:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        return None
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    return sd


def _tok(d: Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(d)
    except Exception:  # noqa: BLE001
        return None


def _render(t) -> str:
    try:
        return t.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}"


def compare(a: Path, b: Path) -> dict:
    """mergekit's output ``a`` against ours ``b``."""
    wa, wb = _weights(a), _weights(b)
    res: dict = {}
    ta, tb = _tok(a), _tok(b)
    perm = None
    if ta is not None and tb is not None:
        va, vb = ta.get_vocab(), tb.get_vocab()
        res["vocab_equal"] = set(va) == set(vb)
        if res["vocab_equal"] and va != vb:
            order = sorted(va)
            perm = (torch.tensor([va[t] for t in order]), torch.tensor([vb[t] for t in order]))
        res["template_equal"] = (ta.chat_template or "") == (tb.chat_template or "") or _render(ta) == _render(tb)
    elif (ta is None) != (tb is None):
        res["vocab_equal"] = False
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    res["config_equal"] = all(ca.get(k) == cb.get(k) for k in ("num_hidden_layers", "vocab_size"))
    if set(wa) != set(wb):
        res["names_differ"] = sorted(set(wa) ^ set(wb))[:4]
        return res
    n = diff = 0
    top = 0.0
    for k in wa:
        x, y = wa[k].float(), wb[k].float()
        if x.shape != y.shape:
            res["shape_differs"] = k
            return res
        if perm is not None and x.shape[0] == len(perm[0]):
            x, y = x[perm[0]], y[perm[1]]
        d = (x - y).abs()
        n += d.numel()
        diff += int((d > 0).sum())
        top = max(top, float(d.max()) if d.numel() else 0.0)
    res.update(elements=n, differing=diff, max_diff=top)
    return res


#: Methods whose arithmetic in bf16/f16 weightweave emulates (recipe.py, _ARITH_METHODS); every
#: method loads its inputs in the config's dtype, and linear's f32 arithmetic is mergekit's.
EMULATED = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock",
            "sce", "nuslerp", "arcee_fusion", "linear", "karcher"}  # fmt: skip
CUTS = {"ties", "breadcrumbs", "breadcrumbs_ties"}


def why(r: dict) -> str:
    """Why the outputs differ, from the config (its method and dtype) and what was measured."""
    if not r.get("mk_ok"):
        return "mergekit fails: " + r.get("mk_err", "")[:90]
    if not r.get("ww_ok"):
        return "weightweave refuses: " + r.get("ww_err", "")[:140]
    if "names_differ" in r or "shape_differs" in r:
        return f"outputs differ in layout ({r.get('names_differ') or r.get('shape_differs')})"
    method = r["method"]
    if method in RANDOM:
        return "random masks (each tool's own generator): compared by statistics in mergekit_compare.py"
    if r.get("differing", 0) == 0:
        return ""
    cfg = yaml.safe_load((CORPUS / r["config"]).read_text())
    dtype = cfg.get("dtype") if isinstance(cfg.get("dtype"), str) else None
    narrow = dtype in ("bfloat16", "float16", "bf16", "fp16", "f16") or dtype is None
    what = dtype or "the inputs' stored dtype"
    if method in EMULATED and narrow:
        if method in CUTS:
            return (f"elements at a sparsification cut between equal {what} magnitudes, where torch's unstable "
                    "sort picks (mergekit's own result is undefined there)")  # fmt: skip
        if method == "sce":
            return (f"elements at sce's top-k cut between equal {what} variances, where torch.topk picks "
                    "(mergekit's own result is undefined there)")  # fmt: skip
        if method == "karcher":
            return (f"emulated {what} arithmetic; its f32 norms and dots are exact sums here, in torch's f32 order "
                    f"there: an f32 ulp that crosses a {what} rounding boundary, compounded over the iterations "
                    "(torch's order changes with the thread count, mergekit_threads.md)")  # fmt: skip
        if method == "arcee_fusion":
            return ("importances at the threshold: torch's softmax (its vectorized exp and f32 sum) differs from "
                    "ours in an ulp, and a row's KL moves")  # fmt: skip
        return f"emulated {what} arithmetic: reductions rounded at a boundary"
    if method == "slerp":
        # mergekit 0.1.5's slerp computes in f32 whatever the dtype, with chunked f32 reductions.
        return ("norms and dot reduced in f64 here, in torch's chunked f32 order there, which changes with the "
                "thread count on larger tensors (mergekit_threads.md)")  # fmt: skip
    if narrow:
        return f"f32 arithmetic here, {what} there (mergekit rounds after every operation; not emulated for {method})"
    return ("norms, dots and angles reduced in f64 here, in torch's f32 order there, which changes with the "
            "thread count on larger tensors (mergekit_threads.md)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated config number prefixes")
    ap.add_argument("--keep", default=None, help="keep the work directories under this path")
    ap.add_argument("--table", action="store_true", help="only rewrite the table from the last results")
    args = ap.parse_args()
    if args.table:
        return write([])
    exe = ensure_mergekit()
    configs = sorted(CORPUS.glob("*.yml"))
    if args.only:
        want = tuple(args.only.split(","))
        configs = [c for c in configs if c.name.startswith(want)]
    rows = []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    ww = weightweave_command()
    for path in configs:
        work = Path(tempfile.mkdtemp(prefix="mkc-", dir=args.keep))
        try:
            cfg, info = prepare(path, work)
            env = dict(base_env, HF_HUB_CACHE=str(work / "hub"), HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf"))
            r = {"config": path.name, "source": path.read_text().splitlines()[0].removeprefix("# source: "), **info}
            # The model card asks the hub about every model (model_info): offline it fails before the tokenizer.
            rc, r["mk_s"], r["mk_err"] = _run([str(exe), str(cfg), str(work / "mk"), "--no-write-model-card",
                                               "--lora-merge-cache", str(work / "lora-cache")], work, env)
            r["mk_ok"] = _weights(work / "mk") is not None if (work / "mk").exists() else False
            rc, r["ww_s"], r["ww_err"] = _run([*ww, "run", str(cfg), str(work / "ww"), "-q"], work, env)
            r["ww_ok"] = rc == 0
            if r["mk_ok"] and r["ww_ok"]:
                r.update(compare(work / "mk", work / "ww"))
            rows.append(r)
            print(f"{path.name}: mergekit {'ok' if r['mk_ok'] else 'fails'}, weightweave {'ok' if r['ww_ok'] else 'fails'}"
                  f", differing {r.get('differing', '-')} {why(r)}", flush=True)  # fmt: skip
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
    write(rows)


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    old = RESULTS / "mergekit_corpus.json"
    if old.exists():
        # A partial run (--only) replaces its rows in the last full table.
        ran = {r["config"] for r in rows}
        rows = sorted([r for r in json.loads(old.read_text()) if r["config"] not in ran] + rows,
                      key=lambda r: r["config"])  # fmt: skip
    (RESULTS / "mergekit_corpus.json").write_text(json.dumps(rows, indent=1))
    mk = [r for r in rows if r["mk_ok"]]
    both = [r for r in mk if r["ww_ok"]]
    exact = [r for r in both if r.get("differing") == 0 and r.get("vocab_equal", True) and r.get("config_equal")
             and r.get("template_equal", True)]  # fmt: skip
    lines = [
        "# Published mergekit configs: mergekit 0.1.5 and weightweave on the same tiny models",
        "",
        f"{len(rows)} configs (benches/mergekit_corpus/, verbatim, each with its source). mergekit runs "
        f"{len(mk)}; weightweave runs {len(both)} of those; {len(exact)} give mergekit's model bit for bit "
        "(weights, tokenizer, config.json).",
        "",
        "| config | method | mergekit | weightweave | elements differing | max diff | tokenizer, config | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tc = "" if not (r["mk_ok"] and r["ww_ok"]) else (
            ("vocab ✓" if r.get("vocab_equal", True) else "vocab ✗") + (" template ✓" if r.get("template_equal", True)
            else " template ✗") + (" config ✓" if r.get("config_equal") else " config ✗"))  # fmt: skip
        d = r.get("differing")
        counts = "" if d is None else f"{d} of {r['elements']}"
        top = "" if d is None else f"{r['max_diff']:.3g}"
        mk = f"{r['mk_s']:.1f} s" if r["mk_ok"] else "fails"
        ours = f"{r['ww_s']:.1f} s" if r["ww_ok"] else "refused"
        lines.append(f"| {r['config']} | {r['method']} | {mk} | {ours} | {counts} | {top} | {tc} | {why(r)} |")
    (RESULTS / "mergekit_corpus.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4]))


if __name__ == "__main__":
    main()
