"""Diffusion LoRA files as fine-tunes: diffusers' ``pytorch_lora_weights.safetensors`` (PEFT names,
with and without ``lora_adapter_metadata``, and the older ``.lora.down`` / ``processor.to_k_lora``
names) and kohya-ss files (``lora_unet_…``, ``lora_te_…``, ``.alpha``; SDXL's sgm block names).
The reference is diffusers itself: ``load_lora_weights`` + ``fuse_lora`` on the same tiny pipeline."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightweave as ww

from conftest import load

# Needs an ecosystem's package, which .ci/run installs (`pytest -m 'not ecosystems'` leaves these out).
pytestmark = pytest.mark.ecosystems

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402
from test_diffusers_pipeline import NONE, _pipeline  # noqa: E402

PARTS = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base pipeline and one LoRA (ranks 4 and 2, α 8 and 3) saved by diffusers, with and
    without its configuration in the file's metadata."""
    root = tmp_path_factory.mktemp("dlora")
    base = _pipeline(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(root / "base")
        p = _pipeline(0)
        ucfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS,
                               rank_pattern={"proj_in": 2})  # fmt: skip
        tcfg = peft.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=TE_TARGETS)
        p.unet.add_adapter(ucfg)
        peft.inject_adapter_in_model(tcfg, p.text_encoder)
        usd, tsd = get_peft_model_state_dict(p.unet), get_peft_model_state_dict(p.text_encoder)
        save = diffusers.StableDiffusionPipeline.save_lora_weights
        save(root / "plain", unet_lora_layers=usd, text_encoder_lora_layers=tsd)
        save(root / "meta", unet_lora_layers=usd, text_encoder_lora_layers=tsd,
             unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())  # fmt: skip
        save(root / "pickled", unet_lora_layers=usd, text_encoder_lora_layers=tsd, safe_serialization=False)
    bsd = _state(base)
    return root, bsd


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}/{k}": v.detach().clone() for c in PARTS for k, v in getattr(pipe, c).state_dict().items()}


def _fresh(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.StableDiffusionPipeline.from_pretrained(root / "base", **NONE)


def _diffusers_fused(root, lora) -> dict[str, torch.Tensor]:
    """What diffusers makes of the LoRA: loaded, fused into the weights, unloaded."""
    q = _fresh(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.load_lora_weights(lora)
        q.fuse_lora()
        q.unload_lora_weights()
    return _state(q)


def _merged(root, lora, out) -> dict[str, torch.Tensor]:
    ww.merge(root / "base", [lora], out, method="task_arithmetic", lam=1.0)
    return {f"{c}/{k}": v for c, f in PARTS.items() for k, v in load_file(out / c / f).items()}


def _check(got, want, bsd):
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-6, rtol=1e-5, msg=k)
    moved = {k.split("/")[0] for k in want if not torch.equal(want[k], bsd[k])}
    assert moved == set(PARTS)  # the reference moved both parts: the test sees both


@pytest.mark.parametrize("which", ["plain", "meta", "pickled"])
@pytest.mark.parametrize("given", ["dir", "file"])
def test_diffusers_lora_files_are_diffusers_fuse_lora(made, tmp_path, which, given):
    root, bsd = made
    lora = root / which if given == "dir" else next((root / which).glob("pytorch_lora_weights.*"))
    want = _diffusers_fused(root, lora)
    got = _merged(root, lora, tmp_path / "out")
    _check(got, want, bsd)
    # The output is a pipeline diffusers loads as it is.
    q = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", **NONE)
    _check(_state(q), want, bsd)


def test_metadata_scales_as_its_config_and_none_scales_by_one(made, tmp_path):
    """diffusers: without ``lora_adapter_metadata`` each module's α is its rank (W + B·A); with it,
    the saved α/r and rank pattern: the two files differ by α/r = 2 (3/2 in the text encoder)."""
    root, bsd = made
    plain, meta = _merged(root, root / "plain", tmp_path / "a"), _merged(root, root / "meta", tmp_path / "b")
    for k, ratio in [("unet/down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight", 2.0),
                     ("unet/down_blocks.1.attentions.0.proj_in.weight", 4.0),  # rank_pattern: r = 2
                     ("text_encoder/encoder.layers.0.self_attn.q_proj.weight", 1.5)]:  # fmt: skip
        d1, d2 = plain[k] - bsd[k], meta[k] - bsd[k]
        torch.testing.assert_close(d2, ratio * d1, atol=1e-6, rtol=1e-4)


def _kohya(root, alphas, sgm=False) -> dict[str, torch.Tensor]:
    """The plain LoRA in kohya-ss's naming: lora_unet_ / lora_te_ + the module path with '_',
    lora_down / lora_up, and `alphas(module, rank)` as each module's .alpha (None: no alpha)."""
    out = {}
    for key, v in load_file(root / "plain" / "pytorch_lora_weights.safetensors").items():
        comp, rest = key.split(".", 1)
        mod, fac = rest.rsplit(".lora_", 1)
        if comp == "unet":
            name = "lora_unet_" + (_sgm(mod) if sgm else mod).replace(".", "_")
        else:
            name = "lora_te_text_model_" + mod.replace(".", "_")  # transformers 4's CLIP names
        out[name + (".lora_down.weight" if fac.startswith("A") else ".lora_up.weight")] = v.clone()
        a = alphas(mod, v.shape[0]) if fac.startswith("A") else None
        if a is not None:
            out[name + ".alpha"] = torch.tensor(a, dtype=torch.float16)
    return out


def _blk(m) -> int:  # block b, layer l -> the sgm block's number, layers_per_block = 1
    return int(m[1]) * 2 + int(m[2])


SGM = [  # diffusers' UNet path -> the sgm UNet's (SDXL in kohya-ss)
    (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", lambda m: f"input_blocks.{1 + _blk(m)}.1.{m[3]}"),
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.conv1", lambda m: f"input_blocks.{1 + _blk(m)}.0.in_layers.2"),
    (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", lambda m: f"output_blocks.{_blk(m)}.1.{m[3]}"),
    (r"up_blocks\.(\d+)\.resnets\.(\d+)\.conv1", lambda m: f"output_blocks.{_blk(m)}.0.in_layers.2"),
    (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
    (r"mid_block\.resnets\.(\d)\.conv1", lambda m: f"middle_block.{2 * int(m[1])}.in_layers.2"),
]  # fmt: skip


def _sgm(mod: str) -> str:
    """diffusers' UNet path as the sgm UNet (SDXL in kohya-ss) numbers it."""
    for pattern, sgm in SGM:
        m = re.match(pattern, mod)
        if m:
            return sgm(m)
    raise AssertionError(mod)


@pytest.mark.parametrize("alphas", ["per-module", "none"])
def test_kohya_files_are_diffusers_fuse_lora(made, tmp_path, alphas):
    root, bsd = made
    # Per-module α (6 and 3 in the UNet, by rank): diffusers reads a kohya-ss file's α per module only
    # where its own renaming keeps the module's name (not attention processors'), so the α differ by
    # rank here; the hand-worked case below checks α/r per module wherever it is.
    rule = (lambda m, r: 1.5 * r) if alphas == "per-module" else (lambda m, r: None)
    save_file(_kohya(root, rule), tmp_path / "k.safetensors")
    want = _diffusers_fused(root, tmp_path / "k.safetensors")
    got = _merged(root, tmp_path / "k.safetensors", tmp_path / "out")
    _check(got, want, bsd)


def test_kohya_sdxl_block_names(made, tmp_path):
    """SDXL's kohya-ss names number the sgm UNet's blocks; diffusers maps them with the UNet's
    config (its SDXL loader), and so do we, from the base's names."""
    root, bsd = made
    save_file(_kohya(root, lambda m, r: 2.0 * r, sgm=True), tmp_path / "k.safetensors")
    q = _fresh(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(tmp_path / "k.safetensors",
                                                                       unet_config=q.unet.config)  # fmt: skip
        q.load_lora_into_unet(sd, alphas, unet=q.unet, adapter_name="x")
        q.load_lora_into_text_encoder(sd, alphas, text_encoder=q.text_encoder, adapter_name="x")
        q.fuse_lora()
        q.unload_lora_weights()
    want = _state(q)
    got = _merged(root, tmp_path / "k.safetensors", tmp_path / "out")
    _check(got, want, bsd)


def test_old_diffusers_names(made, tmp_path):
    """``….lora.down.weight`` and attention processors' ``processor.to_k_lora.down.weight``."""
    root, bsd = made
    old = {}
    for key, v in load_file(root / "plain" / "pytorch_lora_weights.safetensors").items():
        mod, fac = key.rsplit(".lora_", 1)
        down = "down" if fac.startswith("A") else "up"
        m = re.match(r"(unet\..*\.attn[12])\.(to_[qkv]|to_out\.0)$", mod)
        if m:  # the attention processors' names
            old[f"{m[1]}.processor.{m[2].replace('.0', '')}_lora.{down}.weight"] = v.clone()
        else:
            old[f"{mod}.lora.{down}.weight"] = v.clone()
    save_file(old, tmp_path / "old.safetensors")
    want = _diffusers_fused(root, root / "plain")  # the same factors under today's names
    got = _merged(root, tmp_path / "old.safetensors", tmp_path / "out")
    _check(got, want, bsd)


def test_a_unet_directory_base(made, tmp_path):
    """A LoRA of the UNet alone merges into a UNet directory; one that adapts the text encoder
    too is refused with what to give instead."""
    root, bsd = made
    sd = load_file(root / "plain" / "pytorch_lora_weights.safetensors")
    save_file({k: v for k, v in sd.items() if k.startswith("unet.")}, tmp_path / "u.safetensors")
    ww.merge(root / "base" / "unet", [tmp_path / "u.safetensors"], tmp_path / "out", method="task_arithmetic",
             lam=1.0)  # fmt: skip
    want = _diffusers_fused(root, tmp_path / "u.safetensors")
    got = load(tmp_path / "out")
    for k, v in got.items():
        torch.testing.assert_close(v, want[f"unet/{k}"], atol=2e-6, rtol=1e-5)
    with pytest.raises(ww.WeaveError, match="give the base as the whole diffusers pipeline"):
        ww.merge(root / "base" / "unet", [root / "plain"], tmp_path / "o2", method="task_arithmetic", lam=1.0)
    assert not (tmp_path / "o2").exists()


def _single(tmp_path, names):
    save_file({n: torch.ones(4, 4) for n in names}, tmp_path / "base.safetensors")


@pytest.mark.parametrize(
    "lora, msg",
    [
        ({"lora_unet_a_b.lora_down.weight": torch.ones(2, 4), "lora_unet_a_b.lora_up.weight": torch.ones(4, 2)},
         "names two of the base's modules"),
        ({"lora_unet_c.lora_down.weight": torch.ones(2, 4), "lora_unet_c.lora_up.weight": torch.ones(4, 2),
          "lora_unet_c.alpha": torch.ones(2)}, "one floating-point number"),
        ({"lora_unet_c.lora_down.weight": torch.ones(2, 4), "lora_unet_c.lora_up.weight": torch.ones(4, 2),
          "lora_unet_c.lora_mid.weight": torch.ones(2, 2)}, "Tucker"),
        ({"lora_unet_c.lora_down.weight": torch.ones(2, 4)}, "only one of its two LoRA factors"),
        ({"lora_unet_c.lora_down.weight": torch.ones(2, 4), "lora_unet_c.lora_up.weight": torch.ones(4, 2),
          "lora_unet_d.lora_down.weight": torch.ones(2, 4), "lora_unet_d.lora_up.weight": torch.ones(4, 2),
          "lora_unet_c.alpha": torch.tensor(1.0)}, "without an .alpha"),
        ({"unet.c.lora_A.weight": torch.ones(2, 4), "unet.c.lora_B.weight": torch.ones(4, 2),
          "unet.c.alpha": torch.tensor(1.0)}, "diffusers' loader does not read"),
        ({"unet.e.lora_A.weight": torch.ones(2, 4), "unet.e.lora_B.weight": torch.ones(4, 2)}, "adapts no module"),
        ({"lora_unet_c.lora_down.weight": torch.ones(0, 4), "lora_unet_c.lora_up.weight": torch.ones(4, 0)},
         "rank 0"),
    ],
)  # fmt: skip
def test_bad_lora_files_are_refused(tmp_path, lora, msg):
    _single(tmp_path, ["a.b.weight", "a_b.weight", "c.weight", "d.weight"])
    save_file(lora, tmp_path / "l.safetensors")
    with pytest.raises(ww.WeaveError, match=msg) as e:
        ww.merge(tmp_path / "base.safetensors", [tmp_path / "l.safetensors"], tmp_path / "o.safetensors",
                 method="task_arithmetic", lam=1.0)  # fmt: skip
    assert "l.safetensors" in str(e.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_lora_file_is_not_a_base(tmp_path):
    _single(tmp_path, ["c.weight"])
    lora = {"lora_unet_c.lora_down.weight": torch.ones(2, 4), "lora_unet_c.lora_up.weight": torch.ones(4, 2)}
    save_file(lora, tmp_path / "l.safetensors")
    with pytest.raises(ww.WeaveError, match="is a LoRA adapter; the base is the model it adapts"):
        ww.merge(tmp_path / "l.safetensors", [tmp_path / "base.safetensors"], tmp_path / "o.safetensors",
                 method="task_arithmetic", lam=1.0)  # fmt: skip


def test_kohya_scaling_by_hand(tmp_path):
    """τ = α/r · up·down per module, worked by hand on 2×2 weights: r = 1 with α = 0.5, r = 2 with
    α = 4 (kohya-ss's rule, as ComfyUI applies it)."""
    save_file({"a.to_q.weight": torch.zeros(2, 2), "c.weight": torch.ones(2, 2)}, tmp_path / "base.safetensors")
    lora = {"lora_unet_a_to_q.lora_down.weight": torch.tensor([[1.0, 2.0]]),
            "lora_unet_a_to_q.lora_up.weight": torch.tensor([[3.0], [4.0]]),
            "lora_unet_a_to_q.alpha": torch.tensor(0.5),
            "lora_unet_c.lora_down.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
            "lora_unet_c.lora_up.weight": torch.tensor([[1.0, 0.0], [0.0, -1.0]]),
            "lora_unet_c.alpha": torch.tensor(4.0)}  # fmt: skip
    save_file(lora, tmp_path / "l.safetensors")
    ww.merge(tmp_path / "base.safetensors", [tmp_path / "l.safetensors"], tmp_path / "o.safetensors",
             method="task_arithmetic", lam=1.0)  # fmt: skip
    out = load_file(tmp_path / "o.safetensors")
    assert out["a.to_q.weight"].tolist() == [[1.5, 3.0], [2.0, 4.0]]
    assert out["c.weight"].tolist() == [[3.0, 1.0], [1.0, -1.0]]


def test_a_flux_transformer_lora(tmp_path):
    """A Flux LoRA (``transformer.`` names, as FluxPipeline.save_lora_weights writes them) on a
    transformer component directory, against diffusers' load_lora_adapter + fuse_lora."""
    torch.manual_seed(0)
    cfg = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=False,
               axes_dims_rope=(2, 2, 4))  # fmt: skip
    t = diffusers.FluxTransformer2DModel(**cfg)
    t.save_pretrained(tmp_path / "base")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp"]
    t.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
    diffusers.FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(t))
    ref = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_adapter(tmp_path / "lora", prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
        ref.fuse_lora()
        ref.unload_lora()
    want = {k: v.detach() for k, v in ref.state_dict().items()}
    ww.merge(tmp_path / "base", [tmp_path / "lora"], tmp_path / "out", method="task_arithmetic", lam=1.0)
    got = load(tmp_path / "out")
    base = load(tmp_path / "base")
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-6, rtol=1e-5, msg=k)
    assert sum(not torch.equal(want[k], base[k]) for k in want) >= 8
