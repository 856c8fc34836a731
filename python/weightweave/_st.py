"""A minimal safetensors writer for the demo's generated checkpoints (no extra dependency).

Production reading and writing happen in Rust; this only writes small files the demo makes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """f32 → bf16 bit patterns, rounding to nearest even (finite inputs)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def save(
    tensors: Mapping[str, tuple[str, np.ndarray]], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``name -> (dtype, array)``; for ``"BF16"`` the array holds the bit patterns."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs, offset = [], 0
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def dtype_name(arr: np.ndarray) -> str:
    return _DTYPES[arr.dtype]
