"""Batches of whole tensors (`pipeline/batches.rs`): a merge whose statistics are every tensor's own,
over inputs that do not fit in memory, runs a batch of tensors at a time (statistics, then output),
so that its second pass finds the batch in the page cache. WEIGHTWEAVE_BATCH_BYTES forces batches
of that many input bytes on a test's cached inputs: every output is the reference's and
byte-identical to one run's, whatever the batch size and chunk size, and reads the same bytes;
merges with whole-model statistics are never cut."""

from __future__ import annotations

import pytest
import torch

import weightweave as ww
from weightweave import reference as REF
from weightweave import reference_mergekit as MK

from conftest import assert_close_ulp, digest, load, make_state, write_models

WEIGHTS = [1.0, 0.5, 0.3]
# (method, compat, params): per-tensor statistics in both semantics.
PER_TENSOR = [
    ("ties", None, {"density": 0.3, "scope": "tensor"}),
    ("dare_ties", None, {"density": 0.6, "ties_density": 0.4, "scope": "tensor"}),
    ("ties", "mergekit", {"density": [0.5, 0.3, 0.7]}),
    ("dare_ties", "mergekit", {"density": [0.6, 0.4, 0.9]}),
    ("breadcrumbs_ties", "mergekit", {"density": 0.4, "gamma": [0.1, 0.02, 0.0]}),
]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    base, models = make_state(17)
    bp, mps = write_models(tmp_path_factory.mktemp("in"), base, models)
    return base, models, bp, mps


def _batches(err: str) -> int:
    """Runs of the engine in one merge: each prints its statistics stage under WEIGHTWEAVE_DEBUG."""
    return sum(line.startswith("statistics:") for line in err.splitlines())


def _run(ck, tmp_path, monkeypatch, capfd, method, compat, params, batch, chunk):
    base, models, bp, mps = ck
    if batch is None:
        monkeypatch.delenv("WEIGHTWEAVE_BATCH_BYTES", raising=False)
    else:
        monkeypatch.setenv("WEIGHTWEAVE_BATCH_BYTES", str(batch))
    monkeypatch.setenv("WEIGHTWEAVE_DEBUG", "1")
    out = tmp_path / f"o{batch}_{chunk}.safetensors"
    kw = {"compat": compat, "weights": WEIGHTS} if compat else {"lam": 0.7}
    capfd.readouterr()
    rep = ww.merge(bp, mps, out, method=method, seed=5, chunk_size=chunk, overwrite=True, **kw, **params)
    return out, rep, _batches(capfd.readouterr().err)


@pytest.mark.parametrize(("method", "compat", "params"), PER_TENSOR)
def test_batches_write_one_runs_bytes(ck, tmp_path, monkeypatch, capfd, method, compat, params):
    base, models, _, _ = ck
    merged = sum(t.is_floating_point() for t in base.values())
    one, _, runs = _run(ck, tmp_path, monkeypatch, capfd, method, compat, params, None, None)
    assert runs == 1
    want = digest(one)
    # One byte: every tensor a batch of its own; 3000 bytes: a few tensors together (the
    # 37 x 24 embedding alone is 7 KB over the four inputs, so it is a batch of its own too).
    for chunk in (None, 16):
        _, rep, _ = _run(ck, tmp_path, monkeypatch, capfd, method, compat, params, None, chunk)
        for batch in (1, 3000):
            path, r, runs = _run(ck, tmp_path, monkeypatch, capfd, method, compat, params, batch, chunk)
            assert digest(path) == want, (batch, chunk)
            assert r.bytes_read == rep.bytes_read, (batch, chunk)
            assert runs == merged if batch == 1 else 1 < runs < merged, (batch, runs)
    got = load(one)
    if compat:
        ref = MK.merge(base, models, method, WEIGHTS, seed=5, **params)
    else:
        ref = REF.merge(base, models, method, lam=0.7, seed=5, **params)
    assert_close_ulp(got, ref, atol=1e-6)
    assert torch.equal(got["position_ids"], base["position_ids"])


@pytest.mark.parametrize("method", ["ties", "pcb"])
def test_whole_model_statistics_are_never_cut(ck, tmp_path, monkeypatch, capfd, method):
    _, rep, runs = _run(ck, tmp_path, monkeypatch, capfd, method, None, {}, 1, None)
    assert runs == 1
