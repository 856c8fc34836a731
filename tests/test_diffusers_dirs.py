"""diffusers component directories (UNet, transformer, VAE): read from
`diffusion_pytorch_model.safetensors` (or its shard index), written under the same names with the
component's config.json, so `from_pretrained` of the component finds them; `variant` files are
named in the error and read when passed as files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import weightweave as ww
from weightweave import reference as R

from conftest import assert_close_ulp, load, make_state, rounding_slack, tree

CONFIG = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "sample_size": 8}


def component(root, state, *, shards=1, variant=None):
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(CONFIG))
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    if shards == 1:
        save_file(state, str(root / f"{stem}.safetensors"))
        return root
    names = sorted(state)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for k, part in enumerate(parts, 1):
        f = f"{stem}-{k:05}-of-{shards:05}.safetensors"
        save_file({n: state[n] for n in part}, str(root / f))
        weight_map.update({n: f for n in part})
    (root / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.fixture
def unets(tmp_path):
    base, models = make_state(4)
    b = component(tmp_path / "base" / "unet", base)
    ms = [component(tmp_path / f"ft{i}" / "unet", m, shards=2) for i, m in enumerate(models)]
    return base, models, b, ms


def test_components_merge_into_a_component(unets, tmp_path):
    base, models, b, ms = unets
    out = tmp_path / "merged" / "unet"
    rep = ww.merge(b, ms, out, method="ties", lam=0.8)
    assert tree(out) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == CONFIG
    want = R.merge(base, models, "ties", 0.8)
    assert_close_ulp(load(out), want, atol=rounding_slack(base, models, "ties", [0.8]))
    assert [p.rsplit("/", 1)[-1] for p in rep.outputs] == ["diffusion_pytorch_model.safetensors", "config.json"]
    # Sharded, and replaced by a later run (an earlier output is recognised under this stem too).
    ww.merge(b, ms, out, method="ties", lam=0.8, shard_size=4000, overwrite=True)
    names = tree(out)
    assert "diffusion_pytorch_model.safetensors.index.json" in names and "config.json" in names
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in names if n.startswith("diffusion_pytorch_model-")}
    assert all(n.endswith(".safetensors") for n in index["weight_map"].values())
    assert_close_ulp(load(out), want, atol=rounding_slack(base, models, "ties", [0.8]))


def test_variants_are_named_and_read_as_files(tmp_path):
    base, models = make_state(6)
    b = component(tmp_path / "base", base, variant="fp16")
    ms = [component(tmp_path / f"ft{i}", m, variant="fp16") for i, m in enumerate(models)]
    msg = r"not a model directory.*diffusion_pytorch_model\.safetensors.*variant diffusion_pytorch_model\.fp16\."
    with pytest.raises(ww.HeaderError, match=msg + "safetensors: pass that file"):
        ww.merge(b, ms, tmp_path / "out", method="task_arithmetic")
    f = "diffusion_pytorch_model.fp16.safetensors"
    out = tmp_path / "out"
    ww.merge(b / f, [m / f for m in ms], out, method="task_arithmetic", lam=0.5)
    # The variant's config comes along; the output is the plain component.
    assert tree(out) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_close_ulp(load(out), R.merge(base, models, "task_arithmetic", 0.5),
                     atol=rounding_slack(base, models, "task_arithmetic", [0.5]))  # fmt: skip


def test_an_empty_directory_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    base, models = make_state(1)
    b = component(tmp_path / "b", base)
    with pytest.raises(ww.HeaderError, match="not a model directory") as e:
        ww.merge(b, [tmp_path / "empty"], tmp_path / "o", method="task_arithmetic")
    assert "invalid header" not in str(e.value)
    assert torch.is_tensor(load(b)["scale"])


def test_open_clip_directories(tmp_path):
    # open_clip's hub layout: open_clip_config.json beside open_clip_model.safetensors, which is
    # what open_clip's hf-hub loader reads; the output keeps both names.
    base, models = make_state(7)
    cfg = {"model_cfg": {"embed_dim": 8}, "preprocess_cfg": {"mean": [0.5]}}

    def oc(root, state):
        root.mkdir(parents=True)
        (root / "open_clip_config.json").write_text(json.dumps(cfg))
        save_file(state, str(root / "open_clip_model.safetensors"))
        return root

    b = oc(tmp_path / "b", base)
    ms = [oc(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    out = tmp_path / "out"
    ww.merge(b, ms, out, method="ties", lam=0.7)
    assert tree(out) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert json.loads((out / "open_clip_config.json").read_text()) == cfg
    assert_close_ulp(load(out), R.merge(base, models, "ties", 0.7),
                     atol=rounding_slack(base, models, "ties", [0.7]))  # fmt: skip
    # The weights file given as a file brings its directory's config along too.
    out2 = tmp_path / "out2"
    ww.merge(b / "open_clip_model.safetensors", ms, out2, method="ties", lam=0.7)
    assert tree(out2) == ["open_clip_config.json", "open_clip_model.safetensors"]
    ww.merge(b, ms, out2, method="ties", lam=0.7, overwrite=True)  # an earlier output is recognised
    with pytest.raises(ww.ParamError, match="open_clip loads a single"):
        ww.merge(b, ms, tmp_path / "out3", method="ties", shard_size=1000)
    assert not (tmp_path / "out3").exists()


@pytest.mark.parametrize("listing", ["model_index.json", "modules.json"])
def test_hostile_component_lists_are_refused(tmp_path, listing):
    """A module or component list from a stranger: names that climb out, JSON nested past any
    parser's stack, and a list larger than any real one are errors, never a crash or a read
    outside the model."""
    d = tmp_path / "m"
    (d / "unet").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, d / "unet" / "diffusion_pytorch_model.safetensors")
    if listing == "modules.json":
        save_file({"w": torch.zeros(2)}, d / "model.safetensors")
    climbing = ({"unet": ["diffusers", "UNet2DConditionModel"], "../unet": ["diffusers", "X"]}
                if listing == "model_index.json" else [{"path": "unet"}, {"path": "../unet"}])  # fmt: skip
    cases = [(json.dumps(climbing), "not one directory name"),
             ("[" * 200_000 + "]" * 200_000, "recursion limit|not a"),
             (" " * (2 << 20) + "{}", "more than such a list holds")]  # fmt: skip
    for text, why in cases:
        (d / listing).write_text(text)
        with pytest.raises(ww.HeaderError, match=why):
            ww.inspect(d)
