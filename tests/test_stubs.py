"""The hand-written stub `_rust.pyi` matches the compiled module (as pydantic-core checks it)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_stubtest():
    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "weightweave._rust"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
