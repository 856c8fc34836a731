"""mergekit's other methods in the config's dtype, and loading in it: ``sce``, ``nuslerp`` and
``arcee_fusion`` computed as mergekit's run in bf16/f16 computes them, against mergekit's code
transcribed into torch and run on tensors in that dtype
(``reference_mergekit_methods.merge_in_dtype``); every input rounded to a bf16/f16 ``dtype`` as
mergekit loads it, whatever method; without a ``dtype``, the inputs' own bf16/f16."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

import weightweave as ww
from weightweave import reference_mergekit as MK
from weightweave import reference_mergekit_methods as MKM

from conftest import load, write_models

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _state(seed: int, dtype: torch.dtype, models: int = 3) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (40, 16), "layers.0.attn.weight": (16, 16), "layers.0.norm.weight": (16,),
              "layers.1.mlp.weight": (24, 16)}  # fmt: skip
    base = {n: 0.1 * torch.randn(s, generator=g) for n, s in shapes.items()}
    fts = [{n: t + 0.02 * (k + 1) * torch.randn(t.shape, generator=g) for n, t in base.items()} for k in range(models)]
    cast = lambda sd: {n: t.to(dtype) for n, t in sd.items()}  # noqa: E731
    return cast(base), [cast(m) for m in fts]


def _config(tmp_path, cfg: dict) -> dict:
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o.safetensors"
    ww.run(tmp_path / "c.yml", out, overwrite=True)
    return load(out)


METHODS = [
    ("sce", 3, None, {}),
    ("sce", 3, None, {"select_topk": 0.6}),
    ("nuslerp", 2, [0.3, 0.7], {}),
    ("nuslerp", 2, [0.6, 0.4], {"nuslerp_flatten": False}),
    ("nuslerp", 2, [0.5, 0.5], {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("arcee_fusion", 1, None, {}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("method", "count", "weights", "params"), METHODS)
def test_methods_in_their_dtype(tmp_path, dtype, method, count, weights, params):
    """Bit for bit mergekit's arithmetic in the dtype. sce's ties at its top-k cut are taken by
    position in both (torch.topk leaves them undefined)."""
    base, models = _state(21, DTYPES[dtype], count)
    bp, mps = write_models(tmp_path / "in", base, models)
    entries = [{"model": str(m), **({"parameters": {"weight": weights[i]}} if weights else {})}
               for i, m in enumerate(mps)]  # fmt: skip
    cfg = {"merge_method": method, "base_model": str(bp), "dtype": dtype, "models": entries, "parameters": params}
    got = _config(tmp_path, cfg)
    want = MKM.merge_in_dtype(base, models, method, DTYPES[dtype], weights, **params)
    for n in want:
        # mergekit writes arcee_fusion's f32 result as it is when no out_dtype is given.
        assert got[n].dtype == (torch.float32 if method == "arcee_fusion" else DTYPES[dtype]), n
        assert torch.equal(got[n], want[n].to(got[n].dtype)), (n, (got[n].float() - want[n].float()).abs().max())
    # Our f32 arithmetic (precision: f32) gives another model: the emulation is what changed it.
    f32 = _config(tmp_path, cfg | {"precision": "f32"})
    assert any(not torch.equal(f32[n].float(), want[n].float()) for n in want)


@pytest.mark.parametrize(("method", "weights"), [("linear", [1.0, 0.3, 0.55]), ("task_arithmetic", [1.0, 0.3, 0.55]),
                                                 ("model_stock", None)])  # fmt: skip
def test_inputs_are_loaded_in_the_dtype(tmp_path, method, weights):
    """bf16 checkpoints under ``dtype: float16``: mergekit converts every tensor to f16 as it loads
    it (values below f16's range flush towards 0, others lose bits), then merges. Against the
    f32 reference on the inputs converted by torch, and distinct from merging the bf16 values."""
    base, models = _state(22, torch.bfloat16)
    # bf16 values within f16's normal range convert exactly; f16 subnormals keep fewer bits.
    for sd in (base, *models):
        sd["layers.0.norm.weight"] = (sd["layers.0.norm.weight"].float() * 1e-4).to(torch.bfloat16)
    bp, mps = write_models(tmp_path / "in", base, models)
    entries = [{"model": str(m), **({"parameters": {"weight": weights[i]}} if weights else {})}
               for i, m in enumerate(mps)]  # fmt: skip
    cfg = {"merge_method": method, "base_model": str(bp), "dtype": "float16", "models": entries,
           "precision": "f32"}  # fmt: skip
    got = _config(tmp_path, cfg)
    f16 = lambda sd: {n: t.to(torch.float16) for n, t in sd.items()}  # noqa: E731
    if method == "model_stock":
        want = MKM.merge(f16(base), [f16(m) for m in models], method)
    else:
        want = MK.merge(f16(base), [f16(m) for m in models], method, weights)
    for n in want:
        assert got[n].dtype == torch.float16 and torch.equal(got[n], want[n]), n
    # Not what merging the stored bf16 values gives.
    unrounded = _config(tmp_path, cfg | {"dtype": "float32", "out_dtype": "float16"})
    assert not torch.equal(got["layers.0.norm.weight"], unrounded["layers.0.norm.weight"])


def test_a_value_beyond_the_load_dtype_is_an_error(tmp_path):
    base, models = _state(23, torch.bfloat16)
    models[1]["layers.1.mlp.weight"][2, 3] = 1e6  # bf16 holds it, f16 does not
    bp, mps = write_models(tmp_path / "in", base, models)
    cfg = {"merge_method": "linear", "dtype": "float16",
           "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in [bp, *mps]]}  # fmt: skip
    with pytest.raises(ww.NonFiniteError) as e:
        _config(tmp_path, cfg)
    msg = str(e.value)
    assert str(mps[1]) in msg and "layers.1.mlp.weight" in msg and "F16" in msg and "element 35" in msg
    assert not (tmp_path / "o.safetensors").exists()


def test_without_a_dtype_the_stored_dtype_is_the_arithmetic(tmp_path):
    """No ``dtype``: mergekit computes in the dtype the tensors are stored in (bf16 here); with
    the inputs stored in different dtypes (torch would promote per operation), f32 is ours."""
    base, models = _state(24, torch.bfloat16)
    bp, mps = write_models(tmp_path / "in", base, models)
    cfg = {"merge_method": "sce", "base_model": str(bp), "models": [{"model": str(m)} for m in mps]}
    got = _config(tmp_path, cfg)
    want = MKM.merge_in_dtype(base, models, "sce", torch.bfloat16)
    for n in want:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n]), n
    save_file({n: t.float() for n, t in models[0].items()}, str(mps[0]))
    mixed = _config(tmp_path, cfg)
    f32 = MKM.merge(base, [{n: t.float() for n, t in models[0].items()}, *models[1:]], "sce")
    for n in f32:
        assert torch.equal(mixed[n], f32[n]), n
