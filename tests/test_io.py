"""Sharded input and output, model directories, metadata, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import weightweave as ww
from weightweave import reference as R

from conftest import assert_close_ulp, digest, load, make_state, rounding_slack, tree


def write_sharded(d: Path, sd: dict, per_shard: int = 3) -> Path:
    """A transformers-style model dir: shards + index + config/tokenizer files."""
    d.mkdir(parents=True)
    names = sorted(sd)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for k, g in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: sd[n] for n in g}, str(d / fname))
        weight_map.update({n: fname for n in g})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer.json").write_text("{}")
    return d


def test_sharded_in_sharded_out_round_trip(tmp_path):
    base, models = make_state(1)
    bp = write_sharded(tmp_path / "base", base)
    mps = [write_sharded(tmp_path / f"m{i}", m, per_shard=4) for i, m in enumerate(models)]
    out = tmp_path / "out"
    rep = ww.weave(bp, mps, out, method="ties", shard_size=3000)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "tokenizer.json" in files
    assert "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(f.startswith("model-0000") for f in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    want = R.weave(base, models, "ties", ww.default_lambdas("ties"))
    assert_close_ulp(load(out), want, atol=rounding_slack(base, models, "ties", ww.default_lambdas("ties")))
    assert sorted(rep.outputs) == sorted(str(out / f) for f in files)
    # The output is itself a valid input, through its index.
    again = tmp_path / "again.safetensors"
    ww.merge(out, [out], again, method="task_arithmetic")
    for k, v in load(out).items():
        assert torch.equal(load(again)[k], v)


def test_single_file_dir_output_and_metadata(ckpts, tmp_path):
    _, _, bp, mps = ckpts
    out = tmp_path / "outdir"
    ww.weave(bp, mps, out, method="dare", lambdas="0.1:0.3:0.1", pool="random", seed=7, density=0.3)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["weightweave.version"] == ww.__version__
    recipe = json.loads(meta["weightweave.recipe"])
    assert recipe["method"] == "dare" and recipe["pool"] == "random" and recipe["seed"] == 7
    assert recipe["params"] == {"density": 0.3, "rescale": True}
    assert recipe["lambdas"] == pytest.approx([0.1, 0.2, 0.3])
    assert recipe["include_deltas"] is True


def test_rerun_needs_overwrite_and_replaces_only_our_output(ckpts, tmp_path):
    _, _, bp, mps = ckpts
    out = tmp_path / "o"
    ww.merge(bp, mps, out, method="magmax")
    first = digest(out)
    with pytest.raises(ww.OutputError, match="overwrite"):
        ww.merge(bp, mps, out, method="magmax", lam=0.2)
    assert digest(out) == first
    ww.merge(bp, mps, out, method="magmax", lam=0.2, overwrite=True)
    assert digest(out) != first
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["weightweave.recipe"])["lam"] == 0.2  # as given, not f32 noise
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ww.OutputError, match="notes.txt"):
        ww.merge(bp, mps, out, method="magmax", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_inspect(tmp_path):
    base, _ = make_state(2, tasks=0)
    d = write_sharded(tmp_path / "b", base)
    info = ww.inspect(d)
    assert info["num_params"] == sum(t.numel() for t in base.values())
    assert len(info["files"]) == 4  # 3 shards + the index
    by_name = {t["name"]: t for t in info["tensors"]}
    assert by_name["emb.weight"]["dtype"] == "BF16" and by_name["emb.weight"]["shape"] == [37, 24]
    assert by_name["position_ids"]["merged"] is False
    assert tree(d) == sorted(tree(d))  # inspect wrote nothing


def test_int_and_bool_copied_exactly(ckpts, tmp_path):
    base, _, bp, mps = ckpts
    out = tmp_path / "o.safetensors"
    ww.weave(bp, mps, out, method="pcb")
    got = load(out)
    assert torch.equal(got["position_ids"], base["position_ids"])
    assert torch.equal(got["mask"], base["mask"])
