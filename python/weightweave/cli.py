"""Command line: parses arguments and calls :mod:`weightweave.api`; nothing else."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from . import __version__, api
from ._rust import WeaveError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def human(n: float) -> str:
    """Bytes for people: 532 B, 1.2 MB, 3.96 GB (powers of 1000, like the sizes users give)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MiB"``, ``"1000000"`` → bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (e.g. 2GB, 500MiB, 1000000)")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_value(text: str) -> float | bool | str:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return float(text)
    except ValueError:
        return text


STRING_PARAMS = ("scope", "svd_exclude", "device")


def _numbers(flag: str, key: str, text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise WeaveError(f"{flag} {key}: cannot parse '{text}' (comma-separated numbers)") from None


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value``; ``--set density=0.2,0.5,0.3`` gives one value per fine-tuned model."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise WeaveError(f"--set expects key=value, got '{item}'")
        if key in STRING_PARAMS:
            params[key] = value
        elif "," in value:
            params[key] = _numbers("--set", key, value)
        else:
            params[key] = parse_value(value)
    return params


def parse_grid(items: Sequence[str]) -> dict[str, Any] | None:
    """``--grid lam=0.1:1.0:0.1 --grid density=0.1,0.2,0.3``: the axes of a search grid, in
    order (``weights`` axes take vectors separated by ';', e.g. weights=1,1,0;0.5,1,1)."""
    if not items:
        return None
    from .api import parse_lambdas

    grid: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise WeaveError(f"--grid expects name=values, got '{item}'")
        if key in grid:
            raise WeaveError(f"--grid {key} is given twice")
        if key == "weights":
            grid[key] = [_numbers("--grid", key, v) for v in value.split(";")]
        else:
            grid[key] = parse_lambdas(value) if ":" in value else _numbers("--grid", key, value)
    return grid


class Stop(BaseException):
    """A stop signal, raised at a point where stopping is clean (see :class:`Signals`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Signals:
    """SIGINT, SIGTERM and SIGHUP (what Ctrl-C, ``timeout``, ``docker stop``, systemd and a
    closed terminal send) stop the command the same way. While a merge runs they are only
    recorded, and raised from the progress callback, which the engine calls last just before
    it publishes: so a stop either cancels the merge (nothing written) or arrives after the
    publish, and the message says which."""

    NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed = False
        self.published = False

    def install(self) -> None:
        for s in self.NAMES:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        if not self.armed:
            raise Stop(signum)

    def check(self) -> None:
        if self.received is not None:
            raise Stop(self.received)


class Bar:
    """A one-line progress bar on stderr, drawn only on a terminal; also where a recorded stop
    signal is raised. It names the pass the engine is in ("statistics 1", "output")."""

    wants_stage = True  # the engine then passes the pass's name as a third argument

    def __init__(self, enabled: bool, signals: Signals | None = None) -> None:
        self.enabled = enabled
        self.signals = signals
        self.start = time.monotonic()
        self.drawn = False

    def __call__(self, done: int, total: int, stage: str | None = None) -> None:
        if self.signals is not None:
            self.signals.check()
        if not self.enabled or total <= 0:
            return
        frac = min(done / total, 1.0)
        width = 30
        fill = int(frac * width)
        secs = time.monotonic() - self.start
        rate = done / secs / 1e9 if secs > 0 else 0.0
        sys.stderr.write(
            f"\r{stage or '':>12} [{'#' * fill}{'.' * (width - fill)}] {frac:6.1%} "
            f"{done / 1e9:.2f}/{total / 1e9:.2f} GB {rate:.2f} GB/s {secs:5.1f}s"
        )
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="pre-trained checkpoint: .safetensors file, model dir or index.json")
    p.add_argument("models", nargs="+", help="fine-tuned checkpoints")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file or directory")
    p.add_argument("--method", required=True, help=f"one of {', '.join(api.METHODS)}; mergekit's "
                   f"{', '.join(api.MERGEKIT_ONLY)}; with --compat mergekit: linear, task_arithmetic, ties, "
                   "dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties")  # fmt: skip
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method parameter, e.g. --set density=0.2, or one per model: density=0.2,0.5,0.3 (repeatable)",
    )
    p.add_argument("--weights", help="one weight per fine-tuned model, e.g. 0.2,0.5,1 (τ_t → w_t·τ_t), or "
                   "'metagpt' (MetaGPT's ‖τ_t‖²/Σ‖τ_k‖²)")  # fmt: skip
    p.add_argument("--compat", choices=["paper", "mergekit"],
                   help="mergekit: mergekit's semantics and names (see the README's semantics table)")  # fmt: skip
    p.add_argument("--keep-base", metavar="PATTERN",
                   help="regular expression: tensors the base and the models do not all share (a head of another "
                        "size) are copied from the base, a model's own left out")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--chunk-size", type=int, help="elements per chunk")
    p.add_argument("--out-dtype", choices=["f32", "f16", "bf16", "f64"])
    p.add_argument("--shard-size", type=parse_size, help="max bytes per shard, e.g. 2GB (dir output)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier weightweave output at OUT (atomically; never anything else)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _ray_arg(p)


def _ray_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="spread the merge over a Ray cluster (the same output bit for bit): ADDRESS, else "
                        "RAY_ADDRESS, else a local Ray; inputs and OUT on a file system every node sees; needs "
                        "weightweave[ray]")  # fmt: skip


def _cluster(args: argparse.Namespace) -> str | None:
    ray = getattr(args, "ray", None)
    return None if ray is None else "ray" if ray == "" else f"ray:{ray}"


def methods_table() -> str:
    """The methods, their parameters with defaults (--set KEY=VALUE), default λ and Λ."""
    rows = []
    for d in api.describe_methods():
        params = ", ".join(f"{k}={v}" for k, v in d["params"].items()) or "-"
        rows.append(f"  {d['method']:16} {d['description']}\n  {'':16} parameters: {params}\n"
                    f"  {'':16} λ for merge: {d['lam']:g}   Λ for weave: {d['lambdas_text']}")  # fmt: skip
    return "methods:\n" + "\n".join(rows) + "\n" + _mergekit_names() + DATA_FREE


def _mergekit_names() -> str:
    """The mergekit methods a mergekit YAML may name (all of mergekit 0.1.5's), wrapped."""
    from .mergekit_config import MERGEKIT_METHODS

    lines, line = [], f"  {'mergekit YAML':16} "
    for i, m in enumerate(MERGEKIT_METHODS):
        word = m + ("," if i < len(MERGEKIT_METHODS) - 1 else "")
        if len(line) + len(word) > 100:
            lines.append(line.rstrip())
            line = " " * 19
        line += word + " "
    lines.append(line.rstrip())
    head = ("mergekit's methods, with its semantics (`weightweave run` on a config with merge_method:; "
            "--compat mergekit\nfor merge and weave):\n")  # fmt: skip
    return head + "\n".join(lines) + "\n"


DATA_FREE = """data-free λ (with every method):
  MetaGPT          --lam metagpt (merge: weights λ_t = ‖τ_t‖²/Σ‖τ_k‖², λ = 1), --weights metagpt (merge, weave)
  LiNeS            --set lines=true: block ℓ of L scaled by α + λ·(ℓ−1)/(L−1), α outside the blocks (λ is
                   LiNeS's β); --set lines_alpha=X (default: ‖Σ τ‖₁/(T·‖M‖₁)), --set lines_blocks=L
                   (default: from the names); weave: --grid lines_alpha=..."""


def build_parser() -> argparse.ArgumentParser:
    epilog = methods_table()
    parser = argparse.ArgumentParser(
        prog="weightweave",
        description=("Merge fine-tuned safetensors checkpoints out of core, or Weight-Weave them over a λ grid."),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"weightweave {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    m = sub.add_parser("merge", help="θ_pre + λ·M", epilog=epilog, formatter_class=raw)
    _common(m)
    m.add_argument("--lam", type=_lam, help="scaling factor λ (default per method), or 'metagpt' (per-task "
                   "weights ‖τ_t‖²/Σ‖τ_k‖², λ = 1)")  # fmt: skip
    w = sub.add_parser("weave", help="Weight Weaving: pool over a search space Λ", epilog=epilog, formatter_class=raw)
    _common(w)
    w.add_argument("--lambdas", help="start:stop:step or a,b,c (default: the paper's range)")
    w.add_argument("--grid", action="append", default=[], metavar="NAME=VALUES",
                   help="a search axis, e.g. --grid lam=0.1:1.0:0.1 --grid density=0.1,0.2,0.3 (repeatable; "
                        "the points are their product, the first axis outermost)")  # fmt: skip
    w.add_argument("--pool", choices=api.POOLS, default="mean")
    w.add_argument("--no-deltas", action="store_true", help="pool over the λ-scaled merges only")
    r = sub.add_parser("run", help="run a recipe file (ours, or a mergekit YAML as it is)")
    r.add_argument("recipe", help="a YAML recipe: ours, or mergekit's config schema (merge_method: ...)")
    r.add_argument("out", nargs="?", help="output .safetensors file or directory (default: the recipe's 'out')")
    r.add_argument("--threads", type=int)
    r.add_argument("--chunk-size", type=int, help="elements per chunk")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier weightweave output at OUT")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _ray_arg(r)
    r.add_argument("--allow-code", action="store_true",
                   help="let the recipe's 'pool: module:function' import and call that Python function (a recipe "
                        "never runs code without this flag)")  # fmt: skip
    ms = sub.add_parser("methods", help="list the methods, their parameters, default λ and Λ")
    ms.add_argument("--json", action="store_true", help="machine-readable output")
    i = sub.add_parser("inspect", help="summarise a checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    d = sub.add_parser("demo", help="build small checkpoints in a temp dir and weave them")
    d.add_argument("--dir", help="work here and keep the files (default: a temp dir, removed)")
    d.add_argument(
        "--accuracy",
        action="store_true",
        help="train a small model on real digits and compare λ = 1 with Weight Weaving (needs torch, scikit-learn)",
    )
    d.add_argument("--seed", type=int, default=0, help="seed of --accuracy")
    return parser


def _run_merge(args: argparse.Namespace, signals: Signals) -> int:
    bar = Bar(enabled=not args.quiet and sys.stderr.isatty(), signals=signals)
    if args.command == "run":
        from . import recipe

        with warnings.catch_warnings():
            # Every key checked before the bar starts; its warnings come once, from the run below.
            warnings.simplefilter("ignore")
            recipe_ = recipe.load(args.recipe, allow_code=args.allow_code)
        args.out = args.out if args.out is not None else recipe_.out

        def call() -> api.Report:
            return recipe.run(args.recipe, args.out, overwrite=args.overwrite, progress=bar, threads=args.threads,
                              chunk_size=args.chunk_size, allow_code=args.allow_code,
                              cluster=_cluster(args))  # fmt: skip
    else:
        kw: dict[str, Any] = dict(
            method=args.method,
            seed=args.seed,
            threads=args.threads,
            chunk_size=args.chunk_size,
            out_dtype=args.out_dtype,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            weights=_weights(args.weights),
            compat=args.compat,
            keep_base=args.keep_base,
            progress=bar,
            cluster=_cluster(args),
            **parse_set(args.set),
        )

        def call() -> api.Report:
            return _call(args, kw)

    signals.armed = True
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = call()
    finally:
        signals.armed = False
        bar.close()
        for w in caught:
            print(f"weightweave: warning: {w.message}", file=sys.stderr)
    signals.published = True
    if signals.received is not None:
        name = Signals.NAMES.get(signals.received, str(signals.received))
        print(f"weightweave: {name} arrived after the output was published; {args.out} is complete", file=sys.stderr)
        return 128 + signals.received
    if rep.skipped and not args.quiet:
        print(f"weightweave: not copied from the base's directory: {', '.join(rep.skipped)}", file=sys.stderr)
    if not args.quiet:
        print(
            f"wrote {len(rep.outputs)} file(s), {human(rep.bytes_written)} in {rep.seconds:.2f}s "
            f"({rep.bytes_read / 1e9 / max(rep.seconds, 1e-9):.2f} GB/s read): {args.out}"
        )
    return 0


def _lam(text: str) -> float | str:
    if text.strip() == "metagpt":
        return "metagpt"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor 'metagpt'") from None


def _weights(text: str | None) -> list[float] | str | None:
    if text is None:
        return None
    if text.strip() == "metagpt":
        return "metagpt"
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise WeaveError(f"--weights: cannot parse '{text}' (comma-separated numbers, one per model)") from None


def _call(args: argparse.Namespace, kw: dict[str, Any]) -> api.Report:
    if args.command == "merge":
        return api.merge(args.base, args.models, args.out, lam=args.lam, **kw)
    lambdas = api.parse_lambdas(args.lambdas) if args.lambdas else None
    return api.weave(args.base, args.models, args.out, lambdas=lambdas, search=parse_grid(args.grid), pool=args.pool,
                     include_deltas=not args.no_deltas, **kw)  # fmt: skip


def _run_inspect(args: argparse.Namespace) -> int:
    info = api.inspect(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    weights = [f for f in info["files"] if not f.endswith(".json")]
    print(
        f"{_shown(info['path'])}: {info['num_params']:,} parameters, {human(info['data_bytes'])} "
        f"in {len(weights)} weight file(s)"
    )
    for k, v in sorted(info["metadata"].items()):
        print(f"  metadata {_shown(k)} = {_shown(v)}")
    for t in info["tensors"]:
        flag = "" if t["merged"] else "  (copied from base)"
        print(f"  {_shown(t['name']):60} {t['dtype']:7} {str(t['shape']):20} {human(t['bytes']):>9}{flag}")
    return 0


def _shown(text: str) -> str:
    """Names from files with control characters escaped (no forged lines, no terminal codes)."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``weightweave`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("merge", "weave"):
        from .mergekit_config import MERGEKIT_METHODS

        known = MERGEKIT_METHODS if args.compat == "mergekit" else api.METHODS + api.MERGEKIT_ONLY
        if args.method not in known:
            parser.error(f"argument --method: invalid choice: '{args.method}' (choose from {', '.join(known)})")
    signals = Signals()
    try:
        signals.install()
        if args.command in ("merge", "weave", "run"):
            return _run_merge(args, signals)
        if args.command == "inspect":
            return _run_inspect(args)
        if args.command == "methods":
            print(json.dumps(api.describe_methods(), indent=2) if args.json else methods_table())
            return 0
        from . import demo

        if args.accuracy:
            demo.run_accuracy(args.seed)
        else:
            demo.run(args.dir)
        return 0
    except (Stop, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Stop) else signal.SIGINT
        name = Signals.NAMES.get(signum, str(signum))
        if signals.published:
            print(f"weightweave: interrupted ({name}) after the output was published; it is complete", file=sys.stderr)
        else:
            print(f"weightweave: interrupted ({name}); nothing was written", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        # `weightweave inspect ... | head`: the reader left; that is not an error.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (WeaveError, OSError) as e:
        print(f"weightweave: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback for the user; the type says where to look
        print(f"weightweave: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
