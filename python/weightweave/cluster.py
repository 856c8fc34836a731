"""Beyond one machine: the same merge, bit for bit, spread over a Ray cluster's CPUs.

The driver (this process) opens the inputs, plans, and stages the output under its lock as a
local run does; it gathers the whole-model statistics the method needs (TIES's and PCB's global
scope) and splits the tensors into units balanced by bytes. Each unit is a Ray task that calls
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
        stats_total = [0]

        def stats_progress(done: int, of: int) -> object:
            stats_total[0] = of
            return progress(done, of + total) if progress else None

        model = driver.model_stats(progress=stats_progress if progress else None)
        task = ray.remote(_unit).options(num_cpus=threads, max_retries=RETRIES)
        refs = [task.remote(base, models, unit_job, driver.ticket(u, model), hooks.get("unit")) for u, _ in split]
        of = {r: i for i, r in enumerate(refs)}
        pending, read, done = list(refs), 0, 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.1)
            for r in ready:
                read += _raise(ray.get(r))
                done += split[of[r]][1]
            if progress:
                progress(stats_total[0] + done, stats_total[0] + total)
        return driver.publish([u for u, _ in split], read)
    except BaseException:
        for r in refs:
            ray.cancel(r, force=True)
        driver.abort()
        raise
