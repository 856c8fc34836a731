"""Tensors the base and the models do not share (classification heads of other sizes, a tensor
one side lacks): listed all at once with the option that copies the base's, never guessed; with
``keep_base`` the output takes the base's, and the run, the report and the metadata say which."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open

import weightweave as ww
from weightweave.cli import main

from conftest import load

transformers = pytest.importorskip("transformers")


def _bert(root, labels: int, seed: int, like=None):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=labels)  # fmt: skip
    torch.manual_seed(seed)
    m = transformers.BertForSequenceClassification(cfg)
    if like is not None:  # a fine-tune of `like`'s encoder: its weights moved a little
        with torch.no_grad():
            for p, q in zip(m.bert.parameters(), like.bert.parameters(), strict=True):
                p.copy_(q + 0.01 * torch.randn_like(q))
    m.save_pretrained(root)
    return m


@pytest.fixture
def heads(tmp_path):
    base = _bert(tmp_path / "base", 2, 0)
    fts = [_bert(tmp_path / f"ft{i}", n, i + 1, like=base) for i, n in enumerate((3, 5))]
    return tmp_path, base, fts


def test_unshared_heads_are_listed_with_a_pattern_that_works(heads):
    root, base, fts = heads
    with pytest.raises(ww.MismatchError) as e:
        ww.merge(root / "base", [root / "ft0", root / "ft1"], root / "out", method="task_arithmetic")
    msg = str(e.value)
    assert "2 tensor(s) are not shared by the base and every model" in msg
    assert "'classifier.weight' ([3, 16] in" in msg and "[5, 16] in" in msg and "None is guessed" in msg
    pattern = re.search(r"keep_base='([^']+)'", msg).group(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = ww.merge(root / "base", [root / "ft0", root / "ft1"], root / "out", method="task_arithmetic", lam=0.5,
                       keep_base=pattern)  # fmt: skip
    assert rep.kept == ["classifier.bias", "classifier.weight"] and rep.left_out == []
    assert any(isinstance(w.message, ww.KeptBaseWarning) and "classifier.bias, classifier.weight" in str(w.message)
               for w in caught)  # fmt: skip
    out = load(root / "out")
    b = base.state_dict()
    for name, v in b.items():
        if name.startswith("classifier."):
            assert torch.equal(out[name], v)  # copied, not merged
        elif v.is_floating_point():  # θ_pre + λ Σ τ_t, written literally
            want = v + 0.5 * sum(ft.state_dict()[name] - v for ft in fts)
            torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6)
    # transformers loads it as the base's model (2 labels), nothing missing or unexpected.
    m, info = transformers.BertForSequenceClassification.from_pretrained(root / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and m.config.num_labels == 2
    m(input_ids=torch.tensor([[1, 2, 3]]))
    with safe_open(str(root / "out" / "model.safetensors"), "pt") as f:
        kept = json.loads(f.metadata()["weightweave.recipe"])["keep_base"]
    assert kept == {"pattern": pattern, "copied": ["classifier.bias", "classifier.weight"], "left_out": []}


def test_a_models_own_tensors_are_left_out_and_arrays_take_it_too(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"enc": torch.randn(4, 4, generator=g), "head": torch.randn(2, 4, generator=g)}
    fts = [{"enc": base["enc"] + 0.1, "head": torch.randn(3, 4, generator=g), "aux.scale": torch.ones(1)},
           {"enc": base["enc"] - 0.3, "head": torch.randn(2, 4, generator=g)}]  # fmt: skip
    with pytest.raises(ww.MismatchError, match=r"'aux.scale' \(only in model 1\)|is not in the base"):
        ww.merge_arrays(base, fts, method="task_arithmetic")
    out = ww.merge_arrays(base, fts, method="task_arithmetic", lam=1.0, keep_base=r"^(head|aux\.)")
    assert sorted(out) == ["enc", "head"] and torch.equal(out["head"], base["head"])
    torch.testing.assert_close(out["enc"], base["enc"] - 0.2, rtol=0, atol=1e-6)


def test_keep_base_is_checked(tmp_path, heads, capsys):
    root, _, _ = heads
    with pytest.raises(ww.ParamError, match="keep_base"):
        ww.merge(root / "base", [root / "ft0"], root / "o", method="task_arithmetic", keep_base="(")
    with pytest.raises(ww.ParamError, match="keep_base must be a regular expression"):
        ww.merge(root / "base", [root / "ft0"], root / "o", method="task_arithmetic", keep_base=3)  # type: ignore[arg-type]
    assert not (root / "o").exists()
    # The CLI takes it and says what it copied.
    code = main(["merge", str(root / "base"), str(root / "ft0"), str(root / "ft1"), "-o", str(root / "cli"),
                 "--method", "ties", "--keep-base", r"^classifier\."])  # fmt: skip
    assert code == 0
    assert "keep_base copied 2 tensor(s) from the base: classifier.bias, classifier.weight" in capsys.readouterr().err
