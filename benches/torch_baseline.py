"""The pure-torch baseline: whole state dicts in memory, the reference implementation (stacked
A*, flattened global statistics), as the paper's code does. Used by ``benches/run.py``.

    python benches/torch_baseline.py BASE_DIR MODEL_DIR... -o OUT.safetensors --method M [--weave POOL]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file, save_file

from weightweave import default_lambdas
from weightweave import reference as R


def load_dir(d: str) -> dict:
    out: dict = {}
    for f in sorted(Path(d).glob("*.safetensors")) if Path(d).is_dir() else [Path(d)]:
        out.update(load_file(str(f)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("models", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--weave", metavar="POOL", help="Weight Weaving with this pool over the default Λ")
    a = ap.parse_args()
    base = load_dir(a.base)
    models = [load_dir(m) for m in a.models]
    if a.weave:
        out = R.weave(base, models, a.method, default_lambdas(a.method), pool=a.weave)
    else:
        out = R.merge(base, models, a.method)
    save_file({k: v.contiguous() for k, v in out.items()}, a.out)


if __name__ == "__main__":
    main()
