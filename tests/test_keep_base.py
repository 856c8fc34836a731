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


def test_a_prefix_that_differs_is_aligned_and_said(tmp_path):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.BertModel(cfg)  # bare encoder: embeddings.*, encoder.*, pooler.*
    base.save_pretrained(tmp_path / "base")
    fts = []
    for i in range(2):
        m = transformers.BertForSequenceClassification(cfg)  # bert.* and a head the base lacks
        with torch.no_grad():
            for p, q in zip(m.bert.parameters(), base.parameters(), strict=True):
                p.copy_(q + 0.01 * (i + 1) * torch.randn_like(q))
        m.save_pretrained(tmp_path / f"ft{i}")
        fts.append(m)
    paths = [tmp_path / "ft0", tmp_path / "ft1"]
    # The prefix is aligned; the head only the fine-tunes hold is still not guessed.
    with pytest.raises(ww.MismatchError, match=r"'classifier.bias' is not in the base.*keep_base='\^\(classifier.*"
                                               r"\(after aligning names: .*ft0: 'bert.' removed from 39 tensor names"):
        ww.merge(tmp_path / "base", paths, tmp_path / "out", method="task_arithmetic")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = ww.merge(tmp_path / "base", paths, tmp_path / "out", method="task_arithmetic", lam=1.0,
                       keep_base=r"^classifier\.")  # fmt: skip
    said = [str(w.message) for w in caught if isinstance(w.message, ww.AlignedNamesWarning)]
    assert len(said) == 2 and all("'bert.' removed from" in s for s in said)
    assert rep.left_out == ["classifier.bias", "classifier.weight"] and len(rep.aligned) == 2
    out = load(tmp_path / "out")
    b = base.state_dict()
    assert sorted(out) == sorted(b)  # the base's names
    for name, v in b.items():
        want = v + sum(ft.state_dict()["bert." + name] - v for ft in fts) if v.is_floating_point() else v
        torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6)
    m, info = transformers.BertModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_ddp_module_prefixes_are_removed(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    base = {"enc.w": torch.randn(4, 4, generator=g), "enc.b": torch.randn(4, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    for i in range(2):
        ft = {k: v + 0.1 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(ft, tmp_path / f"plain{i}.safetensors")
        save_file({"module." + k: v for k, v in ft.items()}, tmp_path / f"ddp{i}.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ww.merge(tmp_path / "base.safetensors", [tmp_path / "ddp0.safetensors", tmp_path / "ddp1.safetensors"],
                 tmp_path / "a.safetensors", method="ties", density=0.5)  # fmt: skip
    said = sorted(str(w.message) for w in caught if isinstance(w.message, ww.AlignedNamesWarning))
    assert [re.search(r"ddp\d.safetensors: 'module.' removed from 2 tensor names", s) is not None for s in said] == [
        True, True]
    ww.merge(tmp_path / "base.safetensors", [tmp_path / "plain0.safetensors", tmp_path / "plain1.safetensors"],
             tmp_path / "b.safetensors", method="ties", density=0.5)  # fmt: skip
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert len(json.loads(f.metadata()["weightweave.recipe"])["aligned_names"]) == 2
    # Arrays too: aligned, and said.
    ddp = [{"module." + k: v for k, v in load(tmp_path / f"plain{i}.safetensors").items()} for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ww.merge_arrays(base, ddp, method="ties", density=0.5)
    assert sum(isinstance(w.message, ww.AlignedNamesWarning) for w in caught) == 2
    assert all(torch.equal(out[k], a[k]) for k in a)


def test_vision_fine_tunes_of_a_whole_clip_model(tmp_path):
    """transformers 5 saves a CLIPVisionModel as embeddings.* (no vision_model.): aligned to a
    CLIPModel base; the text tower, projections and logit_scale the fine-tunes lack are listed with
    a pattern that, passed back, gives a CLIPModel with the vision tower merged."""
    tc = transformers.CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    vc = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(),
                                                          projection_dim=8))  # fmt: skip
    base.save_pretrained(tmp_path / "base")
    b = base.state_dict()
    fts = []
    for i in range(2):
        v = transformers.CLIPVisionModel(vc)
        with torch.no_grad():
            for n, p in v.named_parameters():
                p.copy_(b[n if n in b else "vision_model." + n] + 0.01 * torch.randn_like(p))
        v.save_pretrained(tmp_path / f"ft{i}")
        fts.append({("vision_model." + k if "vision_model." + k in b else k): t for k, t in v.state_dict().items()})
    paths = [tmp_path / "ft0", tmp_path / "ft1"]
    with pytest.raises(ww.MismatchError) as e:
        ww.merge(tmp_path / "base", paths, tmp_path / "out", method="task_arithmetic")
    pattern = re.search(r"keep_base='([^']+)'", str(e.value)).group(1)
    assert pattern == r"^(logit_scale$|text_model\.|text_projection\.|visual_projection\.)"
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rep = ww.merge(tmp_path / "base", paths, tmp_path / "out", method="task_arithmetic", lam=1.0, keep_base=pattern)
    if "embeddings.class_embedding" in transformers.CLIPVisionModel(vc).state_dict():  # transformers 5 names
        assert len(rep.aligned) == 2 and all("'vision_model.' added" in s for s in rep.aligned)
    out = load(tmp_path / "out")
    for name, v in b.items():
        want = v + sum(ft[name] - v for ft in fts) if name.startswith("vision_model.") else v
        torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6)
    m, info = transformers.CLIPModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    m(input_ids=torch.tensor([[0, 5, 1]]), pixel_values=torch.zeros(1, 3, 16, 16))
