"""Cluster merges on Ray: the same output bytes as one machine's, on a simulated 3-node cluster
(`ray.cluster_utils.Cluster`, loopback only), with a node killed mid-run, a driver killed, and a
node that does not see the inputs. Synchronisation is by events (an actor, a FIFO), never by
sleeping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import weightweave as ww

from conftest import digest, make_state, tree, write_models

ray = pytest.importorskip("ray", reason="the Ray tests need weightweave[ray] (.ci/run installs it)")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs (the driver's) and three worker nodes of one CPU each."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base, models = make_state(3)
    return write_models(tmp_path_factory.mktemp("ray") / "in", base, models)


CASES = {
    "task_arithmetic": dict(method="task_arithmetic", lam=0.3),
    "ties_global": dict(method="ties", density=0.3),
    "ties_tensor": dict(method="ties", density=0.4, scope="tensor"),
    "dare_ties": dict(method="dare_ties", density=0.5, seed=7),
    "pcb": dict(method="pcb", ratio=0.2),
    "dare": dict(method="dare", density=0.6, seed=3),
    "breadcrumbs": dict(method="breadcrumbs", chunk_size=64),
    "sce": dict(method="sce", select_topk=0.5),
    "model_stock": dict(method="model_stock"),
    "slerp": dict(method="slerp", t=0.4),
    # The held iterate of karcher in bf16 lives in the unit that merges the tensor.
    "karcher_bf16": dict(method="karcher", compat="mergekit", arith="bf16", out_dtype="bf16", max_iter=3),
    # Modules: each group of tensors (by module and gradient) gathers its own TIES statistics
    # over the units.
    "modules_gradient": dict(method="ties", density=[{"module": "attn", "value": [0.2, 0.9]}, {"value": 0.5}],
                             modules=[{"name": "attn", "prefixes": ["layer.0.attn", "emb."]},
                                      {"name": "rest", "prefixes": ["layer.", "conv."]}]),
    # MetaGPT's weights: the norms gathered over the units first, as TIES's statistics are.
    "metagpt": dict(method="task_arithmetic", lam="metagpt"),
    "metagpt_ties": dict(method="ties", density=0.3, lam="metagpt"),
}


def _local_and_ray(inputs, tmp_path, call, kw, **ray_kw):
    bp, mps = inputs
    models = mps[:1] if kw.get("method") == "slerp" else mps
    local, dist = tmp_path / "local", tmp_path / "ray"
    mine = call(bp, models, local, shard_size=2000, **kw)
    rep = call(bp, models, dist, shard_size=2000, cluster="ray", **kw, **ray_kw)
    # The units read what one process reads, statistics passes included; the driver nothing.
    assert rep.bytes_read == mine.bytes_read
    return local, dist, rep


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_is_bit_identical_to_one_machine(cluster, inputs, tmp_path, name):
    local, dist, rep = _local_and_ray(inputs, tmp_path, ww.merge, CASES[name])
    assert tree(dist) == tree(local) and len(list(local.glob("*.safetensors"))) > 1
    assert digest(dist) == digest(local)
    assert rep.bytes_written > 0 and rep.bytes_read > 0


def test_weave_grid_is_bit_identical(cluster, inputs, tmp_path):
    kw = dict(method="ties", search={"lam": "0.2:1.0:0.4", "density": [0.2, 0.5]}, pool="magmax")
    local, dist, _ = _local_and_ray(inputs, tmp_path, ww.weave, kw)
    assert digest(dist) == digest(local)


def test_single_file_output_and_thread_counts(cluster, inputs, tmp_path):
    bp, mps = inputs
    ww.merge(bp, mps, tmp_path / "a.safetensors", method="ties", density=0.3, threads=1)
    ww.merge(bp, mps, tmp_path / "b.safetensors", method="ties", density=0.3, threads=1, cluster="ray")
    assert digest(tmp_path / "a.safetensors") == digest(tmp_path / "b.safetensors")
    assert tree(tmp_path) == ["a.safetensors", "b.safetensors"]


def test_refusals_before_any_work(cluster, inputs, tmp_path):
    bp, mps = inputs
    with pytest.raises(ww.ParamError, match="cluster must be 'ray'"):
        ww.merge(bp, mps, tmp_path / "o", method="ties", cluster="spark")
    with pytest.raises(ww.ParamError, match="MetaGPT"):
        ww.merge(bp, mps, tmp_path / "o", method="tsv", lam="metagpt", cluster="ray")
    with pytest.raises(ww.ParamError, match="Ray assigns each unit its GPU"):
        ww.merge(bp, mps, tmp_path / "o", method="tsv", device="cuda:1", cluster="ray")
    with pytest.raises(ww.ParamError, match="the Ray cluster has no GPU"):
        ww.merge(bp, mps, tmp_path / "o", method="tsv", device="cuda", cluster="ray")
    with pytest.raises(ww.ParamError, match="threads=2: .* largest node has 1"):
        ww.merge(bp, mps, tmp_path / "o", method="ties", threads=2, cluster="ray")
    with pytest.raises(ww.ParamError, match="svd_exclude"):
        ww.merge(bp, mps, tmp_path / "o", method="tsv", svd_exclude="(", cluster="ray")
    assert tree(tmp_path) == []


@pytest.mark.parametrize("out_dtype", [None, "bf16"])
def test_scaled_fp8_inputs(cluster, tmp_path, out_dtype):
    """FP8 weights with scale tensors, written re-quantized with fresh scales (or dequantized):
    a weight and its scale tensor are cut into different units by bytes, but the unit that merges
    the weight writes both."""
    from test_fp8_and_copies import write_scaled

    d, fts, _, _ = write_scaled(tmp_path, "block")
    kw = dict(method="ties", density=0.4, out_dtype=out_dtype)
    ww.merge(d, fts, tmp_path / "local", **kw)
    ww.merge(d, fts, tmp_path / "ray", cluster="ray", **kw)
    assert digest(tmp_path / "ray") == digest(tmp_path / "local")


@pytest.fixture(scope="module")
def svd_inputs(tmp_path_factory):
    """Matrices large enough for LAPACK's blocked SVD, beside tensors that take the mean."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    shapes = {"embed.weight": (150, 48), "layers.0.q.weight": (96, 96), "layers.0.up.weight": (160, 96),
              "layers.0.norm.weight": (96,), "head.weight": (40, 96), "conv.weight": (8, 4, 3, 3)}  # fmt: skip
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["step"] = torch.tensor([3], dtype=torch.int64)
    root = tmp_path_factory.mktemp("svd")
    save_file(base, str(root / "base.safetensors"))
    models = []
    for i in range(3):
        m = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        save_file(m, str(root / f"ft{i}.safetensors"))
        models.append(root / f"ft{i}.safetensors")
    return root / "base.safetensors", models


SVD_CASES = {
    "tsv": dict(method="tsv"),
    "iso_c": dict(method="iso_c"),
    "iso_cts": dict(method="iso_cts", common_space_fraction=0.5),
    "wudi": dict(method="wudi", steps=3),
    "tsv_exclude": dict(method="tsv", svd_exclude="^head"),
}


@pytest.mark.parametrize("name", sorted(SVD_CASES))
def test_svd_methods_on_cpus_are_bit_identical_to_one_machine(cluster, svd_inputs, tmp_path, name):
    """The torch backend in every unit. LAPACK's SVD changes in its last bits with torch's threads,
    so the local run pins one thread: a unit's default."""
    bp, mps = svd_inputs
    kw = SVD_CASES[name]
    mine = ww.merge(bp, mps, tmp_path / "local", shard_size=30_000, threads=1, **kw)
    rep = ww.merge(bp, mps, tmp_path / "ray", shard_size=30_000, cluster="ray", **kw)
    assert len(list((tmp_path / "local").glob("*.safetensors"))) > 1
    assert digest(tmp_path / "ray") == digest(tmp_path / "local")
    assert rep.bytes_read == mine.bytes_read


def test_svd_weave_is_bit_identical(cluster, svd_inputs, tmp_path):
    bp, mps = svd_inputs
    ww.weave(bp, mps, tmp_path / "local", method="tsv", lambdas=[0.5, 1.0, 1.5], threads=1)
    ww.weave(bp, mps, tmp_path / "ray", method="tsv", lambdas=[0.5, 1.0, 1.5], cluster="ray")
    assert digest(tmp_path / "ray") == digest(tmp_path / "local")


def test_a_node_that_sees_other_inputs_is_refused(cluster, inputs, tmp_path):
    """A node must see what the driver saw: here a fine-tune is replaced after the driver opened
    it (a node on another file system, or a stale copy, looks the same to the check)."""
    bp, mps = inputs
    base, models = make_state(4)
    _, other = write_models(tmp_path / "other", base, models)
    mine = [Path(tmp_path / f"m{i}.safetensors") for i in range(len(mps))]
    for src, dst in zip(mps, mine, strict=True):
        dst.write_bytes(src.read_bytes())
    out = tmp_path / "out"
    swap = {"opened": lambda: os.replace(other[1], mine[1])}
    with pytest.raises(ww.WeaveIOError, match="does not see the inputs the driver saw.*shared file system"):
        ww.cluster.run(str(bp), [str(m) for m in mine], str(out), _job(), {}, None, "ray", hooks=swap)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    gone = {"opened": lambda: mine[0].unlink()}
    with pytest.raises(ww.WeaveIOError, match="cannot read an input.*shared file system"):
        ww.cluster.run(str(bp), [str(m) for m in mine], str(out), _job(), {}, None, "ray", hooks=gone)
    assert not out.exists()


def _job(**kw):
    from weightweave.job import _job as job

    return job("ties", dict(density=0.3, **kw), "merge")


@ray.remote(num_cpus=0)
class Gate:
    """Units arrive and wait until the test opens the gate; the test waits for arrivals."""

    def __init__(self):
        import asyncio

        self.nodes: list[tuple[str, int]] = []
        self.changed = asyncio.Condition()
        self.opened = asyncio.Event()

    async def arrive(self, node: str, pid: int) -> None:
        async with self.changed:
            self.nodes.append((node, pid))
            self.changed.notify_all()
        await self.opened.wait()

    async def arrivals(self, n: int) -> list[tuple[str, int]]:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.nodes) >= n)
            return list(self.nodes)

    def open(self) -> None:
        self.opened.set()


@pytest.mark.parametrize("method", ["ties", "tsv"])
def test_a_node_killed_mid_run_changes_nothing(cluster, inputs, svd_inputs, tmp_path, method):
    if method == "tsv":
        bp, mps = svd_inputs
        ww.merge(bp, mps, tmp_path / "local", method="tsv", threads=1, shard_size=2000)
        job, svd = _svd_job(), {"device": None, "svd_exclude": None}
    else:
        bp, mps = inputs
        ww.merge(bp, mps, tmp_path / "local", method="ties", density=0.3, shard_size=2000)
        job, svd = _job(), None
    # The gate lives on the driver's node, which stays.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    gate = Gate.options(scheduling_strategy=here).remote()

    def hold():
        ray.get(gate.arrive.remote(ray.get_runtime_context().get_node_id(), os.getpid()))

    import threading

    result: dict = {}

    def drive():
        try:
            result["report"] = ww.cluster.run(str(bp), [str(m) for m in mps], str(tmp_path / "ray"), job,
                                              {"shard_size": 2000}, None, "ray", svd=svd, units=6,
                                              hooks={"unit": hold})  # fmt: skip
        except BaseException as e:  # surfaced below
            result["error"] = e

    t = threading.Thread(target=drive)
    t.start()
    # Every worker node holds a unit at the gate: kill one of them with its unit. (The timeout
    # only turns a run that failed before its units started into a failure, not a hang.)
    arrived = ray.get(gate.arrivals.remote(3), timeout=300)
    victim = next(n for n in cluster.list_all_nodes() if n.node_id == arrived[0][0])
    # A node dies with every process on it: its raylet, and the workers holding units (left
    # alone, a worker of a dead raylet could still answer, which is not a node's death).
    cluster.remove_node(victim, allow_graceful=False)
    for node, pid in arrived:
        if node == victim.node_id:
            _kill_and_wait(pid)
    gate.open.remote()
    t.join()
    cluster.add_node(num_cpus=1)
    assert "error" not in result, result.get("error")
    assert digest(tmp_path / "ray") == digest(tmp_path / "local")


def _kill_and_wait(pid: int) -> None:
    """SIGKILL a process and wait for its exit (a pidfd turns readable), not for a while."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        select.select([fd], [], [])
    finally:
        os.close(fd)


DRIVER = """
import sys, threading
import ray
from weightweave import cluster
from weightweave.job import _job

fifo, address, base, out, *models = sys.argv[1:]

def hold():
    with open(fifo, "w") as f:
        f.write("x")
    threading.Event().wait()

try:
    ray.init(address=address, log_to_driver=False)
    cluster.run(base, models, out, _job("ties", {"density": 0.3}, "merge"), {}, None, "ray", hooks={"unit": hold})
except BaseException as e:  # the test reads why instead of waiting forever
    with open(fifo, "w") as f:
        f.write(f"driver failed: {e!r}")
    raise
"""


def test_a_killed_driver_publishes_nothing(cluster, inputs, tmp_path):
    bp, mps = inputs
    fifo, out = tmp_path / "arrived", tmp_path / "site" / "out"
    out.parent.mkdir()
    os.mkfifo(fifo)
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    proc = subprocess.Popen([sys.executable, str(script), str(fifo), cluster.address, str(bp), str(out),
                             *map(str, mps)])  # fmt: skip
    _unblock_when_it_exits(proc, fifo)
    try:
        with open(fifo) as f:  # blocks until a unit of that driver is running (or it ended)
            said = f.read(1)
        assert said == "x", said + f.read()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()
    # The next run in that directory removes what the killed one left, and publishes.
    ww.merge(bp, mps, out, method="ties", density=0.3, cluster="ray")
    assert tree(out.parent) == ["out"] + [f"out/{p}" for p in tree(out)]


INTERRUPTED = """
import signal, sys, threading
# As in a terminal: a harness may start us with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
import ray
from weightweave import cluster
from weightweave.job import _job

fifo, address, base, out, *models = sys.argv[1:]
ray.init(address=address, log_to_driver=False)


@ray.remote(num_cpus=0)
class Gate:
    def __init__(self):
        import asyncio

        self.n = 0
        self.stopped = 0
        self.changed = asyncio.Condition()
        self.never = asyncio.Event()

    async def arrive(self):
        async with self.changed:
            self.n += 1
            self.changed.notify_all()
        await self.never.wait()

    async def stop(self):
        async with self.changed:
            self.stopped += 1
            self.changed.notify_all()

    async def arrivals(self, n):
        async with self.changed:
            await self.changed.wait_for(lambda: self.n >= n)

    async def all_stopped(self):
        async with self.changed:
            await self.changed.wait_for(lambda: self.stopped >= self.n)
            return self.stopped


gate = Gate.remote()


def hold():
    try:
        ray.get(gate.arrive.remote())
    except BaseException:  # the unit was cancelled: it says so, then goes
        ray.get(gate.stop.remote())
        raise


def tell():
    ray.get(gate.arrivals.remote(3))  # every node's CPU holds a unit
    with open(fifo, "w") as f:
        f.write("x")


threading.Thread(target=tell, daemon=True).start()
job = _job("ties", {"density": 0.3}, "merge")
try:
    cluster.run(base, models, out, job, {}, None, "ray", hooks={"unit": hold})
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", flush=True)
# Every unit that started stops (a unit blocked in ray.get holds no CPU: Ray lends it out, so
# the next run alone would not show this).
print("units stopped:", ray.get(gate.all_stopped.remote()), flush=True)
# The process lives on (a notebook's kernel): the cancelled units gave their CPUs back.
cluster.run(base, models, out + "-next", job, {}, None, "ray")
print("next run published", flush=True)
"""


def test_ctrl_c_on_the_driver_cancels_every_unit(cluster, inputs, tmp_path):
    bp, mps = inputs
    ww.merge(bp, mps, tmp_path / "local", method="ties", density=0.3)
    fifo, out = tmp_path / "arrived", tmp_path / "site" / "out"
    out.parent.mkdir()
    os.mkfifo(fifo)
    script = tmp_path / "driver.py"
    script.write_text(INTERRUPTED)
    proc = subprocess.Popen([sys.executable, str(script), str(fifo), cluster.address, str(bp), str(out),
                             *map(str, mps)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    _unblock_when_it_exits(proc, fifo)
    try:
        with open(fifo) as f:  # blocks until the units hold every CPU (or the driver ended)
            said = f.read(1)
        assert said == "x", said + f.read()
        os.kill(proc.pid, signal.SIGINT)
        # The timeout turns a driver that never stops into a failure, not a hang.
        stdout, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    lines = stdout.split("\n")
    assert proc.returncode == 0 and lines[0] == "interrupted" and lines[2] == "next run published", stdout
    assert int(lines[1].removeprefix("units stopped: ")) >= 3, stdout
    assert tree(out.parent) == ["out-next"] + [f"out-next/{p}" for p in tree(out.parent / "out-next")]
    assert digest(out.parent / "out-next") == digest(tmp_path / "local")


def _unblock_when_it_exits(proc: subprocess.Popen, fifo: Path) -> None:
    """A driver that dies before it writes to `fifo` still unblocks the test's read of it."""

    def watch():
        rc = proc.wait()
        try:  # without a reader left (the test is past it), nothing to unblock
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.write(fd, f"driver exited with {rc}".encode())
        except OSError:  # the reader went in between
            pass
        finally:
            os.close(fd)

    import threading

    threading.Thread(target=watch, daemon=True).start()


def test_cli_and_recipe_take_ray(cluster, inputs, tmp_path):
    from weightweave import recipe
    from weightweave.cli import main

    bp, mps = inputs
    ww.merge(bp, mps, tmp_path / "local", method="ties", density=0.3)
    assert main(["merge", str(bp), *map(str, mps), "-o", str(tmp_path / "cli"), "--method", "ties",
                 "--set", "density=0.3", "-q", "--ray"]) == 0  # fmt: skip
    spec = {"base": str(bp), "models": [str(m) for m in mps], "method": "ties", "params": {"density": 0.3},
            "cluster": "ray"}  # fmt: skip
    recipe.run(spec, tmp_path / "recipe")
    assert digest(tmp_path / "cli") == digest(tmp_path / "local") == digest(tmp_path / "recipe")
    with pytest.raises(ww.ParamError, match="cluster must be 'ray'"):
        recipe.run(dict(spec, cluster="dask"), tmp_path / "bad")


@ray.remote(num_cpus=0)
class Seen:
    """What each unit was given by Ray."""

    def __init__(self):
        self.seen: list[dict] = []

    def add(self, resources: dict) -> None:
        self.seen.append(resources)

    def all(self) -> list[dict]:
        return self.seen


def test_svd_units_ask_a_gpu_share_where_the_cluster_has_gpus(cluster, svd_inputs, tmp_path):
    """A node advertising a GPU (a logical one: this machine has none) draws the units holding
    2-D tensors, each asking for torch_backend.gpu_share of it; the other units take CPUs. With
    device='cpu' no unit asks for a GPU. Where torch sees no CUDA device, the unit says so."""
    bp, mps = svd_inputs
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    node = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        for device, expect in ((None, "error"), ("cpu", "ok")):
            seen = Seen.options(scheduling_strategy=here).remote()

            def record(seen=seen):
                ray.get(seen.add.remote(ray.get_runtime_context().get_assigned_resources()))

            out = tmp_path / f"out-{device}"
            job = _svd_job()
            svd = {"device": device, "svd_exclude": None}
            if expect == "error":
                with pytest.raises(ww.WeaveError, match="Ray gave a unit a GPU, but torch there sees no CUDA"):
                    ww.cluster.run(str(bp), [str(m) for m in mps], str(out), job, {}, None, "ray", svd=svd,
                                   hooks={"unit": record})  # fmt: skip
                assert not out.exists()
            else:
                ww.cluster.run(str(bp), [str(m) for m in mps], str(out), job, {}, None, "ray", svd=svd,
                               hooks={"unit": record})  # fmt: skip
                ww.merge(bp, mps, tmp_path / "local", method="tsv", threads=1)
                assert digest(out) == digest(tmp_path / "local")
            gpus = sorted(r.get("GPU", 0) for r in ray.get(seen.all.remote()))
            if expect == "error":
                # 4 × 16 GiB ≥ (8 words per element) × the largest matrix: the smallest share.
                assert gpus and gpus[-1] == 0.125
            else:
                assert gpus and gpus[-1] == 0
    finally:
        cluster.remove_node(node)


def _svd_job():
    from weightweave.job import _job as job

    return job("tsv", {}, "merge")


@ray.remote(num_cpus=0)
class Latch:
    def __init__(self):
        import asyncio

        self.opened = asyncio.Event()

    async def wait(self) -> None:
        await self.opened.wait()

    def open(self) -> None:
        self.opened.set()


def test_progress_follows_running_units(cluster, tmp_path):
    """Progress moves while a unit runs, not only when it ends: the only unit holds after its
    first report until the driver's callback has shown a share of it."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    base = {f"layers.{i}.weight": torch.randn(48, 32, generator=g) for i in range(4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    mps = []
    for k in range(2):
        mps.append(tmp_path / f"ft{k}.safetensors")
        save_file({n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()}, str(mps[-1]))
    latch = Latch.remote()
    seen: list[tuple[int, int]] = []

    def progress(done, total):
        seen.append((done, total))
        if 0 < done < total:
            latch.open.remote()

    def held():
        # The timeout turns a driver that never shows the share into a failure, not a hang.
        ray.get(latch.wait.remote(), timeout=120)

    svd = {"device": None, "svd_exclude": None}
    ww.cluster.run(str(tmp_path / "base.safetensors"), [str(m) for m in mps], str(tmp_path / "ray"), _svd_job(),
                   {}, progress, "ray", svd=svd, units=1, hooks={"reported": held})  # fmt: skip
    total = seen[-1][1]
    assert seen[-1] == (total, total) and any(0 < d < total for d, _ in seen), seen
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False)), seen
    ww.merge(tmp_path / "base.safetensors", mps, tmp_path / "local", method="tsv", threads=1)
    assert digest(tmp_path / "ray") == digest(tmp_path / "local")
