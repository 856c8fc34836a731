"""What lands next to the merged weights: the base directory's config and tokenizer files
(however the base was named), its subfolders, never weights in other formats or training logs;
config.json naming the written dtype; a sharded base giving a sharded output; the base's
metadata kept."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import weightweave as ww


def model_dir(root, sd, *, sharded=False, metadata=None):
    root.mkdir(parents=True)
    if sharded:
        names = sorted(sd)
        groups = [names[i : i + 3] for i in range(0, len(names), 3)]
        wm = {}
        for k, g in enumerate(groups):
            f = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: sd[n] for n in g}, str(root / f), metadata=metadata)
            wm.update({n: f for n in g})
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    else:
        save_file(sd, str(root / "model.safetensors"), metadata=metadata)
    config = {"model_type": "llama", "torch_dtype": "bfloat16", "text_config": {"dtype": "bfloat16", "n": 1}}
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "tokenizer.json").write_text('{"tok": 1}')
    return root


@pytest.fixture
def models(fine_tunes):
    return fine_tunes


def test_config_dtype_follows_out_dtype(tmp_path, models):
    base, mps = models
    b = model_dir(tmp_path / "base", base)
    out = tmp_path / "o32"
    ww.merge(b, mps, out, method="ties", out_dtype="f32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["text_config"]["dtype"] == "float32"
    assert cfg["model_type"] == "llama" and list(cfg) == ["model_type", "torch_dtype", "text_config"]  # order kept
    # Without out_dtype the config is copied byte for byte.
    ww.merge(b, mps, tmp_path / "same", method="ties")
    assert (tmp_path / "same" / "config.json").read_bytes() == (b / "config.json").read_bytes()


@pytest.mark.parametrize("given", ["dir", "file", "index"])
def test_companions_come_whatever_names_the_base(tmp_path, models, given):
    base, mps = models
    b = model_dir(tmp_path / "base", base, sharded=given == "index")
    arg = {"dir": b, "file": b / "model.safetensors", "index": b / "model.safetensors.index.json"}[given]
    out = tmp_path / "out"
    ww.merge(arg, mps, out, method="ties")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_a_loose_file_brings_no_companions(tmp_path, models):
    base, mps = models
    d = tmp_path / "loose"
    d.mkdir()
    save_file(base, str(d / "weights.safetensors"))
    (d / "config.json").write_text("{}")
    ww.merge(d / "weights.safetensors", mps, tmp_path / "out", method="ties")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


def test_subfolders_copied_other_weights_and_logs_skipped(tmp_path, models):
    base, mps = models
    b = model_dir(tmp_path / "base", base)
    (b / "modules.json").write_text('[{"path": "1_Pooling"}]')
    (b / "1_Pooling").mkdir()
    (b / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (b / "2_Dense").mkdir()
    (b / "2_Dense" / "pytorch_model.bin").write_bytes(b"weights")
    for name in ("model.onnx", "model.onnx_data", "model.tflite", "events.out.tfevents.1.host", "model.gguf"):
        (b / name).write_bytes(b"x")
    (b / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(b / "run.sh", 0o755)
    out = tmp_path / "out"
    rep = ww.merge(b, mps, out, method="ties")
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert not (out / "2_Dense").exists() and not (out / "model.onnx").exists()
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) == 0o755
    assert rep.skipped == sorted(
        ["2_Dense/pytorch_model.bin (weights in another format)", "events.out.tfevents.1.host (a training log)",
         "model.gguf (weights in another format)", "model.onnx (weights in another format)",
         "model.onnx_data (weights in another format)", "model.tflite (weights in another format)"]
    )  # fmt: skip
    assert str(out / "1_Pooling" / "config.json") in rep.outputs
    # An earlier output with subfolders is replaced with overwrite, but not if someone added a file.
    ww.merge(b, mps, out, method="ties", lam=0.5, overwrite=True)
    (out / "1_Pooling" / "mine.txt").write_text("x")
    with pytest.raises(ww.OutputError, match="1_Pooling/mine.txt"):
        ww.merge(b, mps, out, method="ties", overwrite=True)


COPY_BIG = """
import sys, weightweave as ww
ww.merge(sys.argv[1], sys.argv[2:-1], sys.argv[-1], method="ties")
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
"""


def test_a_large_companion_is_copied_in_bounded_memory(tmp_path, models):
    base, mps = models
    b = model_dir(tmp_path / "base", base)
    big = b / "vocab.txt"
    with open(big, "wb") as f:  # 300 MB of real bytes (not a sparse file)
        block = os.urandom(1 << 20)
        for _ in range(300):
            f.write(block)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", COPY_BIG, str(b), *map(str, mps), str(out)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    peak_kb = int(proc.stdout.split()[-1])
    assert peak_kb < 150_000, peak_kb  # the file is 300 MB: it never was in memory
    assert (out / "vocab.txt").stat().st_size == big.stat().st_size


def test_sharded_base_gives_sharded_output(tmp_path, models):
    base, mps = models
    b = model_dir(tmp_path / "base", base, sharded=True)
    largest = max(p.stat().st_size for p in b.glob("model-*.safetensors"))
    out = tmp_path / "out"
    ww.merge(b, mps, out, method="ties")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert all(p.stat().st_size <= largest + 4096 for p in shards)
    ww.merge(b, mps, tmp_path / "one", method="ties", shard_size=10**9)
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]


def test_base_metadata_kept_and_inputs_recorded(tmp_path, models):
    base, mps = models
    b = model_dir(tmp_path / "base", base, metadata={"format": "pt", "origin": "lab"})
    out = tmp_path / "out"
    ww.weave(b, mps, out, method="ties", lambdas="0.3:0.9:0.3")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["origin"] == "lab" and meta["format"] == "pt"
    recipe = json.loads(meta["weightweave.recipe"])
    assert recipe["base"] == str(b) and recipe["models"] == [str(p) for p in mps]
    assert recipe["lambdas"] == [0.3, 0.6, 0.9]
    assert torch.is_tensor(torch.zeros(1))
