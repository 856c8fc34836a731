"""Beyond one machine: the same merge, bit for bit, spread over a Ray cluster's CPUs.

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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from . import _rust
from ._rust import ParamError

HINT = "pip install 'weightweave[ray]'"
#: Times Ray runs a unit again when its worker or node dies.
RETRIES = 3


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


def _unit(base: str, models: list[str], job: dict[str, Any], ticket: bytes,
          hook: Callable[[], object] | None) -> tuple[str, Any]:  # fmt: skip
    """One unit, on whichever node Ray chose: ("ok", bytes read) or ("error", (class, message)).
    Errors are returned, not raised, so that Ray retries only lost workers, never a refusal."""
    if hook is not None:
        hook()
    try:
        return "ok", _rust.merge_unit(base, models, job, ticket)
    except _rust.WeaveError as e:
        return "error", (type(e).__name__, str(e))


def _gather(base: str, models: list[str], job: dict[str, Any], ticket: bytes, known: list[bytes]) -> tuple[str, Any]:
    """A unit's partial of the next statistics pass: ("ok", (partial, bytes read)) or an error."""
    try:
        return "ok", _rust.gather_unit(base, models, job, ticket, known)
    except _rust.WeaveError as e:
        return "error", (type(e).__name__, str(e))


def _check(base: str, models: list[str], job: dict[str, Any], ticket: bytes) -> tuple[str, Any]:
    """A node's view of the inputs and of the staging area against the driver's."""
    return _unit(base, models, job, ticket, None)


def _raise(result: tuple[str, Any]) -> Any:
    kind, value = result
    if kind == "ok":
        return value
    name, message = value
    raise getattr(_rust, name, _rust.WeaveError)(message)


def _alive_nodes(ray: Any) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def run(base: str, models: list[str], out: str, job: dict[str, Any], opts: dict[str, Any],
        progress: Callable[[int, int], object] | None, cluster: str, *, units: int | None = None,
        hooks: dict[str, Callable[..., object]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Runs a file merge on Ray; returns the report dict a local run returns.

    ``units``: how many units the tensors are split into (default: twice the cluster's CPUs, so
    that a lost node's share is small and fast nodes take more). ``hooks`` (tests): ``"unit"``
    runs in each unit's task before it merges; ``"opened"`` on the driver once it staged."""
    ray = _ray()
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
        if "opened" in hooks:
            hooks["opened"]()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Every node must see the inputs and the staging area as the driver does, before work.
        check = ray.remote(_check)
        probe = driver.ticket([], b"")
        refs = [check.options(num_cpus=0, max_retries=0,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(base, models, unit_job, probe) for node in _alive_nodes(ray)]  # fmt: skip
        for r in refs:
            try:
                result = ray.get(r)
            except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError,
                    ray.exceptions.WorkerCrashedError):  # fmt: skip
                # A node that left since it was listed runs no unit (and each unit checks again).
                continue
            _raise(result)
        split = driver.units(units or max(1, 2 * int(ray.cluster_resources().get("CPU", 1))))
        total = sum(b for _, b in split)
        state = {"read": 0, "done": 0, "total": total}

        def wait_all(refs: list[Any], bytes_of: list[int]) -> list[Any]:
            """Results in order, progress as units finish (Ctrl-C lands here, between waits)."""
            of = {r: i for i, r in enumerate(refs)}
            results: list[Any] = [None] * len(refs)
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.1)
                for r in ready:
                    results[of[r]] = _raise(ray.get(r))
                    state["done"] += bytes_of[of[r]]
                if progress:
                    progress(state["done"], state["total"])
            return results

        model = b""
        if driver.needs_model_stats():
            # The whole-model statistics, one pass at a time: each unit folds its tensors into a
            # partial, the driver merges them (exact integer counts; the units' split cannot
            # change a bit), until the statistics are known.
            gather = ray.remote(_gather).options(num_cpus=threads, max_retries=RETRIES)
            tickets = [driver.ticket(u, b"") for u, _ in split]
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
                refs = [gather.remote(base, models, unit_job, t, known_ref) for t in tickets]
                results = wait_all(refs, [b for _, b in split])
                partials = [p for p, _ in results]
                state["read"] += sum(r for _, r in results)
        task = ray.remote(_unit).options(num_cpus=threads, max_retries=RETRIES)
        refs = [task.remote(base, models, unit_job, driver.ticket(u, model), hooks.get("unit")) for u, _ in split]
        read = sum(wait_all(refs, [b for _, b in split])) + state["read"]
        return driver.publish([u for u, _ in split], read)
    except BaseException:
        # Stop the tasks still running, gently (a unit stops at its next chunk): killing their
        # workers races with replies in flight, which Ray 2.x's owner cannot take (it aborts).
        if refs:
            _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
            for r in running:
                ray.cancel(r, force=False)
        driver.abort()
        raise
