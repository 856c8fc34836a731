"""TSV and Iso-C on torch: CUDA when available, CPU otherwise; streamed tensor by tensor.

The Rust core hands each 2-D tensor's inputs over zero-copy (buffers over the memory maps);
a producer thread converts one task's delta at a time to f32 on the device, ahead of the
consumer (a queue of two), while the OS is already reading the next tensor (``madvise``). The
consumer folds each delta into the method's running state — TSV keeps only the top-k singular
triplets of each task, Iso-C a running sum — so device memory holds a few copies of the largest
tensor whatever the number of tasks. M goes back to the core, which pools it with the deltas and
writes it like any other method. Tensors that are not 2-D (or match ``svd_exclude``) take the mean
of the deltas, computed in Rust without crossing into Python.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import _rust
from ._rust import ParamError, Session

SVD_METHODS = ("tsv", "iso_c")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ParamError(f"device: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ParamError(f"device: '{device}' is not supported; use 'cpu' or 'cuda' (or 'cuda:N')")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParamError("device: CUDA was requested but is not available")
    return dev


def check_options(device: str | torch.device | None = None, svd_exclude: str | None = None) -> None:
    """Validates the backend's own options before any file is touched."""
    pick_device(device)
    if svd_exclude is not None and not isinstance(svd_exclude, str):
        raise ParamError(f"svd_exclude must be a regular expression string, got {type(svd_exclude).__name__}")
    svd_targets([], svd_exclude)


class TsvState:
    """Task Singular Vectors, folded in one task at a time (SPEC.md's TSV)."""

    def __init__(self, shape: Sequence[int], tasks: int, device: torch.device) -> None:
        m, n = shape
        self.r = min(m, n)
        self.k = max(1, int(self.r / tasks))
        self.u = torch.zeros(m, self.r, device=device)
        self.s = torch.zeros(self.r, device=device)
        self.vt = torch.zeros(self.r, n, device=device)

    def add(self, t: int, delta: torch.Tensor) -> None:
        start = t * self.k
        if start >= self.r:
            return  # more tasks than rank: this task's slot lies past r
        end = min(start + self.k, self.r)
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        w = end - start
        self.u[:, start:end] = u[:, :w]
        self.s[start:end] = s[:w]
        self.vt[start:end] = vt[:w]

    def result(self) -> torch.Tensor:
        uu, _, vu = torch.linalg.svd(self.u, full_matrices=False)
        uv, _, vv = torch.linalg.svd(self.vt, full_matrices=False)
        return ((uu @ vu) * self.s) @ (uv @ vv)


class IsoCState:
    """Iso-C: the sum of deltas, then its spectrum made isotropic."""

    def __init__(self, shape: Sequence[int], tasks: int, device: torch.device) -> None:
        self.sum = torch.zeros(*shape, device=device)

    def add(self, t: int, delta: torch.Tensor) -> None:
        self.sum += delta

    def result(self) -> torch.Tensor:
        u, s, vt = torch.linalg.svd(self.sum, full_matrices=False)
        return (u * s.mean()) @ vt


STATES: dict[str, Callable[..., Any]] = {"tsv": TsvState, "iso_c": IsoCState}


def _load(buf: Any, dtype: str, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A tensor's bytes (a read-only buffer over the map) as f32 on `device` (never in place)."""
    with warnings.catch_warnings():
        # The buffer is read-only and only ever read: torch's warning about that does not apply.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(buf, dtype=_DTYPES[dtype]) if len(buf) else torch.zeros(0, dtype=_DTYPES[dtype])
    return raw.reshape(tuple(shape)).to(device=device, dtype=torch.float32)


def _fits(shape: Sequence[int], device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    m, n = shape
    need = 8 * m * n * 4  # state, two deltas in flight, SVD outputs and workspace
    free, _ = torch.cuda.mem_get_info(device)
    return need < free


def svd_targets(tensors: Sequence[tuple[str, str, list[int], bool]], svd_exclude: str | None) -> list[int]:
    """Indices of the tensors whose M comes from the SVD method: mergeable, 2-D, not excluded."""
    if not svd_exclude:
        excluded = [False] * len(tensors)
    else:
        # Rust's linear-time engine, not `re`: a pattern such as '(a+)+$' cannot stall the run.
        excluded = _rust.names_matching("svd_exclude", svd_exclude, [t[0] for t in tensors])
    return [
        i
        for i, ((_, _, shape, merged), skip) in enumerate(zip(tensors, excluded, strict=True))
        if merged and len(shape) == 2 and not skip
    ]


def run_session(
    sess: Session,
    method: str,
    device: str | torch.device | None = None,
    svd_exclude: str | None = None,
    progress: Callable[[int, int], object] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Computes M for every 2-D tensor of an open session, then finishes it. ``weights`` scale
    each task's delta (τ'_t = w_t·τ_t), as the core does for the other tensors."""
    dev = pick_device(device)
    tensors = sess.tensors()
    targets = svd_targets(tensors, svd_exclude)
    if targets:
        tasks = len(sess.inputs(targets[0])[1])
    jobs = []
    for i in targets:
        shape = tensors[i][2]
        on = dev
        if not _fits(shape, dev):
            warnings.warn(
                f"{tensors[i][0]} {shape}: the SVD does not fit on {dev}; computing it on the CPU",
                RuntimeWarning,
                stacklevel=2,
            )
            on = torch.device("cpu")
        jobs.append((i, shape, on))

    q: queue.Queue[Any] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            for k, (i, shape, on) in enumerate(jobs):
                if k + 1 < len(jobs):
                    sess.prefetch(jobs[k + 1][0])
                (bdt, bbuf), models = sess.inputs(i)
                base = _load(bbuf, bdt, shape, on)
                if not bool(torch.isfinite(base).all()):
                    sess.check_finite(i)  # raises NonFiniteError naming file, tensor, element
                for t, (mdt, mbuf) in enumerate(models):
                    delta = _load(mbuf, mdt, shape, on) - base
                    if weights is not None:
                        delta = delta * torch.tensor(float(weights[t]), dtype=torch.float32)
                    if not bool(torch.isfinite(delta).all()):
                        sess.check_finite(i)
                    while not stop.is_set():
                        try:
                            q.put((i, t, delta), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                del base
            q.put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(e)

    producer = threading.Thread(target=produce, name="weightweave-prefetch", daemon=True)
    producer.start()
    try:
        state = None
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            i, t, delta = item
            if t == 0:
                state = STATES[method](tensors[i][2], tasks, delta.device)
            assert state is not None
            state.add(t, delta)
            del delta
            if t == tasks - 1:
                m = state.result().to("cpu", torch.float32).contiguous()
                state = None
                sess.write(i, m.numpy().reshape(-1))
                if progress is not None:
                    progress(*sess.progress())
        sess.complete()
        if progress is not None:
            # The last report comes before the publish: a callback that raises here (or a
            # Ctrl-C it surfaces) leaves nothing behind.
            total = sess.progress()[1]
            progress(total, total)
        return sess.publish()
    except BaseException:
        stop.set()
        sess.abort()
        raise
    finally:
        stop.set()
        producer.join()


def merged_tensors(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    device: str | torch.device | None = None,
    svd_exclude: str | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """M of every 2-D mergeable tensor of in-memory state dicts (f32, CPU), for the array API.
    ``weights`` scale each task's delta (τ'_t = w_t·τ_t)."""
    dev = pick_device(device)
    entries = [(n, "", list(t.shape), t.is_floating_point() and t.dtype in _DTYPES.values()) for n, t in base.items()]
    out = {}
    for i in svd_targets(entries, svd_exclude):
        name = entries[i][0]
        b = base[name].to(dev, torch.float32)
        state = STATES[method](entries[i][2], len(models), dev)
        for t, m in enumerate(models):
            delta = m[name].to(dev, torch.float32) - b
            state.add(t, delta if weights is None else delta * float(weights[t]))
        out[name] = state.result().to("cpu", torch.float32).contiguous()
    return out
