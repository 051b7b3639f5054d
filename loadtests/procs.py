"""CPU and memory of process trees, for the benchmark: what the servers cost, per process.

A tree is a root process and all its descendants, listed again at every sample: children
that start, exit or restart while we measure count (PostgreSQL backends opened by a pool
that reconnects; `tierproxy serve --workers N`, whose supervisor spawns API processes and a
background worker). A process that exits between two samples loses its CPU since the last
one, so the meters sample a few times a second.

- `TreeMeter`: CPU of named trees (and of the whole machine) between start() and stop().
- `MemoryWatch`: the largest RSS of each process of some trees, over a whole bench run.
- `role`: what a sidecar process is, from its command line and its listening sockets.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psutil

Roots = Callable[[], Mapping[str, int]]  # tree name -> root pid, read at every sample
Key = tuple[int, float]  # (pid, create time): a pid reused by another process is another key
Describe = Callable[[str, psutil.Process, bool, bool], str]  # tree, process, is root, alone


@dataclass
class Seen:
    """One process as the samples saw it."""

    tree: str
    pid: int
    cpu_first_s: float  # user + system CPU at its first sample (0 when born meanwhile)
    cpu_s: float  # at its last sample
    rss_max: int  # bytes
    role: str = ""


def _tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def _cpu_rss(proc: psutil.Process) -> tuple[Key, float, int] | None:
    with contextlib.suppress(psutil.Error), proc.oneshot():
        t, mem = proc.cpu_times(), proc.memory_info()
        return (proc.pid, proc.create_time()), t.user + t.system, mem.rss
    return None


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process)."""
    m = psutil.cpu_times()
    return float(m.user + m.nice + m.system + m.irq + m.softirq + getattr(m, "steal", 0.0))


def role(proc: psutil.Process, is_root: bool, api_port: int | None, alone: bool) -> str:
    """`--role X` on its command line; else `api` if it listens on the API port; else
    `supervisor` for a root with children, `worker` for a child. A sidecar that is one
    process (API and background work together) is `all-in-one`."""
    with contextlib.suppress(psutil.Error):
        argv: list[str] = proc.cmdline()
        for i, arg in enumerate(argv):
            if arg.startswith("--role="):
                return arg.split("=", 1)[1]
            if arg == "--role" and i + 1 < len(argv):
                return argv[i + 1]
        if alone:
            return "all-in-one"
        if api_port is not None and listens_on(proc, api_port):
            return "api"
    return "supervisor" if is_root else "worker"


def listens_on(proc: psutil.Process, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in proc.net_connections(kind="tcp"))
    return False


class _Sampler:
    """Samples the trees of `roots()` every `interval_s` in a daemon thread; `describe`, if
    given, names each process's role at every sample (it may change: a supervisor is alone
    until it has spawned its children)."""

    def __init__(self, roots: Roots, interval_s: float, describe: Describe | None = None) -> None:
        self._roots, self._interval_s, self._describe = roots, interval_s, describe
        self.seen: dict[Key, Seen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, first: bool = False) -> None:
        for tree, pid in dict(self._roots()).items():
            procs = _tree(pid)
            for proc in procs:
                if (got := _cpu_rss(proc)) is None:
                    continue
                key, cpu_s, rss = got
                name = (self._describe(tree, proc, proc.pid == pid, len(procs) == 1)
                        if self._describe else "")
                with self._lock:
                    seen = self.seen.setdefault(
                        key, Seen(tree, proc.pid, cpu_s if first else 0.0, cpu_s, rss))
                    seen.cpu_s, seen.rss_max = cpu_s, max(seen.rss_max, rss)
                    seen.role = name or seen.role

    def run_in_background(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.seen.values())


class TreeMeter:
    """CPU of named process trees between start() and stop(), in % of one core, plus
    `machine` (the whole machine: load we did not start shows as the difference)."""

    def __init__(self, roots: Mapping[str, int], interval_s: float = 0.25) -> None:
        fixed = dict(roots)
        self._sampler = _Sampler(lambda: fixed, interval_s)
        self._t0 = self._busy0 = 0.0
        self.cpu_s: dict[str, float] = {}  # CPU seconds per tree, after stop()
        self.wall_s = 0.0  # seconds between start() and stop()

    def start(self) -> None:
        self._sampler.seen.clear()
        self._sampler.sample(first=True)
        self._t0, self._busy0 = time.perf_counter(), machine_busy_s()
        self._sampler.run_in_background()

    def stop(self) -> dict[str, float]:
        self._sampler.halt()
        self._sampler.sample()
        wall = self.wall_s = max(time.perf_counter() - self._t0, 1e-9)
        self.cpu_s = {}
        for s in self._sampler.snapshot():
            self.cpu_s[s.tree] = self.cpu_s.get(s.tree, 0.0) + s.cpu_s - s.cpu_first_s
        out = {tree: round(100.0 * s / wall, 1) for tree, s in self.cpu_s.items()}
        out["machine"] = round(100.0 * (machine_busy_s() - self._busy0) / wall, 1)
        return out

    def processes(self) -> int:
        """How many processes the trees held over the run (restarted ones counted again)."""
        return len(self._sampler.snapshot())


class MemoryWatch:
    """The largest RSS of every process of the trees `roots()` names, re-read at every
    sample (sidecars come and go during a bench), by role; `api_ports()` maps a tree to its
    API port, which tells API processes apart. Runs in the background between start() and
    stop()."""

    def __init__(self, roots: Roots, api_ports: Callable[[], Mapping[str, int]],
                 interval_s: float = 0.5) -> None:
        def describe(tree: str, proc: psutil.Process, is_root: bool, alone: bool) -> str:
            return role(proc, is_root, api_ports().get(tree), alone)

        self._sampler = _Sampler(roots, interval_s, describe)

    def start(self) -> None:
        self._sampler.sample()
        self._sampler.run_in_background()

    def stop(self) -> None:
        self._sampler.halt()

    def by_role(self) -> dict[str, float]:
        """The largest RSS in MB of each role (`rss_mb_<role>`) over every process seen so
        far, and how many processes had that role (`processes_<role>`)."""
        self._sampler.sample()
        out: dict[str, float] = {}
        for s in self._sampler.snapshot():
            out[f"rss_mb_{s.role}"] = max(out.get(f"rss_mb_{s.role}", 0.0),
                                          round(s.rss_max / 2**20, 1))
            out[f"processes_{s.role}"] = out.get(f"processes_{s.role}", 0.0) + 1
        return out
