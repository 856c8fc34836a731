"""Vision checkpoints as their communities save them, merged and loaded back by their own loaders:
timm's training checkpoints (``last.pth.tar``: ``state_dict`` beside an ``argparse.Namespace`` and
the optimizer) into ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``, and open_clip
(hub directories and ``epoch_N.pt`` training checkpoints) into
``open_clip.create_model_and_transforms("local-dir:...")``. Reference: task arithmetic written
literally from SPEC.md in torch."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import weightweave as ww

from conftest import load

# Needs an ecosystem's package, which .ci/run installs (`pytest -m 'not ecosystems'` leaves these out).
pytestmark = pytest.mark.ecosystems

LAM = 0.4


def _task_arithmetic(base: dict, fts: list[dict]) -> dict:
    """θ_pre + λ·Σ_t (θ_t − θ_pre), in f32 (SPEC: task arithmetic)."""
    return {k: v + LAM * sum(ft[k] - v for ft in fts) for k, v in base.items()}


def _moved(sd: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in sd.items()}  # fmt: skip


def _close(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_timm_training_checkpoints(tmp_path):
    timm = pytest.importorskip("timm", reason="timm loads the output (.ci/run installs it)")
    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    save_file(sd, tmp_path / "base.safetensors")
    fts = [_moved(sd, i) for i in (1, 2)]
    paths = []
    for i, ft in enumerate(fts):
        opt = torch.optim.SGD(base.parameters(), lr=0.1, momentum=0.9)
        ckpt = {"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": ft, "optimizer": opt.state_dict(),
                "version": 2, "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=0.1, aug=[1, 2])}  # fmt: skip
        paths.append(tmp_path / f"ft{i}" / "last.pth.tar")
        paths[-1].parent.mkdir()
        torch.save(ckpt, paths[-1])
    ww.merge(tmp_path / "base.safetensors", paths, tmp_path / "out.safetensors", method="task_arithmetic", lam=LAM)
    want = _task_arithmetic(sd, fts)
    _close(load(tmp_path / "out.safetensors"), want)
    # num_classes in the overlay too, or timm drops a head whose class count differs from ImageNet's.
    overlay = dict(file=str(tmp_path / "out.safetensors"), num_classes=3)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    _close({k: v.detach() for k, v in m.state_dict().items()}, want)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1},
}


def test_open_clip_hub_dirs_and_training_checkpoints(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="open_clip loads the output (.ci/run installs it)")
    torch.manual_seed(0)
    base = open_clip.CLIP(**TINY_CLIP)
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    hub = tmp_path / "base"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file(sd, hub / "open_clip_model.safetensors")
    fts = [_moved(sd, i) for i in (1, 2)]
    paths = []
    for i, ft in enumerate(fts):  # as open_clip's training script saves them
        paths.append(tmp_path / f"run{i}" / "epoch_2.pt")
        paths[-1].parent.mkdir()
        torch.save({"epoch": 2, "name": f"run{i}", "state_dict": ft, "optimizer": {"state": {}}}, paths[-1])
    ww.merge(hub, paths, tmp_path / "out", method="task_arithmetic", lam=LAM)
    want = _task_arithmetic(sd, fts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # open_clip's own deprecation notices
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out'}")
    _close({k: v.detach() for k, v in model.state_dict().items()}, want)
    text = torch.randint(0, 100, (2, 8))
    img, txt = model.encode_image(torch.randn(2, 3, 32, 32)), model.encode_text(text)
    assert img.shape == txt.shape == (2, 16)
