"""The tokenizer a mergekit config builds (``tokenizer_source: base|union|<model>``, the
``tokenizer:`` block, ``chat_template``), as mergekit 0.1.5 builds it (``tokenizer/build.py``,
``tokenizer/embed.py``, ``merge.py``), and the inputs' vocabulary tensors (embeddings, heads)
realigned to it.

The tokenizers are read and written with transformers (never with remote code). The realigned
tensors are written, row block by row block, into temporary safetensors files that the core lays
over the inputs' own tensors: memory stays a block of rows per model, whatever the vocabulary.
Rows follow mergekit's rules: a token a model has takes that model's row; one it lacks takes,
in this order, the row the ``tokens`` block names, the only model that has it, the base's, or
the average over the models that have it (computed in the config's dtype as mergekit does);
padding rows (``pad_to_multiple_of``) the mean of the vocabulary's rows.
"""

from __future__ import annotations

import contextvars
import json
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ._rust import ParamError
from .recipe import RecipeWarning

#: Names of the tensors with a vocabulary axis (axis 0), as mergekit's architecture files list
#: them for the families people merge.
VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight",
                  "word_embeddings.weight", "tok_embeddings.weight", "lm_head.decoder.weight", "output.weight",
                  "shared.weight", "output_layer.weight")  # fmt: skip
#: Rows read per block.
BLOCK_ROWS = 4096
#: Tokenizer files larger than this are not read (a vocabulary of millions of tokens is ~100 MB).
MAX_TOKENIZER_FILE = 256 << 20
#: The files a tokenizer is loaded from (config.json tells transformers the tokenizer's class).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
                    "config.json")  # fmt: skip
#: Where loaded tokenizers' files are copied: the run's work directory (set by :func:`prepare`).
_STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("weightweave_tokenizer_stage", default=None)
#: Templates mergekit knows by name; their text is ours (same rendering, tested).
TEMPLATES_DIR = os.path.join(os.path.dirname(__file__), "chat_templates")


@dataclass
class Spec:
    """What a config asks for. ``source``: "base", "union" or a model's path; ``tokens``:
    token → {"source": path | {"kind": "zero"} | {"kind": "model_token", "model": path, "token_id"
    or "token"}, "force": bool}."""

    source: str | None
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None


def _deps():
    try:
        import safetensors  # noqa: F401
        import torch  # noqa: F401
        import transformers
    except ImportError:
        raise ParamError("building a tokenizer (tokenizer_source, tokenizer, chat_template) needs transformers and "
                         "torch: pip install 'weightweave[tokenizer]'") from None  # fmt: skip
    return transformers


def _model_dir(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _roots(d: str) -> list[str]:
    """Where a model directory's files may lead: the directory, and for a Hugging Face cache
    snapshot (``models--org--name/snapshots/REV/``) that repository's ``blobs/`` (as the writer's
    companions are confined)."""
    real = os.path.realpath(d)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.realpath(os.path.join(os.path.dirname(parent), "blobs")))
    return roots


def _staged(d: str, into: str) -> None:
    """Copies the tokenizer files of model directory ``d`` into ``into``, each a regular file within
    ``d`` (or its cache's blobs) of at most MAX_TOKENIZER_FILE bytes: a file linked out of the
    directory (``tokenizer_config.json -> ~/.secrets.json``) is refused, never loaded, since the
    tokenizer is saved back into the output."""
    roots = _roots(d)
    for f in _TOKENIZER_FILES:
        p = os.path.join(d, f)
        if not os.path.lexists(p):
            continue
        real = os.path.realpath(p)
        if not any(real == r or real.startswith(r + os.sep) for r in roots):
            raise ParamError(f"{p}: a link out of its model directory (to {real}); a tokenizer is read only from "
                             "files inside it")  # fmt: skip
        if not os.path.isfile(real):
            raise ParamError(f"{p}: not a regular file")
        size = os.path.getsize(real)
        if size > MAX_TOKENIZER_FILE:
            raise ParamError(f"{p}: a tokenizer file of {size} bytes (at most {MAX_TOKENIZER_FILE})")
        with open(real, "rb") as src, open(os.path.join(into, f), "wb") as dst:
            dst.write(src.read(MAX_TOKENIZER_FILE + 1)[:MAX_TOKENIZER_FILE])


def _load(path: str):
    """The tokenizer of the model at ``path``, loaded from a private copy of its tokenizer files."""
    transformers = _deps()
    d = _model_dir(path)
    # The copy lives as long as the run's work directory: a slow tokenizer saves its vocabulary
    # file from where it was loaded.
    staged = tempfile.mkdtemp(prefix="tok-", dir=_STAGE.get())
    _staged(d, staged)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoTokenizer.from_pretrained(staged, trust_remote_code=False,
                                                              local_files_only=True, use_fast=True)  # fmt: skip
    except Exception as e:  # noqa: BLE001 — transformers raises many kinds; one message names the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParamError(f"{path}: no tokenizer loads from {d} ({first})") from None


def vocab_size(path: str) -> int | None:
    """The model's vocabulary size as its config.json says (top level, else ``text_config``)."""
    p = os.path.join(_model_dir(path), "config.json")
    try:
        with open(p, "rb") as f:
            cfg = json.loads(f.read(16 << 20))
    except (OSError, ValueError):
        return None
    v = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    if v is None and isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _stripped(path: str):
    """The base's tokenizer without the tokens at or beyond its model's vocabulary size (mergekit's
    ``get_stripped_tokenizer``)."""
    import tokenizers

    tok = _load(path)
    size = vocab_size(path) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    if not tok.is_fast:
        raise ParamError(f"{path}: the tokenizer has tokens beyond the model's vocabulary ({size}) and no fast "
                         "tokenizer, so they cannot be stripped for a tokenizer merge")  # fmt: skip
    d = json.loads(tok._tokenizer.to_str())
    if d["model"]["type"] != "BPE":
        raise ParamError(f"{path}: the tokenizer has tokens beyond the model's vocabulary ({size}) and is "
                         f"{d['model']['type']}; only BPE tokenizers can be stripped (as in mergekit)")  # fmt: skip
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < size]
    for t in unused:
        d["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:
        toks = m.split(" ") if isinstance(m, str) else m
        return not any(t in unused for t in toks)

    d["model"]["merges"] = [m for m in d["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
    return tok


def _union(base_tok, toks: list[tuple[str, Any]]):
    """mergekit's ``build_union_tokenizer``: the base's tokenizer plus every token of the others,
    plain tokens first, then added tokens (the first settings of each)."""
    transformers = _deps()
    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for path, tok in toks:
        size = vocab_size(path) or tok.vocab_size
        added = tok.added_tokens_decoder
        added_names = {info.content for info in added.values()}
        # In id order (mergekit walks the vocabulary dict, whose order is a hash map's and changes
        # from run to run: the ids it gives added tokens vary; ours do not).
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i >= size or t in added_names:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for i, info in added.items():
            if i < size:
                out_added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as p:
        base_tok.save_pretrained(p, legacy_format=False, safe_serialization=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = transformers.AutoTokenizer.from_pretrained(p, use_fast=True, trust_remote_code=False,
                                                             local_files_only=True)  # fmt: skip
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def _template(spec: Spec, order: list[str]) -> str | None:
    """The chat template to write (mergekit's ``_set_chat_template``)."""
    t = spec.chat_template
    if not t:
        return None
    if t == "auto":
        found = []
        for path in order:
            try:
                tmpl = _load(path).chat_template
            except Exception:  # noqa: BLE001 — as mergekit: a model without a loadable tokenizer is skipped
                continue
            if isinstance(tmpl, dict):
                tmpl = tmpl.get("default")
            if tmpl:
                found.append(tmpl.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(t) < 256 and "\n" not in t and "{" not in t:
        p = os.path.join(TEMPLATES_DIR, t + ".jinja")
        if os.path.basename(p) == t + ".jinja" and os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                return f.read()
    if len(t) < 20 or "{" not in t:
        known = sorted(n[:-6] for n in os.listdir(TEMPLATES_DIR) if n.endswith(".jinja"))
        raise ParamError(f"chat_template: '{t}' is neither a template nor a name mergekit knows "
                         f"({', '.join(known + ['auto'])})")  # fmt: skip
    return t


@dataclass
class Built:
    """The tokenizer built, and per model (by path) where each output token's row comes from:
    its row index, or -1."""

    tokenizer: Any
    perms: dict[str, list[int]]
    vocabs: dict[str, dict[str, int]]


def build(spec: Spec, base: str, order: list[str]) -> Built:
    """mergekit's ``build_tokenizer``; ``base``: base_model (or the first model), ``order``: every
    model referenced, base included, in the config's order."""
    base_tok = _stripped(base)
    toks: list[tuple[str, Any]] = [(base, base_tok)]
    for path in order:
        if path == base:
            continue
        try:
            toks.append((path, _load(path)))
        except Exception as e:  # noqa: BLE001 — as mergekit: assumed the same as the base's
            warnings.warn(f"{path}: its tokenizer does not load ({str(e).splitlines()[0] if str(e) else e!r}); "
                          "taken to be the base's, as mergekit does", RecipeWarning, stacklevel=3)  # fmt: skip
    loaded = dict(toks)
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = _union(base_tok, toks)
    else:
        out = _load(str(spec.source))
    have = set(out.get_vocab())
    for t in spec.tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab_out = out.get_vocab()
    perms: dict[str, list[int]] = {}
    for path in order:
        mv = (loaded.get(path) or base_tok).get_vocab()
        size = vocab_size(path) or len(mv)
        p = [-1] * len(vocab_out)
        for t, new in vocab_out.items():
            old = mv.get(t)
            if old is not None and old < size:
                p[new] = old
        perms[path] = p
    return Built(out, perms, {path: tok.get_vocab() for path, tok in toks})


def prepare(t: dict[str, Any], inputs: list[str], work: str) -> dict[str, Any]:
    """Builds the tokenizer a recipe asks for into ``work`` and realigns the inputs' vocabulary
    tensors to it; returns the merge's extra arguments (the overlays and the tokenizer)."""
    token = _STAGE.set(work)
    try:
        return _prepare(t, inputs, work)
    finally:
        _STAGE.reset(token)


def _prepare(t: dict[str, Any], inputs: list[str], work: str) -> dict[str, Any]:
    from .vocabulary import realign

    spec: Spec = t["spec"]
    order: list[str] = t["order"]
    donor = t["base"] or order[0]
    out = os.path.join(work, "tokenizer")
    if spec.source is None:
        # mergekit builds none then: it re-saves the base's (or first model's) with the template.
        try:
            tok = _load(donor)
        except Exception as e:  # noqa: BLE001 — as mergekit: the merge goes on without a tokenizer
            warnings.warn(f"{donor}: its tokenizer does not load ({str(e).splitlines()[0] if str(e) else e!r}), so "
                          "chat_template is not applied and no tokenizer is written, as in mergekit",
                          RecipeWarning, stacklevel=3)  # fmt: skip
            return {}
        template = _template(spec, order)
        if template:
            tok.chat_template = template
        tok.save_pretrained(out)
        return {"_tokenizer": {"dir": out, "vocab_size": None}}
    built = build(spec, donor, order)
    members = None
    if t.get("ends"):
        first, last = t["ends"]
        # As the core's slices place a tensor (source/slices.rs): before the layers if its name
        # holds embed, wte or wpe, else after them.
        members = lambda name: first if any(k in name for k in ("embed", "wte", "wpe")) else last  # noqa: E731
    overlays = realign(built, spec, inputs, order, t["base"], t["dtype"], t["labels"], work, members)
    template = _template(spec, order)
    if template:
        built.tokenizer.chat_template = template
    built.tokenizer.save_pretrained(out)
    n = len(built.tokenizer.get_vocab())
    m = spec.pad_to_multiple_of
    size = n if not m or n % m == 0 else n + m - n % m
    return {"_overlays": overlays, "_tokenizer": {"dir": out, "vocab_size": size}}
