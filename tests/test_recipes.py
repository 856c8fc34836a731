"""Recipe files: ``weightweave run RECIPE [OUT]`` and ``ww.run``, in our schema and mergekit's;
every unsupported key is one clear error before any work."""

from __future__ import annotations

import textwrap

import pytest
import torch

import weightweave as ww
from weightweave import reference as R
from weightweave import reference_mergekit as MK
from weightweave.cli import main

from conftest import assert_close_ulp, digest, load, make_state, tree, ulp, write_models


@pytest.fixture
def ck(tmp_path, monkeypatch):
    base, models = make_state(51)
    base = {n: t.float() if t.is_floating_point() else t for n, t in base.items()}
    models = [{n: t.float() if t.is_floating_point() else t for n, t in m.items()} for m in models]
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.chdir(tmp_path)  # recipes name paths relative to the working directory
    return base, models, bp, mps


def write(tmp_path, text: str):
    p = tmp_path / "recipe.yml"
    p.write_text(textwrap.dedent(text))
    return p


MERGEKIT_TIES = """\
    merge_method: ties
    base_model: in/base.safetensors
    models:
      - model: in/base.safetensors
      - model: in/ft0.safetensors
        parameters: {weight: 1.0, density: 0.5}
      - model: in/ft1.safetensors
        parameters: {weight: 0.5, density: 0.3}
      - model: in/ft2.safetensors
        parameters:
          weight: 0.3
    parameters:
      normalize: true
      int8_mask: true
      density: 0.7
    dtype: float32
"""


def close(base, models, got):
    out = {}
    for n, b in base.items():
        if b.is_floating_point():
            top = max((m[n].double() - b.double()).abs().max() for m in models)
            out[n] = 4 * ulp(got[n].double().abs(), torch.float32) + top * 1e-6
    return out


def test_a_mergekit_yaml_runs_unchanged(ck, tmp_path):
    base, models, _, _ = ck
    p = write(tmp_path, MERGEKIT_TIES)
    assert main(["run", str(p), "out1", "-q"]) == 0
    got = load(tmp_path / "out1")
    # The base listed among the models gives no task vector; the top-level density is the
    # default of the model that sets none.
    want = MK.merge(base, models, "ties", [1.0, 0.5, 0.3], density=[0.5, 0.3, 0.7], normalize=True)
    assert_close_ulp(got, want, atol=close(base, models, got))
    rep = ww.run(p, "out2")
    assert load(tmp_path / "out2").keys() == got.keys()
    assert rep.outputs


def test_mergekit_lambda_and_weave_block(ck, tmp_path):
    base, models, _, _ = ck
    text = MERGEKIT_TIES.replace("density: 0.7\n", "density: 0.7\n      lambda: 0.6\n")
    ww.run(write(tmp_path, text), "lam.safetensors")
    got = load(tmp_path / "lam.safetensors")
    want = MK.merge(base, models, "ties", [1.0, 0.5, 0.3], lam=0.6, density=[0.5, 0.3, 0.7])
    assert_close_ulp(got, want, atol=close(base, models, got))
    text = MERGEKIT_TIES + "    weave:\n      search: {lam: [0.5, 1.0], density: [0.2, 0.6]}\n      pool: magmax\n"
    ww.run(write(tmp_path, text), "woven.safetensors")
    got = load(tmp_path / "woven.safetensors")

    def merged(ws, ps):
        return MK.merged(base, models, "ties", ws, **ps)

    want = R.weave(base, models, "ties", search={"lam": [0.5, 1.0], "density": [0.2, 0.6]}, pool="magmax",
                   weights=[1.0, 0.5, 0.3], merged=merged)  # fmt: skip
    assert_close_ulp(got, want, atol=close(base, models, got))


def test_our_schema_with_a_grid_and_out_in_the_recipe(ck, tmp_path):
    base, models, _, _ = ck
    p = write(tmp_path, """\
        base: in/base.safetensors
        models:
          - {model: in/ft0.safetensors, weight: 1.0, density: 0.2}
          - {model: in/ft1.safetensors, weight: 0.5, density: 0.4}
          - {model: in/ft2.safetensors, weight: 2.0, density: 0.3}
        method: dare
        search: {lam: "0.2:1.0:0.4", rescale: [true]}
        pool: mean
        seed: 4
        out: woven.safetensors
    """)
    assert main(["run", str(p), "-q"]) == 0
    got = load(tmp_path / "woven.safetensors")
    want = R.weave(base, models, "dare", [0.2, 0.6, 1.0], weights=[1.0, 0.5, 2.0], seed=4, density=[0.2, 0.4, 0.3])
    assert_close_ulp(got, want, ulps=2, atol=1e-6)
    # The same recipe as a mapping, with OUT given.
    ww.run({"base": "in/base.safetensors", "models": ["in/ft0.safetensors", "in/ft1.safetensors"],
            "method": "task_arithmetic", "lam": 0.5}, "m.safetensors")  # fmt: skip
    want = R.merge(base, models[:2], "task_arithmetic", 0.5)
    assert_close_ulp(load(tmp_path / "m.safetensors"), want)


REFUSED = [
    ("slices:\n  - sources: []\n", "'slices'"),
    # Loose weight files have no tokenizer to build from (mergekit fails there too).
    ("tokenizer:\n  source: union\n", "no tokenizer loads"),
    ("tokenizer_source: union\n", "no tokenizer loads"),
]


@pytest.mark.parametrize(("extra", "key"), REFUSED)
def test_unsupported_mergekit_keys_are_named(ck, tmp_path, extra, key):
    text = MERGEKIT_TIES + textwrap.indent(extra, "    ")
    with pytest.raises(ww.RecipeError, match=key):
        ww.run(write(tmp_path, text), "o")
    assert not (tmp_path / "o").exists()


EDITS = [
    (("merge_method: ties", "merge_method: slerp"), "slerp"),
    (("parameters: {weight: 1.0, density: 0.5}", "parameters: {weight: 1.0, density: {value: 1, when: mlp}}"),
     "'when' is not part of a condition"),
    (("parameters: {weight: 1.0, density: 0.5}", "parameters: {weight: [{filter: 3, value: 1}]}"), "filter must be"),
    (("parameters: {weight: 1.0, density: 0.5}", "parameters: {weight: 1.0, density: []}"), "empty gradient"),
    (("parameters: {weight: 1.0, density: 0.5}", "parameters: {weight: x}"), "must be a number"),
    (("parameters: {weight: 1.0, density: 0.5}", "parameters: {density: 0.5}"), "weight is required"),
    (("model: in/ft1.safetensors", "model: meta-llama/Llama-3-8B"), "hub id"),
    (("model: in/ft1.safetensors", "model: in/ft1.safetensors+lora/x"), "'lora/x' is a hub id not in the Hugging Face"),
    (("model: in/ft1.safetensors", "model: in/missing.safetensors"), "does not exist"),
    (("base_model: in/base.safetensors", "base_model: nope"), "base_model"),
    (("  normalize: true", "  normalize: 3"), "normalize"),
    (("dtype: float32", "dtype: int4"), "int4"),
    (("merge_method: ties\n", "merge_method: ties\n    weave: {lambdas: 0.1:1.0:0.1, foo: 1}\n"), "weave.foo"),
]


@pytest.mark.filterwarnings("ignore::weightweave.RecipeWarning")  # a parameter another method would take
@pytest.mark.parametrize(("edit", "msg"), EDITS)
def test_bad_mergekit_recipes_name_the_key(ck, tmp_path, edit, msg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is looked up in an empty cache, never fetched
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    text = MERGEKIT_TIES.replace(*edit)
    assert text != MERGEKIT_TIES
    with pytest.raises(ww.RecipeError, match=msg):
        ww.run(write(tmp_path, text), "o")
    assert tree(tmp_path / "o") == []


def test_bad_yaml_names_the_line(ck, tmp_path, capsys):
    p = write(tmp_path, "merge_method: ties\nmodels: [\n  - model: x\n")
    with pytest.raises(ww.RecipeError, match=r"not valid YAML at line \d+"):
        ww.run(p, "o")
    assert main(["run", str(p), "o"]) == 1
    assert "recipe.yml: not valid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yml"), "o"]) == 1
    assert "no such recipe file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


OWN_BAD = [
    ({"method": "ties", "models": ["in/ft0.safetensors"]}, "'base' is required"),
    ({"base": "in/base.safetensors", "models": [{"model": "in/ft0.safetensors", "wieght": 1}], "method": "ties"},
     "wieght"),
    ({"base": "in/base.safetensors", "models": "in/ft0.safetensors", "method": "ties"}, "non-empty list"),
    ({"base": "in/base.safetensors", "models": ["in/ft0.safetensors"], "method": "ties", "lam": 1, "pool": "mean"},
     "belongs to mode: merge"),
    ({"base": "in/base.safetensors", "models": ["in/ft0.safetensors"], "method": "ties", "pool": "nope:fn"},
     "names Python code"),
    ({"base": "in/base.safetensors", "models": ["in/ft0.safetensors"], "method": "ties", "base_model": "x"},
     "merge_method"),
    ({"base": "in/base.safetensors", "models": ["in/ft0.safetensors"], "method": "ties"}, "no output"),
]  # fmt: skip


@pytest.mark.parametrize(("recipe", "msg"), OWN_BAD)
def test_bad_recipes_of_our_schema(ck, tmp_path, recipe, msg):
    with pytest.raises(ww.RecipeError, match=msg):
        ww.run(recipe, None if msg == "no output" else "o")
    assert not (tmp_path / "o").exists()


def test_cli_grid_and_per_model_set(ck, tmp_path):
    base, models, bp, mps = ck
    args = ["weave", str(bp), *map(str, mps), "-o", "g.safetensors", "--method", "ties", "-q",
            "--grid", "density=0.1,0.3", "--grid", "lam=0.5:1.5:0.5", "--set", "scope=tensor"]  # fmt: skip
    assert main(args) == 0
    grid = {"density": [0.1, 0.3], "lam": [0.5, 1.0, 1.5]}
    want = R.weave(base, models, "ties", search=grid, scope="tensor")
    got = load(tmp_path / "g.safetensors")
    assert_close_ulp(got, want, ulps=2, atol=1e-6)
    args = ["merge", str(bp), *map(str, mps), "-o", "p.safetensors", "--method", "ties", "-q",
            "--set", "density=0.1,0.5,0.9", "--compat", "mergekit", "--weights", "1,0.5,2"]  # fmt: skip
    assert main(args) == 0
    got = load(tmp_path / "p.safetensors")
    want = MK.merge(base, models, "ties", [1.0, 0.5, 2.0], density=[0.1, 0.5, 0.9])
    assert_close_ulp(got, want, atol=close(base, models, got))
    assert main(["weave", str(bp), *map(str, mps), "-o", "x", "--method", "ties", "--grid", "density"]) == 1


def test_a_soup_recipe_needs_no_base(ck, tmp_path):
    base, models, _, _ = ck
    ww.run({"models": ["in/ft0.safetensors", "in/ft1.safetensors"], "method": "linear", "weights": [1.0, 3.0]},
           "soup.safetensors")  # fmt: skip
    got = load(tmp_path / "soup.safetensors")
    for n, b in base.items():
        if b.is_floating_point():
            want = (models[0][n].double() + 3 * models[1][n].double()) / 4
            assert torch.allclose(got[n].double(), want, atol=1e-6), n


def test_every_blocker_of_a_config_is_named_at_once(ck, tmp_path):
    # A published config often has several features weightweave does not run yet: one error names
    # them all (with where each is used), not the first of them only.
    text = textwrap.dedent("""\
        slices:
          - sources:
              - model: in/base.safetensors
                layer_range: [0, 2]
        merge_method: slerp
        base_model: in/base.safetensors
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 1]
            - value: 0.5
          other: [0.1, 0.9]
        modules:
          text_decoder: {slices: []}
    """)
    (tmp_path / "r.yml").write_text(text)
    with pytest.raises(ww.RecipeError) as e:
        ww.run(str(tmp_path / "r.yml"), tmp_path / "out")
    msg = str(e.value)
    assert "2 features" in msg, msg
    for part in ("'slices'", "base_model's layers", "'modules'"):
        assert part in msg, (part, msg)
    assert not (tmp_path / "out").exists()


IGNORED = [
    (("parameters: {weight: 1.0, density: 0.5}", "parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}"),
     "'models\\[1\\].parameters.epsilon' ignored: not a per-model parameter of mergekit's ties"),
    (("  normalize: true", "  normalize: true\n      rescale_norm: l2"), "'parameters.rescale_norm' ignored"),
    (("dtype: float32", "dtype: float32\n    int8_mask: true"), "'int8_mask' ignored: not a key of mergekit's config"),
    (("    parameters: {weight: 1.0, density: 0.5}", "    parameters: {weight: 1.0, density: 0.5}\n        lora: x"),
     "'models\\[1\\].lora' ignored"),
]


@pytest.mark.parametrize(("edit", "msg"), IGNORED)
def test_keys_mergekit_ignores_are_ignored_aloud(ck, tmp_path, edit, msg):
    """mergekit's schema ignores keys it does not know (a mis-indented ``int8_mask`` runs there):
    the same config runs here, to the same model, with a RecipeWarning naming the key."""
    text = MERGEKIT_TIES.replace(*edit)
    assert text != MERGEKIT_TIES
    ww.run(write(tmp_path, MERGEKIT_TIES), "plain")
    with pytest.warns(ww.RecipeWarning, match=msg):
        ww.run(write(tmp_path, text), "o")
    assert digest(tmp_path / "o") == digest(tmp_path / "plain")


def test_density_on_task_arithmetic_is_ignored_aloud(ck, tmp_path):
    """mergekit declares ``density`` for every method of its task-arithmetic family, and its
    task_arithmetic runs a config that gives one (copied from a TIES config) without reading it:
    the same model here as without the densities, with a RecipeWarning naming where they are."""
    ta = MERGEKIT_TIES.replace("merge_method: ties", "merge_method: task_arithmetic")
    plain = ta.replace(", density: 0.5", "").replace(", density: 0.3", "").replace("      density: 0.7\n", "")
    assert "density" not in plain
    ww.run(write(tmp_path, plain), "plain")
    msg = (r"'models\[1\].parameters.density', 'models\[2\].parameters.density', 'parameters.density' ignored: "
           "task_arithmetic does not sparsify")
    with pytest.warns(ww.RecipeWarning, match=msg):
        ww.run(write(tmp_path, ta), "o")
    assert digest(tmp_path / "o") == digest(tmp_path / "plain")


def test_a_number_yaml_reads_as_text_is_a_number(ck, tmp_path):
    """YAML 1.1 reads ``7e-1`` as a string; mergekit's schema takes it as the number (a published
    karcher config has ``tol: 1e-10``), and so does this."""
    ww.run(write(tmp_path, MERGEKIT_TIES), "plain")
    ww.run(write(tmp_path, MERGEKIT_TIES.replace("density: 0.7", "density: 7e-1")), "o")
    assert digest(tmp_path / "o") == digest(tmp_path / "plain")
    with pytest.raises(ww.RecipeError, match="must be a number"):
        ww.run(write(tmp_path, MERGEKIT_TIES.replace("density: 0.7", "density: 7e-1x")), "bad")


def test_a_condition_key_mergekit_does_not_have_is_ignored_aloud(ck, tmp_path):
    """mergekit 0.1.5's conditions have ``filter``; the older ``pattern`` (still in its
    examples/gradient-slerp.yml) is ignored there, so the condition matches every tensor."""
    ww.run(write(tmp_path, MERGEKIT_TIES), "plain.safetensors")
    text = MERGEKIT_TIES.replace("      density: 0.7", "      density:\n        - pattern: mlp\n          value: 0.7")
    with pytest.warns(ww.RecipeWarning, match=r"'parameters.density\[0\].pattern' ignored: not a key of a mergekit"):
        ww.run(write(tmp_path, text), "o.safetensors")
    got, want = load(tmp_path / "o.safetensors"), load(tmp_path / "plain.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)
