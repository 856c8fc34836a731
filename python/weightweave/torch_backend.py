"""TSV, Iso-C, Iso-CTS and WUDI on torch: CUDA when available, CPU otherwise; streamed tensor by tensor.

The Rust core hands each 2-D tensor's inputs over zero-copy (buffers over the memory maps);
a producer thread converts one task's delta at a time to f32 on the device, ahead of the
consumer (a queue of two), while the OS is already reading the next tensor (``madvise``). The
consumer folds each delta into the method's running state — TSV keeps only the top-k singular
triplets of each task, Iso-C a running sum — so device memory holds a few copies of the largest
tensor whatever the number of tasks (Iso-CTS projects every task's delta on the common subspace
of their sum, and WUDI descends on a loss over all T, so both keep the T deltas of the tensor).
M goes back to the core, which pools it with the deltas and writes it like any other method.
Tensors that are not 2-D (or match ``svd_exclude``) take the mean of the deltas, computed in Rust
without crossing into Python.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from . import _rust
from ._rust import ParamError, Session

SVD_METHODS = ("tsv", "iso_c", "iso_cts", "wudi")
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


def iso_cts_split(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """Iso-CTS's split of the rank r: (columns of the common subspace, columns per task), as its
    reference computes them (the task-specific total rounded, half to even, to a multiple of T)."""
    common = int(r * fraction)
    specific = round((r - common) / tasks) * tasks
    common = r - specific
    return common, int((r - common) / tasks)


def check_iso_cts(name: str, shape: Sequence[int], tasks: int, fraction: float) -> None:
    """Refuses a tensor whose split would leave the common subspace a negative size (the reference
    slices from the end then: a silently wrong merge)."""
    r = min(shape)
    common, _ = iso_cts_split(r, tasks, fraction)
    if common < 0:
        raise ParamError(
            f"iso_cts: tensor '{name}' {list(shape)} has rank {r}, too small to give {tasks} models equal "
            f"task-specific subspaces with common_space_fraction {fraction} (raise common_space_fraction, "
            "or leave the tensor out with svd_exclude)"
        )


class IsoCtsState:
    """Iso-CTS (SPEC.md): a common subspace from the SVD of Σ τ_t, each task's top directions
    outside it, the stacked bases orthogonalised, an isotropic spectrum."""

    def __init__(self, shape: Sequence[int], tasks: int, device: torch.device,
                 common_space_fraction: float = 0.8) -> None:  # fmt: skip
        self.shape, self.tasks, self.fraction = tuple(shape), tasks, common_space_fraction
        self.deltas: list[torch.Tensor] = []

    def add(self, t: int, delta: torch.Tensor) -> None:
        self.deltas.append(delta)

    def result(self) -> torch.Tensor:
        r = min(self.shape)
        common, per_task = iso_cts_split(r, self.tasks, self.fraction)
        total = self.deltas[0]
        for d in self.deltas[1:]:
            total = total + d
        u, s, vt = torch.linalg.svd(total, full_matrices=False)
        u_c, s_c, vt_c = u[:, :common], s[:common], vt[:common, :]
        u_all = torch.zeros(self.shape[0], r, device=total.device)
        s_all = torch.zeros(r, device=total.device)
        vt_all = torch.zeros(r, self.shape[1], device=total.device)
        for i, w in enumerate(self.deltas):
            if per_task == 0:
                break
            # The part of τ_i outside the common subspace, in the reference's order: (U_c U_cᵀ) τ_i.
            w_ts = w - u_c @ u_c.T @ w
            u_ts, s_ts, vt_ts = torch.linalg.svd(w_ts, full_matrices=False)
            lo, hi = i * per_task, (i + 1) * per_task
            u_all[:, lo:hi] = u_ts[:, :per_task]
            s_all[lo:hi] = s_ts[:per_task]
            vt_all[lo:hi, :] = vt_ts[:per_task, :]
        self.deltas = []
        at = self.tasks * per_task
        u_all[:, at : at + common] = u_c
        s_all[at : at + common] = s_c
        vt_all[at : at + common, :] = vt_c
        uu, _, vu = torch.linalg.svd(u_all, full_matrices=False)
        uv, _, vv = torch.linalg.svd(vt_all, full_matrices=False)
        s_iso = torch.ones_like(s_all) * s_all.mean()
        return torch.linalg.multi_dot((uu @ vu, torch.diag(s_iso), uv @ vv))


class WudiState:
    """WUDI (SPEC.md; FusionBench's ``wudi_merging``): M starts at Σ τ_t and takes ``steps`` Adam
    steps (learning rate ``lr``, no weight decay) on Σ_t ‖(M − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F."""

    def __init__(self, shape: Sequence[int], tasks: int, device: torch.device, steps: int = 400,
                 lr: float = 1e-5) -> None:  # fmt: skip
        self.steps, self.lr = steps, lr
        self.deltas: list[torch.Tensor] = []

    def add(self, t: int, delta: torch.Tensor) -> None:
        self.deltas.append(delta)

    def result(self) -> torch.Tensor:
        tvs = torch.stack(self.deltas)
        self.deltas = []
        m = torch.nn.Parameter(torch.sum(tvs, dim=0))
        norms = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
        # A zero τ_t interferes with nothing: its term (0/0 in the reference, which then turns M
        # into NaN) is left out.
        keep = norms > 0
        tvs, norms = tvs[keep], norms[keep]
        opt = torch.optim.Adam([m], lr=self.lr, weight_decay=0)
        with torch.enable_grad():
            for _ in range(self.steps if len(tvs) else 0):
                product = torch.matmul(m.unsqueeze(0) - tvs, tvs.transpose(1, 2))
                loss = torch.sum(torch.square(product) / norms.unsqueeze(-1).unsqueeze(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return m.detach()


STATES: dict[str, Callable[..., Any]] = {"tsv": TsvState, "iso_c": IsoCState, "iso_cts": IsoCtsState,
                                         "wudi": WudiState}  # fmt: skip

# Methods whose state keeps the tensor's T deltas (the GPU fit check counts them).
_HOLDS_DELTAS = ("iso_cts", "wudi")


def _state_options(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method parameters a state takes (Iso-CTS's common_space_fraction; WUDI's steps, lr)."""
    p = params or {}
    if method == "iso_cts":
        return {"common_space_fraction": float(p.get("common_space_fraction", 0.8))}
    if method == "wudi":
        return {"steps": int(p.get("steps", 400)), "lr": float(p.get("lr", 1e-5))}
    return {}


def _fits(shape: Sequence[int], device: torch.device, held: int = 0) -> bool:
    if device.type != "cuda":
        return True
    m, n = shape
    need = (8 + held) * m * n * 4  # state, two deltas in flight, SVD outputs and workspace, held deltas
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


def _check_targets(method: str, tensors: Sequence[tuple[str, str, list[int], bool]], targets: Sequence[int],
                   tasks: int, opts: Mapping[str, Any]) -> None:  # fmt: skip
    """Refuses, before any work, a tensor the method cannot merge (Iso-CTS's split)."""
    if method == "iso_cts":
        for i in targets:
            check_iso_cts(tensors[i][0], tensors[i][2], tasks, opts["common_space_fraction"])


def _compute(
    sess: Session,
    method: str,
    dev: torch.device,
    targets: Sequence[int],
    weights: Sequence[float] | None,
    opts: Mapping[str, Any],
    progress: Callable[[int, int], object] | None,
) -> None:
    """Computes M of each target tensor and hands it to the session, which pools and writes it."""
    tensors = sess.tensors()
    tasks = len(sess.inputs(targets[0])[1]) if targets else 0
    _check_targets(method, tensors, targets, tasks, opts)
    jobs = []
    for i in targets:
        shape = tensors[i][2]
        on = dev
        if not _fits(shape, dev, tasks if method in _HOLDS_DELTAS else 0):
            warnings.warn(
                f"{tensors[i][0]} {shape}: the SVD does not fit on {dev}; computing it on the CPU",
                RuntimeWarning,
                stacklevel=3,
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
                for t in range(tasks):
                    # Decoded and differenced in Rust with the GIL released: no torch operation
                    # here, beside the SVD, to compete for torch's threads.
                    data, finite = sess.delta(i, t, None if weights is None else float(weights[t]))
                    if not finite:
                        sess.check_finite(i)  # raises NonFiniteError naming file, tensor, element
                    if len(data):
                        delta = torch.frombuffer(data, dtype=torch.float32).reshape(tuple(shape))
                    else:
                        delta = torch.zeros(tuple(shape))
                    if on.type != "cpu":
                        delta = delta.to(on)
                    while not stop.is_set():
                        try:
                            q.put((i, t, delta), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
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
                state = STATES[method](tensors[i][2], tasks, delta.device, **opts)
            assert state is not None
            state.add(t, delta)
            del delta
            if t == tasks - 1:
                m = state.result().to("cpu", torch.float32).contiguous()
                state = None
                sess.write(i, m.numpy().reshape(-1))
                if progress is not None:
                    progress(*sess.progress())
    finally:
        stop.set()
        producer.join()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (restored after; None: unchanged). On the
    CPU, LAPACK's SVD differs in its last bits with the number of threads, so a run that pins them
    is reproducible on any machine, and a cluster unit (one thread by default) gives the output of
    a local run with the same ``threads``."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def run_session(
    sess: Session,
    method: str,
    device: str | torch.device | None = None,
    svd_exclude: str | None = None,
    progress: Callable[[int, int], object] | None = None,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Computes M for every 2-D tensor of an open session, then finishes it. ``weights`` scale
    each task's delta (τ'_t = w_t·τ_t), as the core does for the other tensors; ``params`` are the
    method's (Iso-CTS's common_space_fraction); ``threads``: torch's threads (default: torch's)."""
    dev = pick_device(device)
    try:
        # MetaGPT's weights take a pass over the inputs before any tensor: the core's weights
        # then serve the deltas here and every tensor it computes itself.
        weights = sess.resolve_weights(progress)
        with _torch_threads(threads):
            _compute(sess, method, dev, svd_targets(sess.tensors(), svd_exclude), weights,
                     _state_options(method, params), progress)  # fmt: skip
        sess.complete()
        if progress is not None:
            # The last report comes before the publish: a callback that raises here (or a
            # Ctrl-C it surfaces) leaves nothing behind.
            total = sess.progress()[1]
            progress(total, total)
        return sess.publish()
    except BaseException:
        sess.abort()
        raise


def run_unit(
    sess: Session,
    method: str,
    device: str | torch.device | None = None,
    svd_exclude: str | None = None,
    params: Mapping[str, Any] | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> int:
    """A cluster unit's share (``Session.unit``): M of its 2-D tensors, the rest as a local run
    writes them; returns the bytes read. The weights are the job's (MetaGPT's are refused);
    ``progress(done, total)`` follows the unit's own bytes, tensor by tensor."""
    dev = pick_device(device)
    try:
        mine = set(sess.mine())
        targets = [i for i in svd_targets(sess.tensors(), svd_exclude) if i in mine]
        with _torch_threads(threads):
            _compute(sess, method, dev, targets, sess.resolve_weights(), _state_options(method, params), progress)
        sess.complete()
        return sess.finish_unit()
    except BaseException:
        sess.abort()
        raise


def check_targets(method: str, tensors: Sequence[tuple[str, str, list[int], bool]], tasks: int,
                  svd_exclude: str | None, params: Mapping[str, Any] | None) -> list[int]:  # fmt: skip
    """A cluster driver's check before any work: the tensors whose M the method computes."""
    targets = svd_targets(tensors, svd_exclude)
    _check_targets(method, tensors, targets, tasks, _state_options(method, params))
    return targets


def gpu_share(shape: Sequence[int], tasks: int, method: str) -> float:
    """The fraction of a GPU a cluster unit asks Ray for, by its largest matrix's working set (as
    ``_fits`` counts it) against 16 GiB, the smallest data-centre GPUs': 1/8 steps, at most 1.
    Ray only schedules by it; the unit still checks the memory it finds free."""
    m, n = shape
    need = (8 + (tasks if method in _HOLDS_DELTAS else 0)) * m * n * 4
    eighths = -(-need * 8 // (16 << 30))
    return min(8, max(1, eighths)) / 8


def merged_tensors(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    device: str | torch.device | None = None,
    svd_exclude: str | None = None,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """M of every 2-D mergeable tensor of in-memory state dicts (f32, CPU), for the array API.
    ``weights`` scale each task's delta (τ'_t = w_t·τ_t); ``params`` are the method's."""
    dev = pick_device(device)
    entries = [(n, "", list(t.shape), t.is_floating_point() and t.dtype in _DTYPES.values()) for n, t in base.items()]
    opts = _state_options(method, params)
    targets = svd_targets(entries, svd_exclude)
    if method == "iso_cts":
        for i in targets:
            check_iso_cts(entries[i][0], entries[i][2], len(models), opts["common_space_fraction"])
    out = {}
    for i in targets:
        name = entries[i][0]
        b = base[name].to(dev, torch.float32)
        state = STATES[method](entries[i][2], len(models), dev, **opts)
        for t, m in enumerate(models):
            delta = m[name].to(dev, torch.float32) - b
            state.add(t, delta if weights is None else delta * float(weights[t]))
        out[name] = state.result().to("cpu", torch.float32).contiguous()
    return out
