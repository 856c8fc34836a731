"""sentence-transformers models: the module directories that hold weights (a `2_Dense` projection,
as `modules.json` lists them) are merged with the root's and written back where
SentenceTransformer loads them; checked with the package itself."""

from __future__ import annotations

import shutil

import pytest
import torch

import weightweave as ww

from conftest import load

# Needs an ecosystem's package, which .ci/run installs (`pytest -m 'not ecosystems'` leaves these out).
pytestmark = pytest.mark.ecosystems

st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")
try:  # sentence-transformers >= 6 moved its modules
    from sentence_transformers.sentence_transformer import modules as stm
except ImportError:  # pragma: no cover
    from sentence_transformers import models as stm


def _model(root, seed: int, like=None):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(seed)
    enc = root / "enc"
    transformers.BertModel(cfg).save_pretrained(enc)
    tok = transformers.BertTokenizerFast(vocab_file=None, tokenizer_object=_tokenizer())
    tok.save_pretrained(enc)
    word = stm.Transformer(str(enc))
    pool = stm.Pooling(16)
    dense = stm.Dense(16, 8, activation_function=torch.nn.Tanh())
    m = st.SentenceTransformer(modules=[word, pool, dense], device="cpu")
    if like is not None:  # a fine-tune: every weight moved a little from `like`'s
        with torch.no_grad():
            for p, q in zip(m.parameters(), like.parameters(), strict=True):
                p.copy_(q + 0.01 * torch.randn_like(q))
    m.save(str(root / "model"))
    return m


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "hello", "world"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t


def test_a_dense_module_is_merged_and_the_model_loads(tmp_path):
    base = _model(tmp_path / "b", 0)
    fts = [_model(tmp_path / f"f{i}", i + 1, like=base) for i in range(2)]
    assert (tmp_path / "b" / "model" / "2_Dense" / "model.safetensors").exists()
    rep = ww.merge(tmp_path / "b" / "model", [tmp_path / f"f{i}" / "model" for i in range(2)], tmp_path / "out",
                   method="task_arithmetic", lam=0.5)  # fmt: skip
    assert not rep.skipped  # the module's weights are merged, not skipped
    out = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    # θ_pre + λ Σ τ_t, written literally from each model's own parameters.
    for (name, got), b, *f in zip(out.named_parameters(), base.parameters(), *[ft.parameters() for ft in fts],
                                  strict=True):  # fmt: skip
        want = b + 0.5 * sum(x - b for x in f)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    dense = load(tmp_path / "out" / "2_Dense" / "model.safetensors")
    assert sorted(dense) == ["linear.bias", "linear.weight"]
    emb = out.encode(["hello world"], convert_to_tensor=True)
    assert emb.shape == (1, 8)
    # Written again over itself, and refused as one file (it has a module directory).
    ww.merge(tmp_path / "b" / "model", [tmp_path / "f0" / "model"], tmp_path / "out", method="task_arithmetic",
             overwrite=True)  # fmt: skip
    with pytest.raises(ww.OutputError, match=r"module directories \(2_Dense\): write it to a directory"):
        ww.merge(tmp_path / "b" / "model", [tmp_path / "f0" / "model"], tmp_path / "o.safetensors",
                 method="task_arithmetic")  # fmt: skip


def test_a_fine_tune_without_the_module_is_named(tmp_path):
    base = _model(tmp_path / "b", 0)
    _model(tmp_path / "f", 1, like=base)
    shutil.rmtree(tmp_path / "f" / "model" / "2_Dense")
    with pytest.raises(ww.MismatchError, match=r"tensor '2_Dense/linear.bias' of the base is missing.*"
                                               r"keep_base='\^\(2_Dense/"):
        ww.merge(tmp_path / "b" / "model", [tmp_path / "f" / "model"], tmp_path / "out", method="task_arithmetic")


def test_hostile_module_paths_are_refused(tmp_path):
    base = _model(tmp_path / "b", 0)
    del base
    (tmp_path / "b" / "model" / "modules.json").write_text('[{"idx": 0, "path": "../../etc"}]')
    with pytest.raises(ww.HeaderError, match="module path '../../etc' is not one directory name inside the model"):
        ww.inspect(tmp_path / "b" / "model")
