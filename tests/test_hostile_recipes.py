"""A recipe is data from a stranger: it never makes weightweave import or run code, and every
malformed value is one RecipeError (a WeaveError), never a bare TypeError or a crash."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import weightweave as ww
from weightweave import reference as R
from weightweave.cli import main

from conftest import assert_close_ulp, load, make_state, write_models


@pytest.fixture
def ck(tmp_path, monkeypatch):
    base, models = make_state(52)
    base = {n: t.float() if t.is_floating_point() else t for n, t in base.items()}
    models = [{n: t.float() if t.is_floating_point() else t for n, t in m.items()} for m in models]
    write_models(tmp_path / "in", base, models)
    monkeypatch.chdir(tmp_path)
    return base, models


HELPERS = """\
import pathlib
pathlib.Path("IMPORTED").write_text("the recipe ran code")


def first(a):
    return a[0]
"""

OWN = """\
base: in/base.safetensors
models: [in/ft0.safetensors, in/ft1.safetensors]
method: task_arithmetic
lambdas: [0.5, 1.0]
pool: {pool}
"""

MERGEKIT = """\
merge_method: task_arithmetic
base_model: in/base.safetensors
models:
  - model: in/ft0.safetensors
    parameters: {{weight: 1.0}}
weave:
  lambdas: [0.5, 1.0]
  pool: {pool}
"""
MK_MEAN = MERGEKIT.format(pool="mean")


@pytest.mark.parametrize("schema", [OWN, MERGEKIT])
@pytest.mark.parametrize("pool", ["helpers:first", "pickle:loads", "this:s", "os:system"])
def test_a_recipe_file_never_imports_code(ck, tmp_path, monkeypatch, schema, pool):
    (tmp_path / "helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))  # the module is importable: only the rule stops it
    p = tmp_path / "r.yml"
    p.write_text(schema.format(pool=pool))
    before = set(sys.modules)
    with pytest.raises(ww.RecipeError, match="names Python code.*--allow-code"):
        ww.run(p, "o")
    assert main(["run", str(p), "o", "-q"]) == 1
    assert not (tmp_path / "IMPORTED").exists()
    assert not (set(sys.modules) - before) & {"helpers", "this"}
    assert not (tmp_path / "o").exists()


def test_allow_code_is_typed_by_the_user(ck, tmp_path, monkeypatch):
    base, models = ck
    (tmp_path / "helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "helpers", raising=False)
    p = tmp_path / "r.yml"
    p.write_text(OWN.format(pool="helpers:first"))
    # A key in the file cannot grant it.
    q = tmp_path / "q.yml"
    q.write_text(OWN.format(pool="helpers:first") + "allow_code: true\n")
    with pytest.raises(ww.RecipeError, match="'allow_code': not a recipe key"):
        ww.run(q, "o")
    assert not (tmp_path / "IMPORTED").exists()
    assert main(["run", str(p), "o", "-q", "--allow-code"]) == 0
    assert (tmp_path / "IMPORTED").exists()
    # pool = A*[0] = τ_0: the output is the first fine-tune.
    got = load(tmp_path / "o")
    want = {n: m.clone() for n, m in models[0].items()}
    assert_close_ulp(got, want, ulps=1)
    rep = ww.run(p, "o2", allow_code=True)
    assert rep.outputs


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("1: 2\nbase: in/base.safetensors\n", "keys are strings"),
        (MK_MEAN.replace("merge_method: task_arithmetic", "merge_method: ties\nparameters: [1, 2]"),
         "'parameters' must be a mapping"),
        (MK_MEAN.replace("merge_method: task_arithmetic", "merge_method: ties\nparameters: abc"),
         "'parameters' must be a mapping"),
        (MERGEKIT.format(pool="mean") + "dtype: [1]\n", "dtype"),
        (MERGEKIT.format(pool="mean").replace("merge_method: task_arithmetic", "merge_method: [ties]"),
         "merge_method"),
        (OWN.format(pool="':x'"), "names Python code"),
        (OWN.format(pool="mean") + "include_deltas: maybe\n", "include_deltas must be True or False"),
        (OWN.format(pool="mean") + "params: {1: 2}\n", "not a method parameter"),
        (OWN.format(pool="mean") + "params: {overwrite: true}\n", "not a method parameter"),
        (OWN.format(pool="mean") + "mode: [weave]\n", "mode must be"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        ("a: &a [1]\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}]\n"
                                 for i in range(20)), "not a recipe key"),  # an alias bomb: harmless
    ],
)  # fmt: skip
def test_malformed_recipe_values_are_recipe_errors(ck, tmp_path, text, msg):
    p = tmp_path / "r.yml"
    p.write_text(text)
    with pytest.raises(ww.RecipeError, match=msg):
        ww.run(p, "o")
    assert not (tmp_path / "o").exists()


def test_odd_recipe_paths(ck, tmp_path):
    with pytest.raises(ww.RecipeError, match="NUL"):
        ww.run("r\0.yml", "o")
    with pytest.raises(ww.RecipeError, match="allow_code must be"):
        ww.recipe.load({"method": "ties"}, allow_code="yes")


@pytest.mark.parametrize("word", ["false", "no", "off", False])
def test_false_words_are_false(ck, tmp_path, word):
    base, models = ck
    p = tmp_path / "r.yml"
    p.write_text(textwrap.dedent(OWN.format(pool="mean")) + f"include_deltas: '{word}'\n")
    ww.run(p, "o")
    want = R.weave(base, models[:2], "task_arithmetic", [0.5, 1.0], include_deltas=False)
    got = load(tmp_path / "o")
    assert torch.allclose(got["layer.0.attn.weight"], want["layer.0.attn.weight"], atol=1e-6)
