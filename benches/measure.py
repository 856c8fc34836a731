"""Runs one command and measures it: wall time and peak resident memory, split into anonymous
(heap) and file-backed (mapped files, page cache) by sampling /proc/PID/status of the process
tree every 10 ms. Optional memory cap through a cgroup-v1 memory group when one can be made."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    seconds: float
    peak_anon: int  # bytes
    peak_file: int
    rc: int
    stderr: str = ""
    cap_bytes: int | None = None


@dataclass
class Result:
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.rc == 0 for r in self.runs)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def peak_anon(self) -> int:
        return max(r.peak_anon for r in self.runs)

    @property
    def peak_file(self) -> int:
        return max(r.peak_file for r in self.runs)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _rss(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def can_cap() -> bool:
    probe = CGROUP_ROOT / f"ww-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


def run_once(cmd: list[str], cap_bytes: int | None = None, timeout: float = 1800, env: dict | None = None) -> Run:
    group = None
    if cap_bytes:
        group = CGROUP_ROOT / f"ww-bench-{os.getpid()}-{time.monotonic_ns()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak_anon = peak_file = 0
    while proc.poll() is None:
        anon = file = 0
        for p in _tree(proc.pid):
            a, f = _rss(p)
            anon, file = anon + a, file + f
        peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
        if time.perf_counter() - t0 > timeout:
            proc.kill()
        time.sleep(0.01)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if group:
        try:
            group.rmdir()
        except OSError:
            pass
    return Run(seconds, peak_anon, peak_file, proc.returncode, err[-2000:], cap_bytes)


def measure(cmd: list[str], repeats: int = 3, warmup: bool = True, cap_bytes: int | None = None,
            timeout: float = 1800, cleanup=None, env: dict | None = None) -> Result:  # fmt: skip
    """Median of `repeats` runs after one warm-up run (warm page cache); stops at the first failure."""
    res = Result()
    for i in range(repeats + (1 if warmup else 0)):
        if cleanup:
            cleanup()
        r = run_once(cmd, cap_bytes, timeout, env)
        if r.rc != 0:
            res.runs = [r]
            return res
        if warmup and i == 0:
            continue
        res.runs.append(r)
    return res
