"""Hub ids in recipes (`org/name`, `org/name@revision`), resolved through huggingface_hub's cache
as mergekit resolves them. The cache entries are built by hand (refs/, snapshots/ links into
blobs/), as huggingface_hub lays them out; HF_HUB_OFFLINE keeps every test from the network."""

from __future__ import annotations

import hashlib
import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import weightweave as ww

from conftest import load, make_state, write_models


def same(a, b) -> None:
    """Bit-equal tensors (the headers differ: they record the references as given)."""
    x, y = load(a), load(b)
    assert x.keys() == y.keys()
    for n in x:
        assert x[n].dtype == y[n].dtype and x[n].view(-1).view(torch.uint8).equal(y[n].view(-1).view(torch.uint8)), n


def cache_entry(hub, repo: str, commit: str, state: dict, ref: str = "main") -> None:
    """A snapshot of `repo` at `commit` holding model.safetensors and config.json, `ref` → commit."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    tmp = root / "blobs" / "incoming"
    save_file(state, str(tmp))
    for name, data in (("model.safetensors", tmp.read_bytes()), ("config.json", json.dumps({"model_type": "x"}))):
        raw = data if isinstance(data, bytes) else data.encode()
        blob = hashlib.sha256(raw).hexdigest()
        (root / "blobs" / blob).write_bytes(raw)
        os.symlink(f"../../blobs/{blob}", snap / name)
    tmp.unlink()
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)


COMMITS = ["a" * 40, "b" * 40, "c" * 40, "d" * 40]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    base, models = make_state(8)
    base = {n: t.float() if t.is_floating_point() else t for n, t in base.items()}
    models = [{n: t.float() if t.is_floating_point() else t for n, t in m.items()} for m in models]
    cache = tmp_path / "hf"
    cache_entry(cache, "org/base", COMMITS[0], base)
    for i, m in enumerate(models):
        cache_entry(cache, f"org/ft{i}", COMMITS[i + 1], m)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    bp, mps = write_models(tmp_path / "local", base, models)
    return cache, base, models, bp, mps


def recipe(tmp_path, base: str, models: list[str]) -> str:
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    for m, w in zip(models, (1.0, 0.5, 0.3), strict=True):
        lines += [f"  - model: {m}", f"    parameters: {{weight: {w}, density: 0.5}}"]
    lines += ["dtype: float32"]
    p = tmp_path / f"r{len(list(tmp_path.glob('r*.yml')))}.yml"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_hub_ids_merge_as_the_same_files_on_disk(hub, tmp_path):
    _, _, _, bp, mps = hub
    ww.run(recipe(tmp_path, "org/base", ["org/ft0", "org/ft1@main", f"org/ft2@{COMMITS[3]}"]), tmp_path / "a")
    ww.run(recipe(tmp_path, str(bp), [str(m) for m in mps]), tmp_path / "b")
    same(tmp_path / "a", tmp_path / "b")


def test_a_revision_picks_its_snapshot(hub, tmp_path):
    cache, base, models, bp, mps = hub
    # org/ft0@v2 is another commit with other weights.
    other = {n: (t * 2 if t.is_floating_point() else t) for n, t in models[0].items()}
    cache_entry(cache, "org/ft0", "e" * 40, other, ref="v2")
    ww.run(recipe(tmp_path, "org/base", ["org/ft0@v2", "org/ft1", "org/ft2"]), tmp_path / "a")
    p = write_models(tmp_path / "v2", base, [other])[1][0]
    ww.run(recipe(tmp_path, str(bp), [str(p), str(mps[1]), str(mps[2])]), tmp_path / "b")
    same(tmp_path / "a", tmp_path / "b")


def test_a_local_path_wins_over_a_hub_id(hub, tmp_path):
    _, base, models, bp, mps = hub
    # ./org/ft0 exists here: it is read, not the cache's org/ft0 (mergekit's order).
    local = tmp_path / "org" / "ft0"
    local.mkdir(parents=True)
    twice = {n: (t * 2 if t.is_floating_point() else t) for n, t in models[0].items()}
    save_file(twice, str(local / "model.safetensors"))
    ww.run(recipe(tmp_path, "org/base", ["org/ft0", "org/ft1", "org/ft2"]), tmp_path / "a")
    p = write_models(tmp_path / "x", base, [twice])[1][0]
    ww.run(recipe(tmp_path, str(bp), [str(p), str(mps[1]), str(mps[2])]), tmp_path / "b")
    same(tmp_path / "a", tmp_path / "b")


def test_missing_hub_ids_are_one_clear_error_offline(hub, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ww.RecipeError, match=r"models\[1\].model.*'org/nope' is a hub id not in the Hugging Face "
                                             r"cache.*HF_HUB_OFFLINE"):  # fmt: skip
        ww.run(recipe(tmp_path, "org/base", ["org/ft0", "org/nope", "org/ft2"]), out)
    # A revision cannot steer the refs/ lookup out of the cache.
    for rev in ("../../../../etc", "main/../../x", "/abs"):
        with pytest.raises(ww.RecipeError, match="is not a revision name"):
            ww.run(recipe(tmp_path, "org/base", [f"org/ft0@{rev}", "org/ft1", "org/ft2"]), out)
    with pytest.raises(ww.RecipeError, match="more than one '@'"):
        ww.run(recipe(tmp_path, "org/base", ["org/ft0@a@b", "org/ft1", "org/ft2"]), out)
    with pytest.raises(ww.RecipeError, match="org/ft0@v9"):  # a revision the cache does not hold
        ww.run(recipe(tmp_path, "org/base", ["org/ft0@v9", "org/ft1", "org/ft2"]), out)
    assert not out.exists()


def test_own_schema_takes_hub_ids_too(hub, tmp_path):
    _, _, _, bp, mps = hub
    p = tmp_path / "own.yml"
    p.write_text(textwrap.dedent("""\
        base: org/base
        models: [org/ft0, org/ft1, org/ft2]
        method: task_arithmetic
        lam: 0.5
    """))
    ww.run(str(p), tmp_path / "a")
    ww.merge(bp, mps, tmp_path / "b", method="task_arithmetic", lam=0.5)
    same(tmp_path / "a", tmp_path / "b")


def test_model_plus_lora_is_the_adapter_on_the_base(tmp_path, monkeypatch):
    # mergekit's `model+lora`: the adapter applied to the model — here the base, which is how
    # weightweave reads a PEFT adapter (θ_base + ΔW); checked against the adapter given directly.
    pytest.importorskip("peft", reason="PEFT writes the adapter (.ci/run installs it)")
    from test_hostile_lora import make_adapter

    from conftest import tiny_llama

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    tiny_llama().save_pretrained(tmp_path / "base")
    a = make_adapter(tiny_llama, tmp_path, "lora_a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_adapter(tiny_llama, tmp_path, "lora_b", 2, r=2, lora_alpha=4, target_modules=["up_proj"])
    text = ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
            "  - model: base+lora_a\n    parameters: {weight: 1.0}\n"
            "  - model: base+lora_b\n    parameters: {weight: 0.5}\ndtype: float32\n")  # fmt: skip
    (tmp_path / "r.yml").write_text(text)
    ww.run("r.yml", tmp_path / "x")
    ww.merge(tmp_path / "base", [a, b], tmp_path / "y", method="task_arithmetic", compat="mergekit", lam=1.0,
             weights=[1.0, 0.5])  # fmt: skip
    same(tmp_path / "x", tmp_path / "y")
    # A LoRA applies to a model, not to another adapter.
    (tmp_path / "r2.yml").write_text(text.replace("base+lora_b", "lora_a+lora_b"))
    with pytest.raises(ww.RecipeError, match="is itself a LoRA adapter"):
        ww.run("r2.yml", tmp_path / "z")
    (tmp_path / "r3.yml").write_text(text.replace("base+lora_b", "base+base"))
    with pytest.raises(ww.RecipeError, match="not a PEFT LoRA adapter"):
        ww.run("r3.yml", tmp_path / "z")


def test_a_download_asks_only_for_configs_and_weights(tmp_path, monkeypatch):
    # Online and not cached: huggingface_hub is asked for json, tokenizer files and the weights of
    # the repository's format (never code); stood in for here, as nothing can be downloaded.
    import huggingface_hub

    from weightweave import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    calls = []

    def snapshot(repo, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None):
        calls.append((repo, revision, local_files_only, allow_patterns))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(tmp_path / "snap")

    files = {"org/st": ["config.json", "model.safetensors", "modeling_x.py"], "org/bin": ["pytorch_model.bin"]}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: files[repo])
    assert hub.resolve("org/st@v1", "m") == str(tmp_path / "snap")
    assert hub.resolve("org/bin", "m") == str(tmp_path / "snap")
    downloads = [c for c in calls if not c[2]]
    tok = ["*.json", "tokenizer.model", "*.jinja", "merges.txt", "vocab.txt"]
    assert downloads == [("org/st", "v1", False, tok + ["*.safetensors"]), ("org/bin", None, False, tok + ["*.bin"])]

    def failing(repo, revision=None):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", failing)
    with pytest.raises(ww.ParamError, match="'org/st' is a hub id.*downloading it failed: Name or service"):
        hub.resolve("org/st", "m")
