"""Hugging Face hub ids in recipes (``org/name``, ``org/name@revision``), resolved as mergekit
0.1.5 resolves them (``common.py``: a reference that is not a local path is a hub repository): a
snapshot in huggingface_hub's cache, else downloaded with it — only ``*.json``, the tokenizer's
files (``tokenizer.model``, ``merges.txt``, ``vocab.txt``, ``*.jinja``) and the weights
(``*.safetensors``, or ``*.bin`` where the repository has no safetensors), never code.
``HF_HUB_CACHE``/``HF_HOME`` and ``HF_HUB_OFFLINE`` are read when a recipe is loaded, so they may
be set after import.
"""

from __future__ import annotations

import os
import re

from ._rust import ParamError

#: What a hub id looks like (huggingface_hub's repo-id rules: a namespace and a name).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: A revision: a branch, tag or commit name (no `..` component, nothing outside these characters),
#: so that a recipe cannot steer huggingface_hub's `refs/<revision>` lookup out of the cache.
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_TRUE = {"1", "true", "yes", "on"}


_FILES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".yaml", ".yml", ".gguf")


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` shaped and not named like a file (``in/missing.safetensors`` is a local path
    that does not exist, not a repository)."""
    path, _, _ = ref.partition("@")
    return bool(HUB_ID.match(path)) and ".." not in path and not path.lower().endswith(_FILES)


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def _offline() -> bool:
    import huggingface_hub.constants as c

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(c.HF_HUB_OFFLINE)


def resolve(ref: str, what: str) -> str:
    """The local directory of hub id ``ref`` (``what`` names it in errors)."""
    if ref.count("@") > 1:
        raise ParamError(f"{what}: '{ref}' has more than one '@' (org/name@revision)")
    repo, _, revision = ref.partition("@")
    if revision and (not REVISION.match(revision) or ".." in revision.split("/")):
        raise ParamError(f"{what}: '{ref}': '{revision}' is not a revision name (a branch, tag or commit)")
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ParamError(f"{what}: '{ref}' is a hub id; resolving it needs huggingface_hub "
                         "(pip install 'weightweave[hub]')") from None  # fmt: skip
    cache, rev = _cache_dir(), revision or None
    # Configs and tokenizer files (a tokenizer is built from them for tokenizer_source / chat_template).
    base = ["*.json", "tokenizer.model", "*.jinja", "merges.txt", "vocab.txt"]
    try:
        # The cache first, as mergekit (through huggingface_hub) finds it.
        return huggingface_hub.snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True,
                                                 allow_patterns=base + ["*.safetensors", "*.bin"])  # fmt: skip
    except LocalEntryNotFoundError:
        pass
    where = cache or huggingface_hub.constants.HF_HUB_CACHE
    if _offline():
        raise ParamError(f"{what}: '{ref}' is a hub id not in the Hugging Face cache ({where}), and "
                         "HF_HUB_OFFLINE is set, so nothing is downloaded") from None  # fmt: skip
    try:
        files = huggingface_hub.list_repo_files(repo, revision=rev)
        weights = "*.safetensors" if any(f.lower().endswith(".safetensors") for f in files) else "*.bin"
        return huggingface_hub.snapshot_download(repo, revision=rev, cache_dir=cache, allow_patterns=base + [weights])
    except Exception as e:  # noqa: BLE001 — network, HTTP and repository errors alike, named in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParamError(f"{what}: '{ref}' is a hub id, neither a local path nor in the Hugging Face cache "
                         f"({where}), and downloading it failed: {first}") from None  # fmt: skip
