"""The CLI and Python surface a user meets first: methods listed with their defaults, human
sizes, quiet broken pipes, exceptions that generic handlers catch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import save_file

import weightweave as ww
from weightweave.cli import human, main

from conftest import make_state


def test_methods_are_listed_with_parameters_and_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in ww.METHODS:
        assert m in out
    # mergekit's names too, every one a mergekit YAML may use.
    from weightweave.mergekit_config import MERGEKIT_METHODS

    assert len(MERGEKIT_METHODS) >= 20
    names = out.split("mergekit's methods")[1].split("data-free")[0]
    for m in MERGEKIT_METHODS:
        assert f" {m}," in names or f" {m}\n" in names, m
    assert "density=0.2, scope=global" in out and "density=0.15, gamma=0.006" in out and "ratio=0.05" in out
    assert "λ for merge: 0.3   Λ for weave: 0.1:1.0:0.1" in out and "Λ for weave: 0.1:2.5:0.1" in out
    with pytest.raises(SystemExit):
        main(["weave", "--help"])
    assert "ties_density=0.2" in capsys.readouterr().out


def test_inspect_prints_human_sizes_and_counts_weight_files(tmp_path, capsys):
    base, _ = make_state(3, tasks=0)
    d = tmp_path / "m"
    d.mkdir()
    save_file(base, str(d / "model.safetensors"))
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "in 1 weight file(s)" in out and " kB" in out and "0.000 GB" not in out
    assert human(532) == "532 B" and human(1234567) == "1.23 MB" and human(3.96e9) == "3.96 GB"


def test_broken_pipe_is_quiet(tmp_path):
    base, _ = make_state(3, tasks=0)
    p = tmp_path / "m.safetensors"
    save_file(base, str(p))
    proc = subprocess.run(f"{sys.executable} -m weightweave inspect {p} | head -1", shell=True, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.stdout.count("\n") == 1 and proc.stderr == "", proc.stderr


def test_errors_are_also_builtin_exceptions(tmp_path):
    assert issubclass(ww.ParamError, ValueError) and issubclass(ww.MismatchError, ValueError)
    assert issubclass(ww.WeaveIOError, OSError) and issubclass(ww.WeaveIOError, ww.WeaveError)
    with pytest.raises(ValueError, match="unknown method"):
        ww.merge(tmp_path / "a", [tmp_path / "b"], tmp_path / "o.safetensors", method="bogus")
    with pytest.raises(OSError, match="No such file"):
        ww.merge(tmp_path / "a", [tmp_path / "b"], tmp_path / "o.safetensors", method="ties")


def test_progress_names_the_pass_for_callbacks_that_ask(tmp_path):
    base, models = make_state(4)
    from conftest import write_models

    bp, mps = write_models(tmp_path / "in", base, models)

    class Staged:
        wants_stage = True

        def __init__(self):
            self.calls = []

        def __call__(self, done, total, stage):
            self.calls.append(stage)

    staged, plain = Staged(), []
    ww.merge(bp, mps, tmp_path / "a.safetensors", method="ties", progress=staged)
    ww.merge(bp, mps, tmp_path / "b.safetensors", method="ties", progress=lambda d, t: plain.append((d, t)))
    assert staged.calls[-1] == "output"  # the last call, before the publish, is the output pass's
    assert all(s == "output" or s.startswith("statistics ") for s in staged.calls)
    assert plain[-1][0] == plain[-1][1]  # two arguments for plain callbacks, as documented


def test_ray_without_ray_says_what_to_install(tmp_path, monkeypatch, capsys):
    """--ray (and cluster="ray") without Ray installed: one clear error naming the extra, before
    any work, and nothing written."""
    from conftest import write_models

    base, models = make_state(1)
    bp, mps = write_models(tmp_path / "in", base, models)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ww.ParamError, match=r"needs Ray: pip install 'weightweave\[ray\]'"):
        ww.merge(bp, mps, tmp_path / "out", method="ties", cluster="ray")
    assert main(["merge", str(bp), *map(str, mps), "-o", str(tmp_path / "out"), "--method", "ties", "-q",
                 "--ray"]) != 0  # fmt: skip
    assert "weightweave[ray]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
