"""mergekit configs that build a tokenizer (``tokenizer_source``, the ``tokenizer`` block,
``chat_template``): the tokenizer as mergekit builds it, the vocabulary rows realigned as mergekit's
``PermutedVocabulary`` does (``reference_mergekit.permuted_vocabulary``, a token-by-token
transcription), the merge of the realigned models, and outputs transformers loads."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightweave as ww
from weightweave import reference_mergekit as rmk
from weightweave.recipe import RecipeWarning

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

EMBEDS = ("model.embed_tokens.weight", "lm_head.weight")
WORDS = [f"w{i}" for i in range(40)]
# name → (words, added special tokens)
LAYOUT = {"base": (WORDS, ()), "ft0": (WORDS, ()), "ft1": (WORDS, ("<|im_start|>", "<|im_end|>")),
          "ft2": (WORDS[:30] + [f"x{i}" for i in range(8)], ("<|im_start|>",))}  # fmt: skip


def _tokenizer(words, added):
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    f = transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    if added:
        f.add_tokens(list(added), special_tokens=True)
    return f


def _models(root, dtype):
    torch.manual_seed(0)
    for k, (words, added) in LAYOUT.items():
        t = _tokenizer(words, added)
        cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=len(t), tie_word_embeddings=False)  # fmt: skip
        transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(root / k)
        t.save_pretrained(root / k)
    return root


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    return _models(tmp_path_factory.mktemp("tok32"), torch.float32)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return _models(tmp_path_factory.mktemp("tok16"), torch.bfloat16)


def _run(root, body, out="out"):
    cfg = root / f"{out}.yml"
    cfg.write_text(textwrap.dedent(body).replace("ROOT", str(root)))
    ww.run(str(cfg), str(root / out), overwrite=True)
    return root / out


def _vocab(path):
    return transformers.AutoTokenizer.from_pretrained(path).get_vocab()


def _expected(root, out, order, base, tokens=None, pad=None, dtype=None):
    """Per model, its vocabulary tensors realigned by the reference to the output's tokenizer."""
    vocab = _vocab(out)
    perms = {}
    for m in order:
        mv = _vocab(root / m)
        perms[m] = {i: mv.get(t, -1) for t, i in vocab.items()}
    sds = {m: load_file(root / m / "model.safetensors") for m in order}
    if dtype is not None:
        sds = {m: {k: v.to(dtype) for k, v in sd.items()} for m, sd in sds.items()}
    res = {m: dict(sds[m]) for m in order}
    for name in EMBEDS:
        got = rmk.permuted_vocabulary({m: sds[m][name] for m in order}, perms, vocab, tokens, base, pad)
        for m in order:
            res[m][name] = got[m]
    return res


def _merge_reference(root, realigned, body, out):
    """The merge of models whose vocabulary was realigned by the reference: the same config
    without a tokenizer, on those models written out."""
    for m, sd in realigned.items():
        d = root / f"ref_{out}" / m
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, d / "model.safetensors")
        cfg = json.loads((root / m / "config.json").read_text())
        cfg["vocab_size"] = next(iter(v for k, v in sd.items() if k == EMBEDS[0])).shape[0]
        (d / "config.json").write_text(json.dumps(cfg))
    text = textwrap.dedent(body)
    plain = text[: text.index("tokenizer")]
    return load_file(_run(root, plain.replace("ROOT/", f"ROOT/ref_{out}/"), f"ref_{out}_out") / "model.safetensors")


UNION = """\
    merge_method: task_arithmetic
    base_model: ROOT/base
    models:
      - model: ROOT/ft1
        parameters: {weight: 0.6}
      - model: ROOT/ft2
        parameters: {weight: 0.4}
    dtype: float32
    tokenizer_source: union
"""


def test_a_union_tokenizer_and_its_rows_are_mergekits(f32):
    out = _run(f32, UNION, "union")
    vocab, base_vocab = _vocab(out), _vocab(f32 / "base")
    # The base's tokens keep their ids; every model's token is there once.
    assert all(vocab[t] == i for t, i in base_vocab.items())
    assert set(vocab) == set().union(*(_vocab(f32 / m) for m in LAYOUT))
    # mergekit's order for a tensor: the config's models, the base last.
    realigned = _expected(f32, out, ["ft1", "ft2", "base"], "base")
    want = _merge_reference(f32, realigned, UNION, "union")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == len(vocab) == got[EMBEDS[0]].shape[0]
    # transformers loads the model and the tokenizer, and the new tokens have their rows.
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w1 <|im_start|> x3 <|im_end|>")["input_ids"]
    assert ids == [vocab["w1"], vocab["<|im_start|>"], vocab["x3"], vocab["<|im_end|>"]]
    assert model(torch.tensor([ids])).logits.shape == (1, 4, len(vocab))


TOKENS = """\
    merge_method: ties
    base_model: ROOT/base
    models:
      - model: ROOT/ft1
        parameters: {weight: 0.6, density: 0.5}
      - model: ROOT/ft2
        parameters: {weight: 0.4, density: 0.7}
    dtype: bfloat16
    parameters: {normalize: true}
    tokenizer:
      source: union
      pad_to_multiple_of: 8
      tokens:
        "<|im_end|>": {source: ROOT/ft1, force: true}
        "w5": {source: {kind: zero}, force: true}
        "<new>": {source: {kind: model_token, model: ROOT/ft2, token_id: 40}}
"""


def test_a_tokens_block_forced_zero_and_model_token_rows_and_padding_in_bf16(bf16):
    out = _run(bf16, TOKENS, "tokens")
    vocab = _vocab(out)
    assert "<new>" in vocab and len(vocab) == 54
    tokens = {"<|im_end|>": {"source": "ft1", "force": True}, "w5": {"source": {"kind": "zero"}, "force": True},
              "<new>": {"source": {"kind": "model_token", "model": "ft2", "token_id": 40}}}  # fmt: skip
    realigned = _expected(bf16, out, ["ft1", "ft2", "base"], "base", tokens, 8, torch.bfloat16)
    got = load_file(out / "model.safetensors")
    assert got[EMBEDS[0]].shape[0] == 56 and json.loads((out / "config.json").read_text())["vocab_size"] == 56
    # The forced zero row stays zero in every realigned model, so its merge is zero too.
    assert realigned["ft2"][EMBEDS[0]][vocab["w5"]].abs().max() == 0
    want = _merge_reference(bf16, realigned, TOKENS, "tokens")
    for k in EMBEDS:
        assert torch.equal(got[k], want[k]), k


def test_a_tokenizer_from_a_model_takes_its_vocabulary(f32):
    body = UNION.replace("tokenizer_source: union", "tokenizer_source: ROOT/ft2")
    out = _run(f32, body, "from_ft2")
    assert _vocab(out) == _vocab(f32 / "ft2")
    realigned = _expected(f32, out, ["ft1", "ft2", "base"], "base")
    want = _merge_reference(f32, realigned, body, "from_ft2")
    got = load_file(out / "model.safetensors")
    for k in EMBEDS:
        assert torch.equal(got[k], want[k]), k


def test_the_same_tokenizer_everywhere_realigns_nothing(f32):
    body = UNION.replace("ROOT/ft2", "ROOT/ft0").replace("ROOT/ft1", "ROOT/base").replace("union", "base")
    plain = body.replace("tokenizer_source: base\n", "")
    got = load_file(_run(f32, body, "same") / "model.safetensors")
    want = load_file(_run(f32, plain, "same_plain") / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert _vocab(f32 / "same") == _vocab(f32 / "base")


def test_nothing_is_left_beside_the_output(f32, tmp_path):
    body = UNION.replace("ROOT/ft1", "ROOT/missing")
    with pytest.raises(ww.RecipeError, match="missing"):
        _run(f32, body, "never")
    # A run that fails in the merge, after the realigned rows were written.
    bad = tmp_path / "ft1"
    bad.mkdir()
    for f in os.listdir(f32 / "ft1"):
        (bad / f).write_bytes((f32 / "ft1" / f).read_bytes())
    sd = load_file(bad / "model.safetensors")
    sd[EMBEDS[0]][7, 3] = float("nan")
    save_file(sd, bad / "model.safetensors")
    body = UNION.replace("ROOT/ft1", str(bad))
    with pytest.raises(ww.WeaveError) as e:
        _run(f32, body, "nan")
    msg = str(e.value)
    assert str(bad) in msg and "realigned" in msg and ".weightweave-" not in msg
    assert not [n for n in os.listdir(f32) if n.startswith(".weightweave-")]
    assert not (f32 / "nan").exists()


CONVS = [[{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"},
          {"role": "user", "content": "q"}]]
# How mergekit 0.1.5's named templates render CONVS[0] (with a generation prompt).
RENDERED = {
    "chatml": "<|im_start|>user\n hi <|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n<|start_header_id|>assistant"
              "<|end_header_id|>\n\nyo<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>\n"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST]  hi  [/INST] yo</s> [INST] q [/INST]",
    "alpaca": "\n\n### Instruction:\nhi\n\n### Response:\nyo\n\n### Instruction:\nq### Response:\n",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_a_named_chat_template_renders_as_mergekits(f32, name):
    out = _run(f32, UNION + f"    chat_template: {name}\n", f"tmpl_{name}")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template(CONVS[0], tokenize=False, add_generation_prompt=True) == RENDERED[name]


def test_a_chat_template_without_a_tokenizer_source_resaves_the_bases_tokenizer(f32):
    """mergekit 0.1.5 (merge.py, _copy_tokenizer): with a template it does not copy the files but
    re-saves the base's tokenizer with the template; the weights and vocabulary are untouched."""
    body = UNION.replace("tokenizer_source: union\n", "chat_template: \"{{ messages[0]['content'] }}!\"\n")
    body = body.replace("ROOT/ft2", "ROOT/ft0").replace("ROOT/ft1", "ROOT/base")
    out = _run(f32, body, "resaved")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == _vocab(f32 / "base")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x!"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(_vocab(f32 / "base"))


def test_auto_takes_the_template_most_models_have(f32, tmp_path):
    for m, t in (("ft1", "{{ 'A' }}"), ("ft2", "{{ 'B' }}"), ("base", "{{ 'B' }}"), ("ft0", "{{ 'A' }}")):
        d = tmp_path / m
        d.mkdir()
        for f in os.listdir(f32 / m):
            (d / f).write_bytes((f32 / m / f).read_bytes())
        tok = transformers.AutoTokenizer.from_pretrained(d)
        tok.chat_template = t
        tok.save_pretrained(d)
    body = UNION.replace("ROOT", str(tmp_path)) + "    chat_template: auto\n"
    out = _run(tmp_path, body, "auto")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "B"


@pytest.mark.parametrize(("extra", "match"), [
    ("    chat_template: nosuchname\n", "neither a template nor a name"),
    ("    chat_template: [1]\n", "chat_template must be a string"),
    ("    tokenizer: {source: union, pad_to_multiple_of: true}\n", "pad_to_multiple_of"),
    ("    tokenizer: {tokens: {a: {source: {kind: model_token, model: ROOT/ft1}}}}\n", "token_id or token"),
    ("    tokenizer: {tokens: {a: {source: {kind: other}}}}\n", "kind must be"),
    ("    tokenizer: {tokens: {a: {source: {kind: model_token, model: ROOT/ft1, token_id: 1000000000000000000000}}}}\n",
     "token_id must be an integer"),
    ("    tokenizer: {tokens: {a: {source: {kind: model_token, model: ROOT/ft1, token_id: 4000}}}}\n",
     "token id 4000 is outside"),
])  # fmt: skip
def test_bad_tokenizer_settings_are_refused(f32, extra, match):
    with pytest.raises(ww.RecipeError, match=match):
        _run(f32, UNION.replace("    tokenizer_source: union\n", "") + extra, "bad")
    assert not (f32 / "bad").exists()


def test_too_many_tokens_are_refused_before_any_work(f32, tmp_path):
    toks = "".join(f"      t{i}: {{}}\n" for i in range((1 << 16) + 1))
    cfg = tmp_path / "many.yml"
    cfg.write_text(textwrap.dedent(UNION).replace("ROOT", str(f32)).replace("tokenizer_source: union\n", "")
                   + "tokenizer:\n  tokens:\n" + toks.replace("      ", "    "))  # fmt: skip
    with pytest.raises(ww.RecipeError, match="at most 65536"):
        ww.run(str(cfg), str(tmp_path / "o"))


def test_a_killed_runs_realigned_rows_are_removed_by_the_next_run(f32):
    """A run killed while it built a tokenizer leaves its temporary directory and lock (nothing
    holds the lock any more): the next run beside that output removes them."""
    from weightweave.vocabulary import _key

    key = _key(b"killed/tokenizer")
    left = f32 / f".weightweave-{key}-0123abcd.tmp"
    left.mkdir()
    (left / "0.safetensors").write_bytes(b"partial")
    (f32 / f".weightweave-{key}.lock").write_text("pid 1")
    _run(f32, UNION, "killed")
    assert not left.exists() and not (f32 / f".weightweave-{key}.lock").exists()
    assert not [n for n in os.listdir(f32) if n.startswith(".weightweave-")]
    # A run for another output removes it too, once nothing holds its lock.
    left.mkdir()
    (f32 / f".weightweave-{key}.lock").write_text("pid 1")
    plain = UNION.replace("ROOT/ft2", "ROOT/ft0").replace("ROOT/ft1", "ROOT/base")
    _run(f32, plain.replace("    tokenizer_source: union\n", ""), "another")
    assert not left.exists() and not [n for n in os.listdir(f32) if n.startswith(".weightweave-")]


def test_a_tokenizer_file_linked_out_of_its_model_is_refused(f32, tmp_path):
    """The tokenizer is saved back into the output: a file linked out of the model directory
    (here a JSON file of secrets) is never loaded, so never copied."""
    d = tmp_path / "base"
    d.mkdir()
    for f in os.listdir(f32 / "base"):
        if f != "tokenizer_config.json":
            (d / f).write_bytes((f32 / "base" / f).read_bytes())
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({**json.loads((f32 / "base" / "tokenizer_config.json").read_text()),
                                  "api_key": "hunter2"}))  # fmt: skip
    (d / "tokenizer_config.json").symlink_to(secret)
    body = UNION.replace("ROOT/base", str(d))
    with pytest.raises(ww.RecipeError, match="a link out of its model directory"):
        _run(f32, body, "linked")
    assert not (f32 / "linked").exists()
    # A link inside the directory is fine.
    (d / "tokenizer_config.json").unlink()
    (d / "inner.json").write_text((f32 / "base" / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").symlink_to(d / "inner.json")
    out = _run(f32, body, "linked_in")
    assert "hunter2" not in "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())


STACKED = """\
merge_method: passthrough
dtype: float32
slices:
  - sources: [{model: ROOT/base, layer_range: [0, 2]}]
  - sources: [{model: ROOT/MODEL, layer_range: [0, 2]}]
"""


def test_a_tokenizer_with_slices_that_stack_layers(f32):
    """A frankenmerge with ``tokenizer_source`` and a chat template: the stacked model, its layer
    count and the built tokenizer, loaded by transformers. The rows stay (same vocabulary)."""
    plain = _run(f32, STACKED.replace("MODEL", "ft0"), "stack_plain")
    out = _run(f32, STACKED.replace("MODEL", "ft0") + "tokenizer_source: base\nchat_template: chatml\n", "stack_tok")
    got, want = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == _vocab(f32 / "base")
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4


def test_a_union_tokenizer_with_stacked_slices_realigns_each_tensor_over_its_slices_models(f32):
    """A frankenmerge of models with different vocabularies under ``tokenizer_source: union``: the
    embeddings come from the first slice's model (base), the head from the last slice's (ft2),
    each realigned over that slice's models alone, as mergekit's planner gathers them; a token
    those models lack has zero rows there, and the run says so."""
    body = STACKED.replace("MODEL", "ft2") + "tokenizer_source: union\n"
    with pytest.warns(RecipeWarning, match="are in none of the models it is merged from"):
        out = _run(f32, body, "stack_union")
    got = load_file(out / "model.safetensors")
    assert torch.equal(got[EMBEDS[0]], _expected(f32, out, ["base"], None)["base"][EMBEDS[0]])
    assert torch.equal(got[EMBEDS[1]], _expected(f32, out, ["ft2"], None)["ft2"][EMBEDS[1]])
    sds = {m: load_file(f32 / m / "model.safetensors") for m in ("base", "ft2")}
    for k, (m, i) in enumerate([("base", 0), ("base", 1), ("ft2", 0), ("ft2", 1)]):
        p = f"model.layers.{i}."
        for n, t in sds[m].items():
            if n.startswith(p):
                assert torch.equal(got[f"model.layers.{k}.{n[len(p):]}"], t), (k, n)
    vocab = _vocab(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab) == got[EMBEDS[0]].shape[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    ids = transformers.AutoTokenizer.from_pretrained(out)("w1 x3")["input_ids"]
    assert model(torch.tensor([ids])).logits.shape == (1, 2, len(vocab))
    assert not [p for p in os.listdir(f32) if p.startswith(".weightweave-")]
