"""Beyond one machine: the same merge, bit for bit, spread over a Ray cluster's CPUs and GPUs.

The driver (this process) opens the inputs, plans, and stages the output under its lock as a
local run does, and splits the tensors into units balanced by bytes. The whole-model statistics a
method needs (TIES's and PCB's global scope) are gathered pass by pass: each unit folds its own
tensors into a partial (histogram counts, sign tallies, samples), the driver merges them with the
pass's own merge, exactly as threads' partials are merged in one process. Each unit is a Ray task that calls
the Rust core on its tensors and writes their bytes at their final offsets in the staged files;
it first checks that its node sees the inputs exactly as the driver did, so inputs and the
output's directory must be on one file system every node sees. A unit lost with its node is
run again by Ray (it rewrites the same bytes); the driver publishes, atomically, only once every
unit has reported. Ray is used as it is found: the runtime the caller initialised, else
``RAY_ADDRESS``, else a local one.

The SVD methods (TSV, Iso-C, Iso-CTS, WUDI) run on the torch backend in every unit: the units
holding 2-D tensors ask Ray for a share of a GPU when the cluster has GPUs (by their largest
matrix's working set, ``torch_backend.gpu_share``), a CPU otherwise; the other tensors go to CPU
units, written as a local run writes them.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

from . import _rust
from ._rust import ParamError

HINT = "pip install 'weightweave[ray]'"
#: Times Ray runs a unit again when its worker or node dies.
RETRIES = 3
#: Seconds between a running unit's progress reports to the driver (its first goes at once).
REPORT_EVERY = 0.5


class _Board:
    """A Ray actor beside the driver: each running unit's share done, as it reports it."""

    def __init__(self) -> None:
        self.done: dict[tuple[int, int], float] = {}

    def report(self, key: tuple[int, int], fraction: float) -> None:
        self.done[key] = max(self.done.get(key, 0.0), fraction)

    def fractions(self) -> dict[tuple[int, int], float]:
        return self.done


class _Reporter:
    """A unit's progress callback: sends the share of its work done to the driver's board, at
    most every REPORT_EVERY seconds (Ctrl-C and cancels reach the unit in the same calls)."""

    def __init__(self, board: Any, key: tuple[int, int], hook: Callable[[], object] | None) -> None:
        self.board, self.key, self.hook, self.last = board, key, hook, None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not total or (self.last is not None and now - self.last < REPORT_EVERY):
            return
        self.last = now
        self.board.report.remote(self.key, min(1.0, done / total))
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()


def parse(cluster: object) -> str | None:
    """``None`` (this machine), ``"ray"`` or ``"ray:ADDRESS"`` (``ray:auto``, ``ray:HOST:6379``,
    ``ray:ray://HOST:10001``)."""
    if cluster is None:
        return None
    if not isinstance(cluster, str) or not (cluster == "ray" or cluster.startswith("ray:")):
        raise ParamError(f"cluster must be 'ray' or 'ray:ADDRESS', got {cluster!r}")
    if cluster == "ray:":
        raise ParamError("cluster 'ray:' names no address; give 'ray' to use RAY_ADDRESS or a local runtime")
    return cluster


def _ray():
    try:
        import ray
    except ImportError:
        raise ParamError(f"cluster='ray' needs Ray: {HINT}") from None
    return ray


def _connect(ray: Any, cluster: str) -> None:
    if ray.is_initialized():
        return
    address = cluster[4:] if cluster.startswith("ray:") else os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, log_to_driver=False, configure_logging=False)


def _unit(base: str, models: list[str], job: dict[str, Any], ticket: bytes, hook: Callable[[], object] | None,
          progress: _Reporter | None = None) -> tuple[str, Any]:  # fmt: skip
    """One unit, on whichever node Ray chose: ("ok", bytes read) or ("error", (class, message)).
    Errors are returned, not raised, so that Ray retries only lost workers, never a refusal."""
    if hook is not None:
        hook()
    try:
        return "ok", _rust.merge_unit(base, models, job, ticket, progress=progress)
    except _rust.WeaveError as e:
        return "error", (type(e).__name__, str(e))


def _torch_unit(base: str, models: list[str], job: dict[str, Any], ticket: bytes, svd: dict[str, Any],
                hook: Callable[[], object] | None, progress: _Reporter | None = None) -> tuple[str, Any]:  # fmt: skip
    """A unit of an SVD method on the torch backend: ("ok", (bytes read, warnings)) or an error.
    Warnings (a matrix that did not fit the GPU) go back to the driver, which shows them."""
    if hook is not None:
        hook()
    try:
        from . import torch_backend

        if svd["device"] == "cuda" and not torch_backend.torch.cuda.is_available():
            return "error", ("WeaveError", f"node {os.uname().nodename}: Ray gave a unit a GPU, but torch there sees "
                                           "no CUDA device (install torch with CUDA on every GPU node, or give "
                                           "device='cpu')")  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sess = _rust.Session.unit(base, models, job, ticket)
            read = torch_backend.run_unit(sess, job["method"], svd["device"], svd.get("svd_exclude"), job["params"],
                                          job["threads"], progress)  # fmt: skip
        return "ok", (read, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
    except _rust.WeaveError as e:
        return "error", (type(e).__name__, str(e))
    except Exception as e:  # torch's own (CUDA out of memory, …): the driver raises it, named
        return "error", ("WeaveError", f"a unit failed on {os.uname().nodename}: {type(e).__name__}: {e}")


def _gather(base: str, models: list[str], job: dict[str, Any], ticket: bytes, known: list[bytes],
            progress: _Reporter | None = None) -> tuple[str, Any]:  # fmt: skip
    """A unit's partial of the next statistics pass: ("ok", (partial, bytes read)) or an error."""
    try:
        return "ok", _rust.gather_unit(base, models, job, ticket, known, progress=progress)
    except _rust.WeaveError as e:
        return "error", (type(e).__name__, str(e))


def _check(base: str, models: list[str], job: dict[str, Any], ticket: bytes,
           svd: dict[str, Any] | None) -> tuple[str, Any]:  # fmt: skip
    """A node's view of the inputs and of the staging area against the driver's."""
    if svd is not None:
        return _torch_unit(base, models, job, ticket, dict(svd, device="cpu"), None)
    return _unit(base, models, job, ticket, None)


def _raise(result: tuple[str, Any]) -> Any:
    kind, value = result
    if kind == "ok":
        return value
    name, message = value
    raise getattr(_rust, name, _rust.WeaveError)(message)


def _board(ray: Any) -> Any:
    """The progress board, on the driver's node where there is one (not through Ray Client)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(num_cpus=0)(_Board)
    try:
        here = ray.get_runtime_context().get_node_id()
    except Exception:  # a Ray Client driver is on no node of the cluster
        return actor.remote()
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()


def _alive_nodes(ray: Any) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def _svd_device(svd: dict[str, Any]) -> str | None:
    """The torch backend's device on a cluster: Ray assigns GPUs, so only the kind is given."""
    device = svd.get("device")
    if device is not None and (not isinstance(device, str) or device not in ("cpu", "cuda")):
        raise ParamError(f"device: on a cluster give 'cpu' or 'cuda' (Ray assigns each unit its GPU), got {device!r}")
    return device


def _torch_work(ray: Any, driver: Any, job: dict[str, Any], svd: dict[str, Any], units: int | None,
                cpus: int, tasks: int) -> list[tuple[list[int], int, dict[str, Any], str]]:  # fmt: skip
    """The units of an SVD method: (tensors, bytes read, Ray resources, device). The 2-D tensors'
    units ask for a share of a GPU when the cluster has one (and ``device`` is not ``"cpu"``); the
    other tensors' units, a CPU."""
    from . import torch_backend

    device = _svd_device(svd)
    tensors = driver.tensors()
    targets = torch_backend.check_targets(job["method"], tensors, tasks, svd.get("svd_exclude"), job["params"])
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if device == "cuda" and gpus <= 0:
        raise ParamError("device 'cuda': the Ray cluster has no GPU (give 'cpu', or leave device out)")
    threads = job.get("threads") or 1
    chosen = set(targets)
    rest = [i for i in range(len(tensors)) if i not in chosen]
    work = [(u, b, {"num_cpus": threads}, "cpu") for u, b in driver.units(units or 2 * cpus, rest)]
    if targets and gpus > 0 and device != "cpu":
        share = max(torch_backend.gpu_share(tensors[i][2], tasks, job["method"]) for i in targets)
        n = units or max(1, 2 * int(gpus / share))
        work += [(u, b, {"num_cpus": 1, "num_gpus": share}, "cuda") for u, b in driver.units(n, targets)]
    elif targets:
        work += [(u, b, {"num_cpus": threads}, "cpu") for u, b in driver.units(units or 2 * cpus, targets)]
    return work


def run(base: str, models: list[str], out: str, job: dict[str, Any], opts: dict[str, Any],
        progress: Callable[[int, int], object] | None, cluster: str, *, svd: dict[str, Any] | None = None,
        units: int | None = None, hooks: dict[str, Callable[..., object]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Runs a file merge on Ray; returns the report dict a local run returns.

    ``svd``: the torch backend's options (``device``, ``svd_exclude``) for an SVD method.
    ``units``: how many units the tensors are split into (default: twice the cluster's CPUs, so
    that a lost node's share is small and fast nodes take more; for GPU units twice the units
    the GPUs hold at once). ``hooks`` (tests): ``"unit"`` runs in each unit's task before it
    merges; ``"reported"`` in a unit once it sent its first progress report; ``"opened"`` on the
    driver once it staged."""
    ray = _ray()
    if svd is not None:
        _svd_device(svd)
    _connect(ray, cluster)
    hooks = hooks or {}
    threads = job.get("threads") or 1
    unit_job = dict(job, threads=threads)
    # The output records the paths as given; workers start elsewhere, where only absolute
    # paths mean the same files.
    driver = _rust.ClusterDriver(base, models, out, job, **opts)
    base = os.path.abspath(base)
    models = [os.path.abspath(m) for m in models]
    refs: list[Any] = []
    try:
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if threads > largest:
            # Ray would wait forever for a node that large.
            raise ParamError(f"threads={threads}: each unit asks for that many CPUs of one node, and the "
                             f"cluster's largest node has {largest:g}")  # fmt: skip
        if "opened" in hooks:
            hooks["opened"]()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Every node must see the inputs and the staging area as the driver does, before work.
        check = ray.remote(_check)
        probe = driver.ticket([], b"")
        refs = [check.options(num_cpus=0, max_retries=0,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(base, models, unit_job, probe, svd) for node in _alive_nodes(ray)]  # fmt: skip
        for r in refs:
            try:
                result = ray.get(r)
            except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError,
                    ray.exceptions.WorkerCrashedError):  # fmt: skip
                # A node that left since it was listed runs no unit (and each unit checks again).
                continue
            _raise(result)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if svd is not None:
            work = _torch_work(ray, driver, job, svd, units, cpus, len(models))
        else:
            work = [(u, b, {"num_cpus": threads}, "") for u, b in driver.units(units or 2 * cpus)]
        total = sum(w[1] for w in work)
        state = {"read": 0, "done": 0, "total": total, "round": 0}
        # Running units report the share of their work done to a board beside the driver.
        board = _board(ray) if progress else None

        def reporter(i: int) -> _Reporter | None:
            if board is None:
                return None
            return _Reporter(board, (state["round"], i), hooks.get("reported"))

        def wait_all(refs: list[Any], bytes_of: list[int]) -> list[Any]:
            """Results in order; progress from finished units' bytes and running units' reported
            shares (Ctrl-C lands here, between waits)."""
            of = {r: i for i, r in enumerate(refs)}
            results: list[Any] = [None] * len(refs)
            finished: set[int] = set()
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.1)
                for r in ready:
                    results[of[r]] = _raise(ray.get(r))
                    state["done"] += bytes_of[of[r]]
                    finished.add(of[r])
                if progress:
                    shares = ray.get(board.fractions.remote()) if pending else {}
                    running = sum(bytes_of[i] * f for (k, i), f in shares.items()
                                  if k == state["round"] and i not in finished)  # fmt: skip
                    progress(min(state["done"] + int(running), state["total"]), state["total"])
            state["round"] += 1
            return results

        model = b""
        if driver.needs_model_stats():
            # The whole-model statistics, one pass at a time: each unit folds its tensors into a
            # partial, the driver merges them (exact integer counts; the units' split cannot
            # change a bit), until the statistics are known.
            gather = ray.remote(_gather).options(num_cpus=threads, max_retries=RETRIES)
            tickets = [driver.ticket(w[0], b"") for w in work]
            known: list[bytes] = []
            partials = None
            while True:
                kind, value = driver.gather(known, partials)
                if kind == "done":
                    model = value
                    break
                if value is not None:
                    known.append(value)
                state["total"] += total
                known_ref = ray.put(known)
                refs = [gather.remote(base, models, unit_job, t, known_ref, reporter(i)) for i, t in enumerate(tickets)]
                results = wait_all(refs, [w[1] for w in work])
                partials = [p for p, _ in results]
                state["read"] += sum(r for _, r in results)
        if svd is None:
            task = ray.remote(_unit)
            refs = [task.options(**res, max_retries=RETRIES)
                    .remote(base, models, unit_job, driver.ticket(u, model), hooks.get("unit"), reporter(i))
                    for i, (u, _, res, _) in enumerate(work)]  # fmt: skip
            read = sum(wait_all(refs, [w[1] for w in work]))
        else:
            task = ray.remote(_torch_unit)
            refs = [task.options(**res, max_retries=RETRIES)
                    .remote(base, models, unit_job, driver.ticket(u, model), dict(svd, device=dev), hooks.get("unit"),
                            reporter(i))
                    for i, (u, _, res, dev) in enumerate(work)]  # fmt: skip
            results = wait_all(refs, [w[1] for w in work])
            read = sum(r for r, _ in results)
            for message in dict.fromkeys(m for _, said in results for m in said):
                warnings.warn(message, RuntimeWarning, stacklevel=4)
        return driver.publish([w[0] for w in work], read + state["read"])
    except BaseException:
        # Stop the tasks still running, gently (a unit stops at its next chunk): killing their
        # workers races with replies in flight, which Ray 2.x's owner cannot take (it aborts).
        if refs:
            _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
            for r in running:
                ray.cancel(r, force=False)
        driver.abort()
        raise
