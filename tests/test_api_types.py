"""Any argument of any public function, given a value of the wrong type (or an odd value of the
right one), either works or raises a WeaveError subclass naming it: never a bare TypeError,
ValueError, RecursionError or a crash. Every argument is tried with every value below."""

from __future__ import annotations

import inspect as pyinspect
import math
from pathlib import Path

import numpy as np
import pytest

import weightweave as ww

from conftest import write_models

WRONG = [
    None, True, False, -1, 0, 2**70, 1.5, math.nan, math.inf, "x", "", "false", "a:b", b"x", [], [1, "a"], [None],
    {}, {"a": 1}, {1: 2}, {1, 2}, (), object(), np.array([1.0, 2.0]), np.array(True), np.float32(1), np.int64(3),
    lambda *a: None, Path("/nonexistent"), "\0", [[1.0]], {"lam": "x"}, [{"lam": None}],
]  # fmt: skip


def arrays():
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((4, 3), dtype=np.float32), "b": rng.standard_normal(3, dtype=np.float32)}
    models = [{k: v + 0.1 * rng.standard_normal(v.shape, dtype=np.float32) for k, v in base.items()} for _ in range(2)]
    return base, models


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("types")
    base, models = arrays()
    tb = {k: torch.from_numpy(v) for k, v in base.items()}
    tm = [{k: torch.from_numpy(v) for k, v in m.items()} for m in models]
    bp, mps = write_models(root / "in", tb, tm)
    return root, bp, mps


ESCAPED: list[str] = []


@pytest.fixture(autouse=True)
def _nothing_escaped():
    ESCAPED.clear()
    yield
    assert not ESCAPED, f"{len(ESCAPED)} calls raised something other than a WeaveError:\n" + "\n".join(ESCAPED[:40])


def check(fn, args: dict, label: str) -> None:
    try:
        fn(**args)
    except ww.WeaveError:
        pass
    except BaseException as e:  # noqa: BLE001 - the point is which exceptions escape
        ESCAPED.append(f"{label}: {type(e).__name__}: {str(e)[:150]}")


def names(fn) -> list[str]:
    return [p.name for p in pyinspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]


# Method parameters travel as **params: each is tried too, and an unknown one.
EXTRA = ["density", "gamma", "ratio", "scope", "rescale", "ties_density", "normalize", "bogus"]


@pytest.mark.parametrize("func", ["merge_arrays", "weave_arrays"])
def test_array_api_arguments(func):
    fn = getattr(ww, func)
    base, models = arrays()
    good = {"base": base, "models": models, "method": "ties"}
    n = 0
    for name in names(fn) + EXTRA:
        for v in WRONG:
            check(fn, {**good, name: v}, f"{func}({name}={v!r})")
            n += 1
    assert n > 300


@pytest.mark.parametrize("func", ["merge", "weave"])
def test_file_api_arguments(func, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a string such as "x" given as `out` writes there, not into the checkout
    fn = getattr(ww, func)
    root, bp, mps = files
    k = 0
    for name in names(fn) + EXTRA:
        for v in WRONG:
            k += 1
            good = {"base": bp, "models": mps, "out": tmp_path / f"o{k}.safetensors", "method": "task_arithmetic"}
            check(fn, {**good, name: v}, f"{func}({name}={v!r})")


RECIPE_KEYS = ("base", "models", "method", "params", "mode", "lam", "lambdas", "search", "pool", "weights",
               "include_deltas", "seed", "out_dtype", "shard_size", "compat", "threads", "chunk_size")  # fmt: skip


def test_other_functions(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, bp, mps = files
    for v in WRONG:
        check(ww.inspect, {"path": v}, f"inspect({v!r})")
        check(ww.default_lambdas, {"method": v}, f"default_lambdas({v!r})")
        recipe = {"base": str(bp), "models": [str(m) for m in mps], "method": "task_arithmetic"}
        for name in ("recipe", "out", "overwrite", "progress", "threads", "chunk_size", "allow_code"):
            args = {"recipe": recipe, "out": str(tmp_path / "r.safetensors"), name: v}
            check(ww.run, args, f"run({name}={v!r})")
            (tmp_path / "r.safetensors").unlink(missing_ok=True)
        for key in RECIPE_KEYS:
            check(ww.run, {"recipe": {**recipe, key: v}, "out": str(tmp_path / "k.safetensors")}, f"recipe {key}={v!r}")
            (tmp_path / "k.safetensors").unlink(missing_ok=True)
