"""The command line, through main(argv) and as an installed script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import weightweave as ww
from weightweave.cli import main, parse_size

from conftest import load, tree


def test_merge_and_weave_commands(ckpts, tmp_path, capsys):
    _, _, bp, mps = ckpts
    out = tmp_path / "m.safetensors"
    assert (
        main(
            [
                "merge",
                str(bp),
                *map(str, mps),
                "-o",
                str(out),
                "--method",
                "ties",
                "--set",
                "density=0.3",
                "--set",
                "scope=tensor",
                "--lam",
                "0.8",
                "-q",
            ]
        )
        == 0
    )
    api_out = tmp_path / "api.safetensors"
    ww.merge(bp, mps, api_out, method="ties", density=0.3, scope="tensor", lam=0.8)
    assert load(out).keys() == load(api_out).keys()
    assert all((load(out)[k] == load(api_out)[k]).all() for k in load(out))

    wout = tmp_path / "w"
    assert (
        main(
            [
                "weave",
                str(bp),
                *map(str, mps),
                "-o",
                str(wout),
                "--method",
                "dare",
                "--lambdas",
                "0.2:0.6:0.2",
                "--pool",
                "random",
                "--no-deltas",
                "--seed",
                "3",
                "--threads",
                "1",
                "--chunk-size",
                "50",
                "--out-dtype",
                "bf16",
                "--shard-size",
                "1KB",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wrote" in printed
    api_w = tmp_path / "api-w"
    ww.weave(
        bp,
        mps,
        api_w,
        method="dare",
        lambdas=[0.2, 0.4, 0.6],
        pool="random",
        include_deltas=False,
        seed=3,
        out_dtype="bf16",
        shard_size=1000,
    )
    got, want = load(wout), load(api_w)
    assert all((got[k] == want[k]).all() for k in want)
    assert (wout / "model.safetensors.index.json").exists()


def test_inspect_command(ckpts, capsys):
    _, _, bp, _ = ckpts
    assert main(["inspect", str(bp)]) == 0
    assert "emb.weight" in capsys.readouterr().out
    assert main(["inspect", str(bp), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_params"] > 0


def test_errors_are_one_line_without_traceback(ckpts, tmp_path, capsys):
    _, _, bp, mps = ckpts
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(bp), str(tmp_path / "missing.safetensors"), "-o", str(out), "--method", "ties"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.safetensors" in err and "Traceback" not in err
    assert main(["merge", str(bp), *map(str, mps), "-o", str(out), "--method", "ties", "--set", "density=7"]) == 1
    assert "density" in capsys.readouterr().err
    assert main(["merge", str(bp), *map(str, mps), "-o", str(out), "--method", "ties", "--set", "oops"]) == 1
    assert not out.exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "a", "b", "-o", "c", "--method", "median"])
    assert e.value.code == 2


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1000") == 1000


def test_demo_runs_and_keeps_dir(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in ("task_arithmetic", "ties", "dare", "breadcrumbs", "pcb", "magmax"):
        assert method in out
    assert "weave-ties/config.json" in tree(tmp_path)


def test_installed_script_and_module():
    r = subprocess.run(["weightweave", "--version"], capture_output=True, text=True, check=True)
    assert ww.__version__ in r.stdout
    r = subprocess.run([sys.executable, "-m", "weightweave", "--help"], capture_output=True, text=True, check=True)
    assert "weave" in r.stdout
