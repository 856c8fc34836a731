"""Whole diffusers pipelines: every weight-bearing component that model_index.json lists (UNet, VAE,
text encoder) merged, the pipeline written back whole, loaded by diffusers and run for one step."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import weightweave as ww

from conftest import load

# Needs an ecosystem's package, which .ci/run installs (`pytest -m 'not ecosystems'` leaves these out).
pytestmark = pytest.mark.ecosystems

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

NONE = dict(tokenizer=None, safety_checker=None, feature_extractor=None, image_encoder=None)
COMPONENTS = ("unet", "vae", "text_encoder")


def _pipeline(seed: int, like=None):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)  # fmt: skip
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4, sample_size=16)  # fmt: skip
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1))  # fmt: skip
    scheduler = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    p = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)  # fmt: skip
    if like is not None:  # a fine-tune: every component's weights moved a little from `like`'s
        with torch.no_grad():
            for c in COMPONENTS:
                for x, y in zip(getattr(p, c).parameters(), getattr(like, c).parameters(), strict=True):
                    x.copy_(y + 0.01 * torch.randn_like(y))
    return p


@pytest.fixture
def pipelines(tmp_path):
    base = _pipeline(0)
    base.save_pretrained(tmp_path / "base")
    fts = [_pipeline(i + 1, like=base) for i in range(2)]
    for i, p in enumerate(fts):
        p.save_pretrained(tmp_path / f"ft{i}")
    return tmp_path, base, fts


def test_a_whole_pipeline_is_merged_and_runs(pipelines):
    root, base, fts = pipelines
    for _ in range(2):  # the second run replaces the first output
        rep = ww.merge(root / "base", [root / "ft0", root / "ft1"], root / "out", method="task_arithmetic", lam=0.5,
                       overwrite=True)  # fmt: skip
    assert not rep.skipped
    assert sorted(str(p.relative_to(root / "out")) for p in (root / "out").rglob("*.safetensors")) == [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]  # fmt: skip
    out = diffusers.StableDiffusionPipeline.from_pretrained(root / "out", **NONE)
    for c in COMPONENTS:  # θ_pre + λ Σ τ_t, per component, from each pipeline's own parameters
        for got, b, *f in zip(getattr(out, c).parameters(), getattr(base, c).parameters(),
                              *[getattr(ft, c).parameters() for ft in fts], strict=True):  # fmt: skip
            torch.testing.assert_close(got, b + 0.5 * sum(x - b for x in f), rtol=0, atol=1e-6)
    img = out(prompt_embeds=torch.randn(1, 4, 16), num_inference_steps=1, height=16, width=16, guidance_scale=1.0,
              output_type="np").images  # fmt: skip
    assert img.shape == (1, 16, 16, 3)
    # The scheduler's config (no weights) comes along.
    assert (root / "out" / "scheduler" / "scheduler_config.json").is_file()


def test_a_fine_tune_without_a_component_is_named(pipelines):
    root, _, _ = pipelines
    shutil.rmtree(root / "ft1" / "vae")
    with pytest.raises(ww.MismatchError, match=r"ft1: tensor 'vae/.*' of the base is missing.*keep_base='\^\(vae/\)'"):
        ww.merge(root / "base", [root / "ft0", root / "ft1"], root / "out", method="task_arithmetic")
    with pytest.warns(ww.KeptBaseWarning, match="keep_base copied 92 tensor"):
        ww.merge(root / "base", [root / "ft0", root / "ft1"], root / "out", method="task_arithmetic",
                 keep_base="^(vae/)")  # fmt: skip
    got, want = load(root / "out" / "vae" / "diffusion_pytorch_model.safetensors"), load(
        root / "base" / "vae" / "diffusion_pytorch_model.safetensors")  # fmt: skip
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_single_file_outputs_say_what_to_do(pipelines):
    root, _, _ = pipelines
    with pytest.raises(ww.OutputError, match=r"module directories \(text_encoder, unet, vae\): write it to a dir"):
        ww.merge(root / "base", [root / "ft0"], root / "o.safetensors", method="task_arithmetic")


def test_sharded_components(pipelines):
    """A component saved in shards (diffusers' and transformers' max_shard_size) is read through
    its index, in the base and in the fine-tunes alike: the merge equals the unsharded one, bit
    for bit, and the output loads."""
    root, base, fts = pipelines
    ww.merge(root / "base", [root / "ft0", root / "ft1"], root / "plain", method="ties", lam=0.7)
    for i, p in enumerate([base, fts[0]]):
        d = root / ("base" if i == 0 else "ft0")
        for c in ("unet", "text_encoder"):
            shutil.rmtree(d / c)
            getattr(p, c).save_pretrained(d / c, max_shard_size="4KB")
    assert len(list((root / "base" / "unet").glob("*.safetensors"))) > 2
    assert (root / "ft0" / "text_encoder" / "model.safetensors.index.json").is_file()
    ww.merge(root / "base", [root / "ft0", root / "ft1"], root / "sharded", method="ties", lam=0.7)
    for f in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        got, want = load(root / "sharded" / f), load(root / "plain" / f)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    out = diffusers.StableDiffusionPipeline.from_pretrained(root / "sharded", **NONE)
    assert out.unet.conv_in.weight.shape == base.unet.conv_in.weight.shape
    # A shard that the index lists a tensor in but lacks it is named.
    idx = root / "ft0" / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(idx.read_text())
    name = next(iter(data["weight_map"]))
    others = sorted(set(data["weight_map"].values()) - {data["weight_map"][name]})
    data["weight_map"][name] = others[0]
    idx.write_text(json.dumps(data))
    with pytest.raises(ww.WeaveError, match=f"{name}.*listed in .*index.json but absent from the shard"):
        ww.merge(root / "base", [root / "ft0"], root / "o2", method="task_arithmetic")


def test_fine_tuned_unets_merge_into_the_pipeline(pipelines):
    """DreamBooth-style fine-tunes are UNet directories: aligned to the pipeline's unet/, the other
    components copied from the base with the suggested keep_base."""
    root, base, fts = pipelines
    unets = [root / f"ft{i}" / "unet" for i in range(2)]
    with pytest.raises(ww.MismatchError) as e:
        ww.merge(root / "base", unets, root / "out", method="task_arithmetic")
    msg = str(e.value)
    assert "'unet/' added to" in msg and "keep_base='^(text_encoder/|vae/)'" in msg
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rep = ww.merge(root / "base", unets, root / "out", method="task_arithmetic", lam=1.0,
                       keep_base="^(text_encoder/|vae/)")  # fmt: skip
    assert len(rep.aligned) == 2
    out = diffusers.StableDiffusionPipeline.from_pretrained(root / "out", **NONE)
    for got, b, *f in zip(out.unet.parameters(), base.unet.parameters(), *[ft.unet.parameters() for ft in fts],
                          strict=True):  # fmt: skip
        torch.testing.assert_close(got, b + sum(x - b for x in f), rtol=0, atol=1e-6)
    for got, b in zip(out.vae.parameters(), base.vae.parameters(), strict=True):
        assert torch.equal(got, b)


def test_only_named_components_are_merged(pipelines):
    """keep_base names the components left as the base's: the UNet alone is merged, the VAE and
    text encoder are the base's though every fine-tune holds its own."""
    root, base, fts = pipelines
    with pytest.warns(ww.KeptBaseWarning):
        ww.merge(root / "base", [root / "ft0", root / "ft1"], root / "out", method="task_arithmetic", lam=1.0,
                 keep_base="^(vae|text_encoder)/")  # fmt: skip
    out = diffusers.StableDiffusionPipeline.from_pretrained(root / "out", **NONE)
    for c in ("vae", "text_encoder"):
        pairs = zip(getattr(out, c).parameters(), getattr(base, c).parameters(), strict=True)
        assert all(torch.equal(x, y) for x, y in pairs)
    for got, b, *f in zip(out.unet.parameters(), base.unet.parameters(), *[ft.unet.parameters() for ft in fts],
                          strict=True):  # fmt: skip
        torch.testing.assert_close(got, b + sum(x - b for x in f), rtol=0, atol=1e-6)
