"""LoRA adapters resolved exactly as PEFT resolves them, checked against PEFT's own
merge_and_unload() on the same files: rank/alpha patterns are regular expressions matched in the
config's order; fan_in_fan_out follows the layer type (Conv1D transposed, nn.Linear never); a rank
the factors do not have, r = 0 and a non-finite scaling are refused; an embedding adapter's saved
base layer is read as the base's tensor."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import weightweave as ww

from conftest import assert_close_ulp, load, tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
peft = pytest.importorskip("peft", reason="PEFT checks the LoRA semantics (.ci/run installs it)")
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"), pytest.mark.ecosystems]


llama = tiny_llama


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def make_adapter(make, root, name, seed, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes (fan_in_fan_out, embedding layers saved)
        model = peft.get_peft_model(make(), peft.LoraConfig(lora_dropout=0.0, **cfg))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
    return root / name


def peft_merged(make, base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """What PEFT itself makes of the adapter directory as it is on disk."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = type(make()).from_pretrained(base_dir)
        model = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def edit_config(adapter_dir, **changes):
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_bases")
    llama().save_pretrained(root / "llama")
    gpt2().save_pretrained(root / "gpt2")
    return root


def check_like_peft(make, base_dir, adapter_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    ww.merge(base_dir, [adapter_dir], out, method="task_arithmetic", lam=1.0)
    got = load(out)
    want = {k: v for k, v in peft_merged(make, base_dir, adapter_dir).items() if k in got}
    assert sorted(want) == sorted(got)
    assert_close_ulp(got, want, atol={k: 2e-6 * float(v.abs().max()) for k, v in want.items()})
    return got


def test_patterns_are_regexes_in_config_order(bases, tmp_path):
    ad = make_adapter(llama, tmp_path, "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                      alpha_pattern={r"layers\.0\.self_attn\.q_proj": 32, "q_proj": 2, r"layers\.1\..*": 0.5},
                      rank_pattern={r"layers\.[01]\.self_attn\.o_proj": 2})  # fmt: skip
    got = check_like_peft(llama, bases / "llama", ad, tmp_path)
    # The regex key, listed first, wins over the plain one for layer 0 (a literal key would not match).
    base = load(bases / "llama" / "model.safetensors")
    d0 = (got["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]).abs().max()
    d1 = (got["model.layers.1.self_attn.q_proj.weight"] - base["model.layers.1.self_attn.q_proj.weight"]).abs().max()
    assert d0 > 4 * d1


def test_a_pattern_order_change_changes_the_result_as_in_peft(bases, tmp_path):
    ad = make_adapter(llama, tmp_path, "a", 2, r=4, lora_alpha=8, target_modules=["q_proj"],
                      alpha_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 32})  # fmt: skip
    check_like_peft(llama, bases / "llama", ad, tmp_path)


def test_fan_in_fan_out_on_linear_is_ignored_as_peft_does(bases, tmp_path):
    ad = make_adapter(llama, tmp_path, "a", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    edit_config(ad, fan_in_fan_out=True)  # a hand-made config: PEFT warns and ignores it on nn.Linear
    check_like_peft(llama, bases / "llama", ad, tmp_path)
    # Without the base's config.json, a square weight's layer type is unknown: refused, not guessed.
    bare = tmp_path / "bare.safetensors"
    shutil.copy(bases / "llama" / "model.safetensors", bare)
    with pytest.raises(ww.WeaveError, match="q_proj.weight.*is square.*fan_in_fan_out"):
        ww.merge(bare, [ad], tmp_path / "x.safetensors", method="task_arithmetic")
    edit_config(ad, fan_in_fan_out=False)  # without the flag a square weight is an nn.Linear, as PEFT has it
    ww.merge(bare, [ad], tmp_path / "y.safetensors", method="task_arithmetic", lam=1.0)


@pytest.mark.parametrize("flag", [True, False])
def test_conv1d_is_transposed_whatever_the_flag_says(bases, tmp_path, flag):
    # GPT-2: c_attn [32, 96] (not square), c_proj [32, 32] (square) are Conv1D.
    ad = make_adapter(gpt2, tmp_path, "a", 4, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                      fan_in_fan_out=True)  # fmt: skip
    edit_config(ad, fan_in_fan_out=flag)
    check_like_peft(gpt2, bases / "gpt2", ad, tmp_path)


@pytest.mark.parametrize(
    ("changes", "msg"),
    [
        ({"r": 16}, "has rank 4 but .* gives r = 16"),
        ({"rank_pattern": {"q_proj": 8}}, "has rank 4 but .* rank_pattern 'q_proj' = 8"),
        ({"r": 0}, "r = 0: a LoRA rank must be positive"),
        ({"lora_alpha": 1e300}, "LoRA scaling .* beyond the f32 range"),
        ({"alpha_pattern": {"(?<=x)q_proj": 2}}, "alpha_pattern key .* not a regular expression"),
        ({"rank_pattern": {"q_proj": -1}}, "rank_pattern key 'q_proj': -1 is not a valid value"),
    ],
)  # fmt: skip
def test_configs_peft_refuses_are_refused(bases, tmp_path, changes, msg):
    ad = make_adapter(llama, tmp_path, "a", 5, r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_config(ad, **changes)
    with pytest.raises(ww.WeaveError, match=msg):
        ww.merge(bases / "llama", [ad], tmp_path / "o.safetensors", method="task_arithmetic")
    assert not (tmp_path / "o.safetensors").exists()
    if changes.get("r") == 16 or "rank_pattern" in changes and changes["rank_pattern"]["q_proj"] > 0:
        with pytest.raises((RuntimeError, ValueError)):  # PEFT cannot load these factors either
            peft_merged(llama, bases / "llama", ad)


def test_an_embedding_adapter_with_its_saved_base_layer(bases, tmp_path):
    ad = make_adapter(llama, tmp_path, "a", 6, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    from safetensors import safe_open

    with safe_open(str(ad / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith("embed_tokens.base_layer.weight") for k in f.keys())  # noqa: SIM118
    check_like_peft(llama, bases / "llama", ad, tmp_path)
    # Saved from another base (its embedding differs): refused, never merged against the wrong one.
    other = tmp_path / "other"
    shutil.copytree(bases / "llama", other)
    sd = load(other / "model.safetensors")
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] + 1
    from safetensors.torch import save_file

    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ww.WeaveError, match="embed_tokens.base_layer.weight.*differs from the base's"):
        ww.merge(other, [ad], tmp_path / "o2.safetensors", method="task_arithmetic")
