"""The accuracy miniature (``weightweave.miniature``, benches/paper/): the quick pieces. The full
study is a benchmark; here: the data and domains are deterministic, the merges go through the
library, and the identity the paper states for MagMax holds exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightweave as ww
from weightweave import miniature as M
from weightweave.cli import main


def test_magmax_pooled_with_magmax_at_lambda_max_1_is_magmax_at_1():
    """A* holds τ_1..τ_T and λ·M with M = the τ of largest magnitude; at λ_max = 1 the later
    member 1·M ties the largest τ, so magmax pooling returns M: exactly MagMax at λ = 1."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 33, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16)}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
              for _ in range(4)]  # fmt: skip
    assert max(ww.default_lambdas("magmax")) == 1.0
    woven = ww.weave_arrays(base, models, method="magmax", pool="magmax")
    plain = ww.merge_arrays(base, models, method="magmax", lam=1.0)
    for k in base:
        assert torch.equal(woven[k].view(torch.int16) if woven[k].dtype == torch.bfloat16 else woven[k],
                           plain[k].view(torch.int16) if plain[k].dtype == torch.bfloat16 else plain[k]), k  # fmt: skip


def test_domains_are_deterministic_transforms():
    x = np.arange(64, dtype=np.float32).reshape(1, 8, 8) / 63
    assert np.array_equal(M.transform(x, "original"), x)
    assert np.allclose(M.transform(x, "inverted"), 1 - x)
    assert np.array_equal(M.transform(x, "rotated")[0], np.rot90(x[0]))
    assert np.array_equal(M.transform(x, "mirrored")[0], x[0, :, ::-1])
    assert np.isclose(M.transform(x, "blurred")[0, 3, 4], x[0, 2:5, 3:6].mean())
    assert M.transform(x, "thick")[0, 3, 4] == x[0, 2:5, 3:6].max()
    assert M.transform(x, "blurred")[0, 0, 0] == pytest.approx(x[0, :2, :2].sum() / 9)  # zero padding
    with pytest.raises(ValueError, match="unknown domain"):
        M.transform(x, "sideways")


@pytest.fixture(scope="module")
def digits():
    why = "the miniature's data is scikit-learn's digits (bench extra; .ci/run installs it)"
    pytest.importorskip("sklearn", reason=why)


def test_data_split_is_deterministic_and_disjoint(digits):
    a, b, c = M.load_data(3), M.load_data(3), M.load_data(4)
    assert np.array_equal(a.test[0], b.test[0]) and np.array_equal(a.tune["thick"][1], b.tune["thick"][1])
    assert not np.array_equal(a.test[0], c.test[0])
    sizes = [len(a.pretrain[1]), len(a.test[1])] + [len(v[1]) for v in a.tune.values()]
    assert sum(sizes) == 1797 and len(a.test[1]) == M.N_TEST and len(a.pretrain[1]) == M.N_PRETRAIN
    # Each domain's fine-tuning images are the real ones, transformed.
    assert a.tune["inverted"][0].min() >= 0 and a.tune["inverted"][0].max() <= 1


@pytest.fixture(scope="module")
def zoo(digits):
    return M.build_zoo(1, domains=("original", "inverted", "mirrored"), continual=True, pretrain_epochs=2,
                       tune_epochs=1)  # fmt: skip


def test_the_zoo_is_reproducible(zoo):
    again = M.build_zoo(1, domains=("original", "inverted", "mirrored"), continual=True, pretrain_epochs=2,
                        tune_epochs=1)  # fmt: skip
    for d in zoo.tuned:
        for k in zoo.pre:
            assert torch.equal(zoo.tuned[d][k], again.tuned[d][k])
    assert len(zoo.continual) == len(M.CL_SPLITS)


def test_every_merge_goes_through_the_library(zoo, monkeypatch):
    from weightweave import api

    calls = []
    for name in ("merge_arrays", "weave_arrays"):
        real = getattr(api, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append((_name, kw.get("lam"), kw.get("pool")))
            return _real(*a, **kw)

        monkeypatch.setattr(api, name, spy)
    r = M.evaluate(zoo, "multitask", "ties")
    lambdas = ww.default_lambdas("ties")
    # λ = 1 (also TIES's own λ) and each pool; the λ curve is θ_pre + λ·M from that λ = 1 merge.
    assert len(calls) == 1 + len(M.POOLS)
    assert {c[2] for c in calls if c[0] == "weave_arrays"} == set(M.POOLS)
    # λ = 1 scored as a direct library merge scores.
    (sc,) = M.scenarios(zoo, "multitask")
    direct = ww.merge_arrays(zoo.pre, sc.models, method="ties", lam=1.0)
    assert r["lam=1"] == sc.score(direct)
    assert r["best"] == max(r["curve"]) and len(r["curve"]) == len(lambdas)


def test_demo_accuracy_is_wired(monkeypatch, capsys):
    from weightweave import demo

    seen = []
    monkeypatch.setattr(demo, "run_accuracy", lambda seed: seen.append(seed))
    assert main(["demo", "--accuracy", "--seed", "3"]) == 0
    assert seen == [3]


def test_data_free_variants_reach_the_library(zoo):
    (sc,) = M.scenarios(zoo, "multitask")
    # "+metagpt": MetaGPT's weights at λ = 1 is the closed form itself.
    direct = ww.merge_arrays(zoo.pre, sc.models, method="ties", lam="metagpt")
    assert M.evaluate(zoo, "multitask", "ties+metagpt")["lam=1"] == sc.score(direct)
    # "+lines": the encoder's three linear layers are LiNeS's blocks 0, 1, 2 (first unscaled by β).
    got = M.merged(zoo.pre, sc.models, "task_arithmetic+lines", lam=0.5)
    ta = ww.merge_arrays(zoo.pre, sc.models, method="task_arithmetic", lam=1.0)
    t = len(sc.models)
    for k, scale in (("1.weight", 1 / t), ("3.weight", 1 / t + 0.25), ("5.weight", 1 / t + 0.5)):
        want = zoo.pre[k] + scale * (ta[k] - zoo.pre[k])
        assert torch.allclose(got[k], want, atol=1e-5), k
