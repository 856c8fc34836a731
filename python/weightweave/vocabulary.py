"""The inputs' vocabulary tensors realigned to a tokenizer built for the output, as mergekit 0.1.5's
``PermutedVocabulary`` (``tokenizer/embed.py``) aligns them, written block by block into
temporary safetensors files that the core lays over the inputs (see :mod:`.tokenizer`).

The temporary directory sits next to the output under a name of weightweave's, guarded by a lock
of its own: a run killed before it could clean up leaves it for the next run to remove (the next
run for this output, once it holds that lock; any other run beside it, once the lock is free).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._rust import ParamError, inspect
from .recipe import RecipeWarning
from .tokenizer import BLOCK_ROWS, VOCAB_SUFFIXES, Built, Spec

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
#: Rows apart that are still read as one run (fewer, larger reads).
_GAP = 64


def _key(name: bytes) -> str:
    """FNV-1a of ``name``, as the core keys its entries (``writer/lock.rs``)."""
    h = 0xCBF29CE484222325
    for b in name:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


@contextmanager
def workdir(out: str | os.PathLike) -> Iterator[str]:
    """A temporary directory beside ``out`` for the realigned tensors and the models with their
    LoRAs applied, removed on the way out."""
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        import tempfile

        parent = tempfile.gettempdir()
    key = _key(os.fsencode(os.path.basename(out)) + b"/tokenizer")
    lock_path = os.path.join(parent, f".weightweave-{key}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ParamError(f"{out}: another run is preparing inputs (a tokenizer, LoRAs) for this output") from None
        # Holding the key's lock, every other directory under it is a killed run's: removed.
        for name in os.listdir(parent):
            if name.startswith(f".weightweave-{key}-") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        d = os.path.join(parent, f".weightweave-{key}-{secrets.token_hex(8)}.tmp")
        os.mkdir(d, 0o700)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
            os.unlink(lock_path)
    finally:
        os.close(fd)


class _Reader:
    """Rows of one model's tensors, read from its safetensors files by runs of row indices."""

    def __init__(self, path: str):
        info = inspect(path)
        self.path = path
        self.tensors = {t["name"]: t for t in info["tensors"]}
        self._open: dict[str, Any] = {}

    def rows(self, name: str, idx: np.ndarray, dtype) -> Any:
        """Rows ``idx`` (any order, ≥ 0) of tensor ``name``, as a torch tensor of ``dtype``: read as
        runs of nearby rows, never the whole tensor."""
        import torch
        from safetensors import safe_open

        t = self.tensors[name]
        f = t["file"]
        if not f.endswith(".safetensors"):
            raise ParamError(f"{f}: tensor '{name}': realigning a vocabulary reads safetensors files only")
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        sl = self._open[f].get_slice(name)
        uniq, inv = np.unique(idx, return_inverse=True)
        runs = np.split(uniq, np.nonzero(np.diff(uniq) > _GAP)[0] + 1)
        got = torch.cat([sl[int(r[0]) : int(r[-1]) + 1][torch.from_numpy(r - r[0])] for r in runs])
        return got[torch.from_numpy(inv.reshape(-1))].to(dtype)


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def realign(built: Built, spec: Spec, inputs: list[str], order: list[str], base: str | None,
            dtype: str | None, labels: Mapping[str, str], work: str,
            members: Callable[[str], list[str]] | None = None) -> list[tuple[int, str, str]]:  # fmt: skip
    """Writes the realigned vocabulary tensors of every model that needs them into ``work`` and
    returns the overlays (input index, file, label). ``order``: the models in mergekit's order for
    a tensor (the config's, base last when not listed); ``base``: the config's base_model (None
    without one); ``dtype``: the config's dtype (None: the inputs' own). ``members``: with slices,
    the models a tensor is merged from, in mergekit's order (the first slice's for the weights
    before the layers, the last's for those after): its default rows come from those alone, as
    mergekit's planner gathers them."""
    import torch

    vocab = built.tokenizer.get_vocab()
    n = len(vocab)
    padded = n
    if spec.pad_to_multiple_of and n % spec.pad_to_multiple_of:
        padded = (n // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    readers = {p: _Reader(p) for p in dict.fromkeys(order)}
    base_reader = readers[order[0] if base is None else base]
    names = [k for k in base_reader.tensors if k.endswith(VOCAB_SUFFIXES) and len(base_reader.tensors[k]["shape"])]
    plans: dict[str, dict[str, Any]] = {}
    for name in names:
        have = [p for p in (members(name) if members else readers) if name in readers[p].tensors]
        if not have:
            continue
        shapes = {p: readers[p].tensors[name]["shape"] for p in have}
        if len({tuple(s[1:]) for s in shapes.values()}) > 1:
            raise ParamError(f"tensor '{name}': its shapes {sorted(set(map(tuple, shapes.values())))} differ beyond "
                             "the vocabulary axis, so its rows cannot be realigned")  # fmt: skip
        perms = np.array([built.perms[p] for p in have], dtype=np.int64).reshape(len(have), n)
        identity = all(shapes[p][0] == padded for p in have) and bool((perms == np.arange(n)).all())
        forced = {t for t, c in spec.tokens.items() if c.get("force")}
        if identity and not forced:
            continue
        if dtype is not None:
            dt = _dtype(dtype)
        else:
            dt = _dtype(_ST_DTYPES.get(readers[have[0]].tensors[name]["dtype"], "float32"))
            for p in have[1:]:
                dt = torch.promote_types(dt, _dtype(_ST_DTYPES.get(readers[p].tensors[name]["dtype"], "float32")))
        plans[name] = {"have": have, "perms": perms, "shape": [padded, *shapes[have[0]][1:]], "dtype": dt,
                       "sources": _sources(name, spec, tokens, have, perms, base, built,
                                           {p: shapes[p][0] for p in have})}  # fmt: skip
    if not plans:
        return []
    files = {p: os.path.join(work, f"{i}.safetensors") for i, p in enumerate(readers)}
    _write(plans, readers, files, n, padded, spec, tokens)
    out = []
    for i, p in enumerate(inputs):
        if any(p in pl["have"] for pl in plans.values()):
            out.append((i, files[p], f"{labels.get(p, p)} (vocabulary rows realigned to the output's tokenizer)"))
    return out


def _sources(name: str, spec: Spec, tokens: list[str], have: list[str], perms: np.ndarray, base: str | None,
             built: Built, rows: dict[str, int]) -> dict[int, Any]:  # fmt: skip
    """Per token that needs a default row (one a model lacks, or forced): where it comes from —
    ("avg",), ("zero",), ("model", k, row) — as mergekit's ``assign_embedding_sources`` and
    ``compute_default_embedding`` decide."""
    present = perms >= 0
    out: dict[int, Any] = {}
    absent: list[str] = []
    for i, t in enumerate(tokens):
        cfg = spec.tokens.get(t)
        force = bool(cfg and cfg.get("force"))
        if not force and present[:, i].all():
            continue
        if cfg is not None and cfg.get("source") is not None:
            out[i] = _configured(name, t, i, cfg["source"], have, perms, built, rows)
            continue
        count = int(present[:, i].sum())
        if count == 1:
            k = int(np.argmax(present[:, i]))
            out[i] = ("model", k, int(perms[k, i]))
        elif count == 0:
            absent.append(t)
            out[i] = ("zero",)
        elif base is not None and base in have and present[have.index(base), i]:
            k = have.index(base)
            out[i] = ("model", k, int(perms[k, i]))
        else:
            out[i] = ("avg",)
    if absent:
        shown = ", ".join(repr(t) for t in absent[:8]) + (f", … ({len(absent)} in all)" if len(absent) > 8 else "")
        warnings.warn(f"'{name}': token(s) {shown} are in none of the models it is merged from: their rows are zero, "
                      "as mergekit writes them", RecipeWarning, stacklevel=4)  # fmt: skip
    return out


def _configured(name: str, token: str, i: int, src: Any, have: list[str], perms: np.ndarray,
                built: Built, rows: dict[str, int]) -> tuple[Any, ...]:  # fmt: skip
    if isinstance(src, Mapping) and src.get("kind") == "zero":
        return ("zero",)
    model = src.get("model") if isinstance(src, Mapping) else src
    if model not in have:
        raise ParamError(f"tokenizer.tokens['{token}']: its source model {model} has no tensor '{name}'")
    k = have.index(model)
    if isinstance(src, Mapping):
        row = src.get("token_id")
        if row is None:
            row = built.vocabs.get(model, {}).get(src.get("token"))
            if row is None:
                raise ParamError(f"tokenizer.tokens['{token}']: token {src.get('token')!r} is not in {model}'s "
                                 "vocabulary")  # fmt: skip
        if not 0 <= int(row) < rows[model]:
            raise ParamError(f"tokenizer.tokens['{token}']: token id {row} is outside {model}'s '{name}' "
                             f"({rows[model]} rows)")  # fmt: skip
        return ("model", k, int(row))
    if perms[k, i] < 0:
        raise ParamError(f"tokenizer.tokens['{token}']: {model} does not have this token")
    return ("model", k, int(perms[k, i]))


def _write(plans: dict[str, dict[str, Any]], readers: dict[str, _Reader], files: dict[str, str], n: int,
           padded: int, spec: Spec, tokens: list[str]) -> None:  # fmt: skip
    import torch

    layout: dict[str, dict[str, Any]] = {p: {} for p in readers}
    offsets = {p: 0 for p in readers}
    for name, pl in plans.items():
        row_bytes = int(np.prod(pl["shape"][1:], dtype=np.int64)) * torch.finfo(pl["dtype"]).bits // 8
        for p in pl["have"]:
            size = row_bytes * padded
            layout[p][name] = {"dtype": _ST_NAMES[str(pl["dtype"]).removeprefix("torch.")], "shape": pl["shape"],
                               "data_offsets": [offsets[p], offsets[p] + size]}  # fmt: skip
            offsets[p] += size
        pl["row_bytes"] = row_bytes
    handles = {}
    starts = {}
    try:
        for p, entries in layout.items():
            if not entries:
                continue
            text = json.dumps(entries).encode()
            text += b" " * (-len(text) % 8)
            f = open(files[p], "wb")  # noqa: SIM115 — closed below
            handles[p] = f
            f.write(len(text).to_bytes(8, "little") + text)
            f.truncate(8 + len(text) + offsets[p])
            starts[p] = 8 + len(text)
        forced = {t for t, c in spec.tokens.items() if c.get("force")}
        forced_ids = np.array([i for i, t in enumerate(tokens) if t in forced], dtype=np.int64)
        for name, pl in plans.items():
            sums = {p: torch.zeros(pl["shape"][1:], dtype=torch.float64) for p in pl["have"]}
            for r0 in range(0, n, BLOCK_ROWS):
                r1 = min(n, r0 + BLOCK_ROWS)
                blocks = _block(name, pl, readers, r0, r1, forced_ids)
                for p, b in blocks.items():
                    if padded > n:
                        sums[p] += b.to(torch.float64).sum(0)
                    off = starts[p] + layout[p][name]["data_offsets"][0] + r0 * pl["row_bytes"]
                    os.pwrite(handles[p].fileno(), _bytes(b), off)
            if padded > n:
                for p in pl["have"]:
                    # The mean of the vocabulary's rows (mergekit: torch.mean in the dtype; here
                    # summed in f64 and rounded once).
                    mean = (sums[p] / n).to(pl["dtype"])
                    pad = mean.expand(padded - n, *mean.shape).contiguous()
                    off = starts[p] + layout[p][name]["data_offsets"][0] + n * pl["row_bytes"]
                    os.pwrite(handles[p].fileno(), _bytes(pad), off)
        for f in handles.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in handles.values():
            f.close()


def _bytes(t: Any) -> bytes:
    import torch

    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _block(name: str, pl: dict[str, Any], readers: dict[str, _Reader], r0: int, r1: int,
           forced_ids: np.ndarray) -> dict[str, Any]:  # fmt: skip
    """Output rows r0..r1 of tensor ``name`` for every model that has it."""
    import torch

    have, perms, dt, sources = pl["have"], pl["perms"], pl["dtype"], pl["sources"]
    tail = pl["shape"][1:]
    need = np.array([i for i in range(r0, r1) if i in sources], dtype=np.int64)
    dflt = torch.zeros((len(need), *tail), dtype=dt)  # zero sources stay zero
    kind = [sources[int(i)][0] for i in need]
    avg = np.array([j for j, k in enumerate(kind) if k == "avg"], dtype=np.int64)
    if len(avg):
        acc = torch.zeros((len(avg), *tail), dtype=dt)
        count = np.zeros(len(avg), dtype=np.int64)
        for k, p in enumerate(have):  # in mergekit's order: each sum is rounded in it
            src = perms[k, need[avg]]
            m = src >= 0
            if m.any():
                sel = torch.from_numpy(np.nonzero(m)[0])
                acc[sel] = acc[sel] + readers[p].rows(name, src[m], dt)
                count += m
        for c in np.unique(count):
            sel = torch.from_numpy(np.nonzero(count == c)[0])
            acc[sel] = acc[sel] / int(c)
        dflt[torch.from_numpy(avg)] = acc
    for k, p in enumerate(have):
        js = np.array([j for j, i in enumerate(need) if kind[j] == "model" and sources[int(i)][1] == k],
                      dtype=np.int64)  # fmt: skip
        if len(js):
            rows = np.array([sources[int(need[j])][2] for j in js], dtype=np.int64)
            dflt[torch.from_numpy(js)] = readers[p].rows(name, rows, dt)
    forced = np.isin(np.arange(r0, r1), forced_ids)
    out = {}
    for k, p in enumerate(have):
        b = torch.zeros((r1 - r0, *tail), dtype=dt)
        src = perms[k, r0:r1]
        own = (src >= 0) & ~forced
        if own.any():
            b[torch.from_numpy(np.nonzero(own)[0])] = readers[p].rows(name, src[own], dt)
        use = ~own[need - r0]
        if use.any():
            b[torch.from_numpy(need[use] - r0)] = dflt[torch.from_numpy(np.nonzero(use)[0])]
        out[p] = b
    return out
