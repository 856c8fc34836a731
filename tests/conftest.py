"""Shared fixtures: random checkpoints written with the `safetensors` library (an independent
writer), outputs read back with it (an independent reader), and an ulp-based comparison."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Mixed dtypes and shapes: 0-d, 1-d, 2-d, 4-d, sizes that do not divide the chunk sizes used.
SHAPES = {
    "emb.weight": ((37, 24), torch.bfloat16),
    "layer.0.attn.weight": ((24, 24), torch.float32),
    "layer.0.mlp.weight": ((41, 24), torch.float16),
    "layer.0.norm.weight": ((24,), torch.float32),
    "conv.weight": ((3, 2, 5, 7), torch.float32),
    "scale": ((), torch.float32),
    "bias": ((17,), torch.bfloat16),
}


def make_state(seed: int, tasks: int = 3, scale: float = 0.05) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g).to(dt) for n, (s, dt) in SHAPES.items()}
    base["position_ids"] = torch.arange(11, dtype=torch.int64)
    base["mask"] = torch.tensor([True, False, True])
    models = []
    for _ in range(tasks):
        m = {}
        for n, t in base.items():
            if t.is_floating_point():
                m[n] = (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)
            else:
                m[n] = t.clone()
        models.append(m)
    return base, models


def write_models(root: Path, base: dict, models: list[dict]) -> tuple[Path, list[Path]]:
    root.mkdir(parents=True, exist_ok=True)
    bp = root / "base.safetensors"
    save_file(base, str(bp))
    mps = []
    for i, m in enumerate(models):
        p = root / f"ft{i}.safetensors"
        save_file(m, str(p))
        mps.append(p)
    return bp, mps


def tiny_llama(seed: int = 0):
    """The tiny float32 Llama the LoRA tests adapt (PEFT then merges in f32 too)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture
def fine_tunes(tmp_path: Path) -> tuple[dict, list[Path]]:
    """A base state (not written) and three fine-tunes of it written as safetensors files."""
    base, fts = make_state(9)
    _, mps = write_models(tmp_path / "fts", base, fts)
    return base, mps


@pytest.fixture
def ckpts(tmp_path: Path):
    base, models = make_state(0)
    bp, mps = write_models(tmp_path / "in", base, models)
    return base, models, bp, mps


def load(path: Path | str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        out: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    return load_file(str(path))


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (x in f64)."""
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52, torch.float8_e4m3fn: 3,
            torch.float8_e5m2: 2}[dtype]  # fmt: skip
    tiny = torch.finfo(dtype).tiny
    e = torch.floor(torch.log2(torch.clamp(x.abs(), min=tiny)))
    return torch.pow(2.0, e - mant)


def assert_close_ulp(got: dict, want: dict, ulps: float = 1.0, atol: float | dict = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for n in want:
        a, b = got[n], want[n]
        assert a.dtype == b.dtype, (n, a.dtype, b.dtype)
        assert a.shape == b.shape, (n, a.shape, b.shape)
        if not a.is_floating_point():
            assert torch.equal(a, b), n
            continue
        a64, b64 = a.double(), b.double()
        extra = atol.get(n, 0.0) if isinstance(atol, dict) else atol
        # Arithmetic is f32 (SPEC), so an f64 output is only as precise as f32.
        prec = torch.float32 if a.dtype == torch.float64 else a.dtype
        tol = ulps * ulp(torch.maximum(a64.abs(), b64.abs()), prec) + extra
        bad = (a64 - b64).abs() > tol
        assert not bad.any(), (
            f"{n}: {int(bad.sum())} elements beyond {ulps} ulp, e.g. {a64[bad][:3].tolist()} vs {b64[bad][:3].tolist()}"
        )


def digest(path: Path) -> str:
    """A hash of every output file's bytes (for bit-identity checks)."""
    h = hashlib.sha256()
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    for f in sorted(path.glob("*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(autouse=True)
def _no_thread_env(monkeypatch):
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    yield
    os.environ.pop("WEIGHTWEAVE_TEST", None)


def rounding_slack(base, models, method, lambdas, include_deltas=True, seed=0, pcb_abs=1e-7, weights=None,
                   **params):  # fmt: skip
    """Per-element slack for comparing two valid f32 evaluations of a pooled sum: 2 f32 ulps of
    the largest member of A* there (SPEC's mean formula and a stacked mean round differently),
    plus, for PCB, a term for its transcendental functions: torch's exp/tanh and ours differ by an
    ulp or two, and the balancing weights carry that into M relative to the deltas they weigh,
    amplified where the score clamp's bounds nearly meet (norm() divides by their gap): near-flat
    inputs of the property tests reach 50 ulps. 2e-5·λ·max_t |τ_t| (about 170 ulps of the
    largest delta), and an absolute floor."""
    from weightweave import reference as R

    m = R.merged_task_vector(base, models, method, seed, weights, **params)
    tvs = R.task_vectors(base, models, weights)
    lam = max(abs(x) for x in lambdas)
    out = {}
    for n, mn in m.items():
        scale = lam * mn.abs().double()
        if include_deltas:
            for tv in tvs:
                scale = torch.maximum(scale, tv[n].abs().double())
        pcb = 0.0
        if method == "pcb":
            top = torch.stack([tv[n].abs().double() for tv in tvs]).amax(0)
            pcb = pcb_abs + 2e-5 * lam * top
        out[n] = 2 * ulp(scale, torch.float32) + pcb
    return out
