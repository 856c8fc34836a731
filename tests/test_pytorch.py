"""PyTorch checkpoints in: `torch.save` zip files (single, in a model directory, sharded with an
index) are read in place through a restricted unpickler; merging them gives exactly what merging
the same tensors as safetensors gives. A pickle that tries to run code is refused, and it does
not run."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import weightweave as ww

from conftest import load, make_state


def save_both(root, sd, name):
    """The same tensors as a .bin and as a .safetensors file."""
    torch.save(sd, root / f"{name}.bin")
    save_file(sd, str(root / f"{name}.safetensors"))
    return root / f"{name}.bin", root / f"{name}.safetensors"


@pytest.mark.parametrize(("method", "mode"), [("ties", "weave"), ("task_arithmetic", "merge"), ("dare", "weave"),
                                              ("breadcrumbs", "merge"), ("pcb", "weave")])  # fmt: skip
def test_bin_inputs_merge_exactly_like_safetensors(tmp_path, method, mode):
    base, models = make_state(11)
    pairs = [save_both(tmp_path, sd, f"m{i}") for i, sd in enumerate([base, *models])]
    fn = ww.weave if mode == "weave" else ww.merge
    fn(pairs[0][0], [p[0] for p in pairs[1:]], tmp_path / "from_bin.safetensors", method=method)
    fn(pairs[0][1], [p[1] for p in pairs[1:]], tmp_path / "from_st.safetensors", method=method)
    assert (tmp_path / "from_bin.safetensors").read_bytes().split(b'"weightweave.recipe"')[1].count(b".bin") > 0
    a, b = load(tmp_path / "from_bin.safetensors"), load(tmp_path / "from_st.safetensors")
    def raw(t):
        return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t

    for k in b:
        assert torch.equal(raw(a[k]), raw(b[k])), k


def test_model_state_dicts_parameters_and_tied_weights(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    sd = model.state_dict()  # an OrderedDict with _metadata
    sd["tied"] = sd["0.weight"]  # shares the storage
    torch.save(sd, tmp_path / "a.pt")
    torch.save({k: torch.nn.Parameter(v.clone()) for k, v in sd.items()}, tmp_path / "b.pth")
    info = ww.inspect(tmp_path / "a.pt")
    assert sorted(t["name"] for t in info["tensors"]) == sorted(sd)
    out = tmp_path / "o.safetensors"
    ww.merge(tmp_path / "a.pt", [tmp_path / "b.pth"], out, method="task_arithmetic", lam=1.0)
    got = load(out)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def test_model_directories_single_and_sharded(tmp_path):
    base, models = make_state(12)
    single = tmp_path / "single"
    single.mkdir()
    torch.save(base, single / "pytorch_model.bin")
    (single / "config.json").write_text('{"model_type": "x"}')
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(base)
    wm = {}
    for k, group in enumerate([names[:4], names[4:]]):
        f = f"pytorch_model-{k + 1:05d}-of-00002.bin"
        torch.save({n: base[n] for n in group}, sharded / f)
        wm.update({n: f for n in group})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    ft = tmp_path / "ft.bin"
    torch.save(models[0], ft)
    for b in (single, sharded):
        out = tmp_path / f"out-{b.name}"
        ww.merge(b, [ft], out, method="ties")
        assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()
    assert (tmp_path / "out-single" / "config.json").exists()
    assert not list((tmp_path / "out-single").glob("*.bin"))  # the base's .bin is never copied


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": Evil(marker)}, tmp_path / "evil.bin")
    base = tmp_path / "base.bin"
    torch.save({"w": torch.zeros(2), "x": torch.zeros(1)}, base)
    with pytest.raises(ww.HeaderError, match=r"evil.bin: .*refers to '(posix|os)\.system'.*refusing to load it"):
        ww.merge(base, [tmp_path / "evil.bin"], tmp_path / "o.safetensors", method="ties")
    assert not marker.exists()


def test_unsupported_pytorch_files_say_why(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(ww.HeaderError, match="legacy .* re-save it"):
        ww.inspect(tmp_path / "legacy.bin")
    torch.save({"w": torch.arange(6.0).reshape(2, 3).T}, tmp_path / "strided.bin")
    with pytest.raises(ww.HeaderError, match="'w': is not contiguous"):
        ww.inspect(tmp_path / "strided.bin")
    torch.save({"epoch": 3, "optimizer": {"w": torch.zeros(2)}}, tmp_path / "train.pt")
    with pytest.raises(ww.HeaderError, match=r"training checkpoint \(entries: epoch, optimizer\), and none of its "
                                             r"entries 'state_dict', 'model', 'module' is a dict of tensors or a "
                                             r"module; save the model's state_dict\(\) instead"):  # fmt: skip
        ww.inspect(tmp_path / "train.pt")


def _training_checkpoint(sd: dict, entry: str, step: int) -> dict:
    """A checkpoint as open_clip/timm/Lightning scripts save one: the weights under `entry`, beside
    an epoch, a name, floats and bools, and an optimizer whose state holds tensors of its own."""
    moments = {i: {"exp_avg": torch.full_like(v, 7.0), "step": torch.tensor(float(step))}
               for i, v in enumerate(sd.values())}
    return {"epoch": step, "name": "run-a", "lr": 1e-4, "ema": False,
            "args": argparse.Namespace(model="vit", epochs=3, aug=[1, 2]),  # timm's: an object, left unread
            entry: sd, "optimizer": {"state": moments,
                                     "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "amsgrad": False,
                                                       "params": list(range(len(sd)))}]}}  # fmt: skip


@pytest.mark.parametrize("entry", ["state_dict", "model", "module"])
def test_training_checkpoints_merge_their_state_dict_entry(tmp_path, entry):
    g = torch.Generator().manual_seed(3)
    sds = [{"enc.w": torch.randn(8, 6, generator=g), "enc.b": torch.randn(6, generator=g)} for _ in range(3)]
    for i, sd in enumerate(sds):
        torch.save(_training_checkpoint(sd, entry, i), tmp_path / f"epoch_{i}.pt")
        save_file(sd, tmp_path / f"plain{i}.safetensors")
    assert sorted(t["name"] for t in ww.inspect(tmp_path / "epoch_0.pt")["tensors"]) == ["enc.b", "enc.w"]
    ww.merge(tmp_path / "epoch_0.pt", [tmp_path / "epoch_1.pt", tmp_path / "epoch_2.pt"], tmp_path / "a.safetensors",
             method="ties", density=0.5)  # fmt: skip
    ww.merge(tmp_path / "plain0.safetensors", [tmp_path / "plain1.safetensors", tmp_path / "plain2.safetensors"],
             tmp_path / "b.safetensors", method="ties", density=0.5)  # fmt: skip
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The hand reference: TIES at density 0.5 keeps each task's larger half, so the merge moves the base.
    assert not torch.equal(a["enc.w"], sds[0]["enc.w"])


def test_a_training_checkpoints_state_dict_entry_comes_first(tmp_path):
    torch.save({"epoch": 1, "model": {"x": torch.zeros(2)}, "state_dict": {"w": torch.ones(3)}}, tmp_path / "c.pt")
    assert [t["name"] for t in ww.inspect(tmp_path / "c.pt")["tensors"]] == ["w"]
    # A dict whose values are all tensors is the state dict itself, whatever its keys.
    torch.save({"model": torch.ones(2), "state_dict": torch.zeros(1)}, tmp_path / "d.pt")
    assert sorted(t["name"] for t in ww.inspect(tmp_path / "d.pt")["tensors"]) == ["model", "state_dict"]
    # An entry holding something other than tensors is not taken.
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(3), "n": 3}}, tmp_path / "e.pt")
    with pytest.raises(ww.HeaderError, match="none of its entries"):
        ww.inspect(tmp_path / "e.pt")


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.register_buffer("mask", torch.ones(6), persistent=False)
        self.register_buffer("kept", torch.arange(3.0))
        self.register_parameter("unused", None)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.act = torch.nn.GELU()


class _Encoder(torch.nn.Module):
    """As the task-vector papers save their checkpoints (torch.save(model)): modules nested in a
    ModuleList, tied weights, buffers, and attributes that are no tensors at all."""

    def __init__(self, marker=None):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])
        self.emb = torch.nn.Embedding(10, 6)
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight
        self.cfg = {"dtype": torch.float32, "size": (3, 224), "device": torch.device("cpu")}
        self.cache_dir = "/nowhere"
        self.hostile = Evil(marker) if marker else None  # an attribute the reader never needs


def test_pickled_modules_merge_as_their_state_dicts(tmp_path):
    marker = tmp_path / "pwned"
    torch.manual_seed(0)
    mods = [_Encoder(marker) for _ in range(3)]
    for i, m in enumerate(mods):
        torch.save(m, tmp_path / f"m{i}.pt")
        save_file({k: v.clone() for k, v in m.state_dict().items()}, tmp_path / f"s{i}.safetensors")
    sd = mods[0].state_dict()
    names = [t["name"] for t in ww.inspect(tmp_path / "m0.pt")["tensors"]]
    assert sorted(names) == sorted(sd)  # the non-persistent buffer and the None parameter left out
    assert "blocks.1.bn.num_batches_tracked" in names and "head.weight" in names
    ww.merge(tmp_path / "m0.pt", [tmp_path / "m1.pt", tmp_path / "m2.pt"], tmp_path / "a.safetensors", method="ties")
    ww.merge(tmp_path / "s0.safetensors", [tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"],
             tmp_path / "b.safetensors", method="ties")  # fmt: skip
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not marker.exists()
    # The module inside a training checkpoint's 'model' entry reads the same way.
    torch.save({"epoch": 4, "model": mods[1]}, tmp_path / "ck.pt")
    assert sorted(t["name"] for t in ww.inspect(tmp_path / "ck.pt")["tensors"]) == sorted(sd)


def test_a_pickled_transformers_model_is_named_as_its_state_dict(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)  # fmt: skip
    m = transformers.LlamaForCausalLM(cfg)
    torch.save(m, tmp_path / "llama.pt")
    sd = m.state_dict()
    info = {t["name"]: t["shape"] for t in ww.inspect(tmp_path / "llama.pt")["tensors"]}
    assert info == {k: list(v.shape) for k, v in sd.items()}


def test_pickled_modules_that_need_code_are_refused(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    m[0]._state_dict_hooks[0] = torch.nn.Identity  # a hook that pickles (a lambda would not)
    torch.save(m, tmp_path / "hook.pt")
    with pytest.raises(ww.HeaderError, match=r"module '0' \(torch.nn.modules.linear.Linear\) has _state_dict_hooks, "
                                             r"which change its state dict by running code"):  # fmt: skip
        ww.inspect(tmp_path / "hook.pt")
    marker = tmp_path / "pwned"
    torch.save(Evil(marker), tmp_path / "evil.pt")
    with pytest.raises(ww.HeaderError, match=r"refers to '(posix|os)\.system' to make its value, which would run code"):
        ww.inspect(tmp_path / "evil.pt")
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    m._modules["1"] = Evil(marker)
    torch.save(m, tmp_path / "child.pt")
    with pytest.raises(ww.HeaderError, match=r"module '1' \((posix|os)\.system\) is made by a call"):
        ww.inspect(tmp_path / "child.pt")
    assert not marker.exists()
    torch.save({"a": 1}, tmp_path / "plain.pt")
    with pytest.raises(ww.HeaderError, match="none of its entries"):
        ww.inspect(tmp_path / "plain.pt")
