"""Real clients are the test: tiny transformers models built from configs (offline, random init),
saved with ``save_pretrained`` (sharded and not, tied and untied embeddings, with a tokenizer and a
generation config), merged by every method, and loaded back with ``from_pretrained``: every
parameter must match the pure-torch reference, in the dtype the user asked for."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference as R

from conftest import assert_close_ulp, load, rounding_slack

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "the", "merged", "model", "works"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def llama(seed: int, tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def save_family(root, tie: bool, shard: str | None, tasks: int = 3):
    """A base and fine-tunes (the base plus noise), as save_pretrained writes them."""
    base = llama(0, tie)
    kw = {"max_shard_size": shard} if shard else {}
    base.save_pretrained(root / "base", **kw)
    tokenizer().save_pretrained(root / "base")
    dirs = []
    g = torch.Generator().manual_seed(1)
    for t in range(tasks):
        ft = llama(0, tie)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_((0.02 * torch.randn(p.shape, generator=g)).to(p.dtype))
        ft.save_pretrained(root / f"ft{t}", **kw)
        dirs.append(root / f"ft{t}")
    return root / "base", dirs


@pytest.mark.parametrize(("tie", "shard"), [(True, None), (False, "10KB")])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "breadcrumbs", "pcb", "magmax", "iso_c"])
def test_merged_model_loads_as_meant(tmp_path, tie, shard, method):
    base_dir, ft_dirs = save_family(tmp_path, tie, shard)
    out = tmp_path / "out"
    kw = {"device": "cpu"} if method in ww.SVD_METHODS else {}
    ww.weave(base_dir, ft_dirs, out, method=method, **kw)
    base_sd, ft_sds = load(base_dir), [load(d) for d in ft_dirs]
    lambdas = ww.default_lambdas(method)
    want = R.weave(base_sd, ft_sds, method, lambdas, **kw)
    slack = rounding_slack(base_sd, ft_sds, method, lambdas, **kw)
    if method == "iso_c":  # an SVD: the reference and the backend agree to f32 SVD accuracy
        slack = {n: s + 1e-3 for n, s in slack.items()}
    got = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert got.dtype == torch.bfloat16
    state = {k: v for k, v in got.state_dict().items() if k in want}
    assert sorted(state) == sorted(want)
    assert_close_ulp(state, want, atol=slack)
    if tie:
        assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    # A sharded base gives a sharded output.
    assert (out / "model.safetensors.index.json").exists() == (base_dir / "model.safetensors.index.json").exists()
    assert (base_dir / "model.safetensors.index.json").exists() == bool(shard)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("the merged model works")["input_ids"] == [2, 3, 4, 5]
    assert (out / "generation_config.json").exists()


def test_out_dtype_loads_in_that_dtype(tmp_path):
    base_dir, ft_dirs = save_family(tmp_path, tie=False, shard=None)
    out = tmp_path / "out32"
    ww.merge(base_dir, ft_dirs, out, method="ties", out_dtype="f32")
    got = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert got.dtype == torch.float32
    want = R.merge(load(base_dir), [load(d) for d in ft_dirs], "ties", 1.0, out_dtype="f32")
    state = {k: v for k, v in got.state_dict().items() if k in want}
    assert_close_ulp(state, want, ulps=2)


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                                                n_head=4))  # fmt: skip


def clip():
    text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 16}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8}  # fmt: skip
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                                 image_size=16, patch_size=8, num_labels=3)  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


@pytest.mark.parametrize("make", [gpt2, clip, vit], ids=["gpt2", "clip", "vit"])
def test_other_architectures_round_trip(tmp_path, make):
    torch.manual_seed(0)
    base = make()
    base.save_pretrained(tmp_path / "base")
    dirs = []
    g = torch.Generator().manual_seed(5)
    for t in range(2):
        torch.manual_seed(0)
        ft = make()
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        ft.save_pretrained(tmp_path / f"ft{t}")
        dirs.append(tmp_path / f"ft{t}")
    out = tmp_path / "out"
    ww.weave(tmp_path / "base", dirs, out, method="ties")
    base_sd, ft_sds = load(tmp_path / "base"), [load(d) for d in dirs]
    lambdas = ww.default_lambdas("ties")
    want = R.weave(base_sd, ft_sds, "ties", lambdas)
    # The reference's weights saved next to the same config load into the same model: compare
    # the two loaded models (transformers may rename keys on load, e.g. ViT's in v5).
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_bytes((tmp_path / "base" / "config.json").read_bytes())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in want.items()}, str(ref / "model.safetensors"))
    got, exp = type(base).from_pretrained(out).state_dict(), type(base).from_pretrained(ref).state_dict()
    assert sorted(got) == sorted(exp)
    slack = rounding_slack(base_sd, ft_sds, "ties", lambdas)
    assert_close_ulp(got, exp, atol=max(float(v.max()) for v in slack.values()))


def test_pytorch_bin_checkpoints_in_loadable_model_out(tmp_path):
    """Model directories as older transformers saved them (config.json + pytorch_model.bin): the
    merge reads the .bin in place and writes safetensors that from_pretrained loads, equal to
    merging the same weights saved as safetensors."""

    def save(model, d):
        model.save_pretrained(d.with_name(d.name + "_st"))
        d.mkdir()
        (d / "config.json").write_bytes((d.with_name(d.name + "_st") / "config.json").read_bytes())
        torch.save(model.state_dict(), d / "pytorch_model.bin")
        return d, d.with_name(d.name + "_st")

    base_bin, base_st = save(llama(0, tie=False), tmp_path / "base")
    g = torch.Generator().manual_seed(9)
    bins, sts = [], []
    for t in range(2):
        ft = llama(0, tie=False)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_((0.02 * torch.randn(p.shape, generator=g)).to(p.dtype))
        b, st = save(ft, tmp_path / f"ft{t}")
        bins.append(b)
        sts.append(st)
    ww.weave(base_bin, bins, tmp_path / "out", method="ties")
    ww.weave(base_st, sts, tmp_path / "ref", method="ties")
    assert not list((tmp_path / "out").glob("*.bin")) and (tmp_path / "out" / "config.json").exists()
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref").state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_fp8_model_merges_and_loads(tmp_path):
    """A Llama whose matrices are stored as FP8 (E4M3) codes: merged without out_dtype the
    output keeps them FP8, and from_pretrained loads it (into f32 here) equal to the reference
    merge of the same FP8 weights, rounded back to FP8."""
    from safetensors.torch import load_file, save_file

    base_dir, ft_dirs = save_family(tmp_path, tie=False, shard=None)
    for d in [base_dir, *ft_dirs]:
        sd = load_file(str(d / "model.safetensors"))
        sd = {k: v.float().to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in sd.items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    ww.merge(base_dir, ft_dirs, out, method="ties", lam=0.8)
    written = load(out)
    assert written["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    base_sd, ft_sds = load(base_dir), [load(d) for d in ft_dirs]
    want = R.merge(base_sd, ft_sds, "ties", 0.8)
    assert_close_ulp(written, want, atol=rounding_slack(base_sd, ft_sds, "ties", [0.8]))
    got = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    state = got.state_dict()
    for k, v in want.items():
        assert torch.equal(state[k], v.float()), k
