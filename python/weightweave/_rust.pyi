"""Type stubs for the Rust extension module ``weightweave._rust``."""

from collections.abc import Callable, Sequence
from typing import Any, final

__all__ = [
    "__version__",
    "merge_files",
    "inspect",
    "default_lam",
    "default_params",
    "default_lambdas",
    "search_variable",
    "read_floor",
    "names_matching",
    "plan_buffers",
    "merge_buffers",
    "metagpt_buffers",
    "Session",
    "TensorBuffer",
    "ClusterDriver",
    "merge_unit",
    "gather_unit",
    "WeaveError",
    "HeaderError",
    "MismatchError",
    "NonFiniteError",
    "ParamError",
    "OutputError",
    "WeaveIOError",
    "CancelledError",
]

__version__: str

class WeaveError(Exception): ...
class HeaderError(WeaveError): ...
class MismatchError(WeaveError, ValueError): ...
class NonFiniteError(WeaveError): ...
class ParamError(WeaveError, ValueError): ...
class OutputError(WeaveError): ...
class WeaveIOError(WeaveError, OSError): ...
class CancelledError(WeaveError): ...

_Params = dict[str, float | bool | str]
# method, params, mode, lam, lambdas, search, pool (a name or a function), include_deltas, seed, threads,
# chunk_size, out_dtype, weights, compat, metagpt, lines
_Job = dict[str, Any]
_Progress = Callable[[int, int], object]
_Entry = tuple[str, str, Sequence[int], Any]

def merge_files(
    base: str,
    models: Sequence[str],
    out: str,
    job: _Job,
    *,
    shard_size: int | None = None,
    overwrite: bool = False,
    progress: _Progress | None = None,
) -> dict[str, Any]: ...
def inspect(path: str) -> dict[str, Any]: ...
def default_lam(method: str) -> float: ...
def default_params(method: str) -> dict[str, Any]: ...
def search_variable(method: str) -> str | None: ...
def default_lambdas(method: str) -> list[float] | None: ...
def read_floor(paths: Sequence[str], threads: int | None = None) -> tuple[int, int]: ...
def names_matching(what: str, pattern: str, names: list[str]) -> list[bool]: ...
def plan_buffers(
    base: Sequence[_Entry], models: Sequence[Sequence[_Entry]], job: _Job
) -> list[tuple[str, str, list[int]]]: ...
def merge_buffers(
    base: Sequence[_Entry],
    models: Sequence[Sequence[_Entry]],
    outputs: Sequence[tuple[str, Any]],
    job: _Job,
    *,
    progress: _Progress | None = None,
    given: Sequence[tuple[str, Any]] | None = None,
) -> tuple[list[str], list[str]]: ...
def metagpt_buffers(base: Sequence[_Entry], models: Sequence[Sequence[_Entry]], job: _Job) -> list[float]: ...

def merge_unit(
    base: str, models: Sequence[str], job: _Job, ticket: bytes, *, progress: _Progress | None = None
) -> int: ...

def gather_unit(
    base: str,
    models: Sequence[str],
    job: _Job,
    ticket: bytes,
    known: Sequence[bytes],
    *,
    progress: _Progress | None = None,
) -> tuple[bytes, int]: ...

@final
class ClusterDriver:
    """The driver of a cluster merge (see `weightweave.cluster`)."""

    def __new__(
        cls,
        base: str,
        models: Sequence[str],
        out: str,
        job: _Job,
        *,
        shard_size: int | None = None,
        overwrite: bool = False,
    ) -> ClusterDriver: ...
    def units(self, n: int, only: Sequence[int] | None = None) -> list[tuple[list[int], int]]: ...
    def tensors(self) -> list[tuple[str, str, list[int], bool]]: ...
    def needs_model_stats(self) -> bool: ...
    def gather(self, known: Sequence[bytes], partials: Sequence[bytes] | None = None) -> tuple[str, bytes | None]: ...
    def ticket(self, tensors: Sequence[int], model: bytes) -> bytes: ...
    def publish(self, done: Sequence[Sequence[int]], bytes_read: int) -> dict[str, Any]: ...
    def abort(self) -> None: ...

@final
class TensorBuffer:
    """Read-only bytes of one tensor inside a memory map (buffer protocol)."""

    def __len__(self) -> int: ...

@final
class Session:
    """A merge whose 2-D tensors' M is computed by the caller (the torch backend)."""

    def __new__(
        cls,
        base: str,
        models: Sequence[str],
        out: str,
        job: _Job,
        *,
        shard_size: int | None = None,
        overwrite: bool = False,
    ) -> Session: ...
    @staticmethod
    def unit(base: str, models: Sequence[str], job: _Job, ticket: bytes) -> Session: ...
    def finish_unit(self) -> int: ...
    def mine(self) -> list[int]: ...
    def tensors(self) -> list[tuple[str, str, list[int], bool]]: ...
    def inputs(self, i: int) -> tuple[tuple[str, TensorBuffer], list[tuple[str, TensorBuffer]]]: ...
    def prefetch(self, i: int) -> None: ...
    def write(self, i: int, m: Any | None = None) -> None: ...
    def resolve_weights(self, progress: _Progress | None = None) -> list[float] | None: ...
    def progress(self) -> tuple[int, int]: ...
    def delta(self, i: int, t: int, weight: float | None = None) -> tuple[bytearray, bool]: ...
    def check_finite(self, i: int) -> None: ...
    def complete(self) -> None: ...
    def publish(self) -> dict[str, Any]: ...
    def abort(self) -> None: ...
