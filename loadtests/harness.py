"""What the load scripts share: the servers under test, the load client process, test data.

- `Stack`: embedded Redis + PostgreSQL (unless URLs are given), a tierproxy sidecar
  subprocess (`python -m proxy serve`) and the bare aiohttp baseline (`bare_server.py`), all
  under one temporary directory; stopped in reverse order on exit, errors and Ctrl-C included.
  `stop_postgres`/`start_postgres` make a PostgreSQL outage; `metrics_url` is the sidecar's
  Prometheus endpoint.
- `run_load`: runs `loadgen.py` in its own process and samples the servers' CPU during its
  measured window, so a result says whether the server or the client was the limit.
- `prepare_threads`: creates the threads (and messages) a scenario needs before it is timed.

Used by bench.py, append_latency.py and tests/test_loadtests.py; not by the locustfile
(Locust runs on gevent and must not import asyncio servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import orjson
import psutil
from loadgen import Spec

from proxy.embedded import PostgresServer, RedisServer, free_port
from proxy.embedded import clickhouse_url as chdb_url

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOADGEN = HERE / "loadgen.py"
BARE_SERVER = HERE / "bare_server.py"
_READY_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
_SIDECAR_SHUTDOWN_S = 2.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: a child we start dies with us, even on kill -9


class HarnessError(RuntimeError):
    """A server or the load client failed; the message says which and shows its log."""


def _die_with_parent() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return f"({path} not readable)"


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Service:
    """A server subprocess with its output in a log file; ready when `ready_url` answers 200."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, ready_url: str,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log, self.ready_url, self.env = name, argv, log, ready_url, env
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise HarnessError(f"{self.name}: not started")
        return self._proc.pid

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self._proc = subprocess.Popen(
                list(self.argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO,
                env=self.env, preexec_fn=_die_with_parent())
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not _get_ok(self.ready_url):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                code = self._proc.poll()
                self.stop()
                raise HarnessError(f"{self.name} not ready at {self.ready_url} (exit code "
                                   f"{code}); {self.log} tail:\n{_tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited in time; always reaps the process."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Target:
    """A server the load client can hit, and the processes whose CPU its answers cost."""

    name: str
    url: str
    cpu_pids: dict[str, int]
    headers: dict[str, str] = field(default_factory=dict)


def _sidecar_env(redis_url: str, postgres_url: str, ch_url: str, token: str) -> dict[str, str]:
    """The caller's environment without its TIERPROXY_* settings, plus ours: a developer's
    shell must not change what is benchmarked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPROXY_")}
    env.update(TIERPROXY_REDIS_URL=redis_url, TIERPROXY_POSTGRES_URL=postgres_url,
               TIERPROXY_CLICKHOUSE_URL=ch_url, TIERPROXY_API_TOKEN=token,
               # Shutdown is not measured; an idle sidecar currently waits out the whole
               # deadline on SIGTERM (its monitor loop never ends), so keep that short.
               TIERPROXY_SHUTDOWN_DEADLINE_S=str(_SIDECAR_SHUTDOWN_S))
    return env


class Stack:
    """Redis, PostgreSQL, the sidecar and (if `bare`) the baseline server, under `root`.

    Give `redis_url`/`postgres_url`/`clickhouse_url` to use running servers instead of the
    embedded ones (Redis and PostgreSQL are started here; chDB is a directory).
    """

    def __init__(self, root: Path, *, token: str = "", redis_url: str = "",
                 postgres_url: str = "", clickhouse_url: str = "", bare: bool = True) -> None:
        self.root = root.resolve()
        self.token = token
        self.redis_url = redis_url
        self.postgres_url = postgres_url
        self.clickhouse_url = clickhouse_url
        self.with_bare = bare
        self.redis_pid: int | None = None
        self.postgres_pid: int | None = None
        self.postgres: PostgresServer | None = None  # the embedded one (stop/start_postgres)
        self.metrics_url = ""  # the sidecar's Prometheus endpoint
        self.sidecar: Target | None = None
        self.bare: Target | None = None
        self._exit = ExitStack()

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._exit.close()  # reverse start order; one failing stop skips no other

    def _start(self) -> None:
        if not self.redis_url:
            redis = RedisServer(self.root / "redis")
            redis.start()
            self._exit.callback(redis.stop)
            self.redis_url, self.redis_pid = redis.url, redis.pid
        if not self.postgres_url:
            postgres = PostgresServer(self.root / "postgres")
            postgres.start()
            self._exit.callback(postgres.stop)
            self.postgres_url, self.postgres_pid = postgres.url, postgres.pid
            self.postgres = postgres
        # chDB runs inside the sidecar process: its inserts and merges use the sidecar's CPU,
        # which an external ClickHouse (--clickhouse-url) would not.
        self.clickhouse_url = self.clickhouse_url or chdb_url(self.root)
        self.sidecar = self._start_sidecar()
        if self.with_bare:
            self.bare = self._start_bare()

    @property
    def server_pids(self) -> dict[str, int]:
        """The processes that keep working after a run (flushing): settle() waits for them."""
        return self.sidecar.cpu_pids if self.sidecar else {}

    def stop_postgres(self, mode: str = "fast") -> None:
        """Stop the embedded PostgreSQL (an outage: the sidecar goes on acknowledging writes,
        its backlog grows). Only for the embedded server, not one given by URL."""
        self._embedded_postgres().stop(mode)

    def start_postgres(self) -> None:
        """Start the embedded PostgreSQL again (same port and data); returns once it accepts
        connections. CPU meters made afterwards follow the new postmaster."""
        postgres = self._embedded_postgres()
        postgres.start()
        self.postgres_pid = postgres.pid
        if self.sidecar is not None and self.postgres_pid is not None:
            self.sidecar.cpu_pids["postgres"] = self.postgres_pid

    def _embedded_postgres(self) -> PostgresServer:
        if self.postgres is None:
            raise HarnessError("PostgreSQL was given by URL: the harness cannot stop or start it")
        return self.postgres

    def _service(self, service: Service) -> Service:
        service.start()
        self._exit.callback(service.stop)
        return service

    def _start_sidecar(self) -> Target:
        port, metrics_port = free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        argv = [sys.executable, "-m", "proxy", "serve", "--port", str(port),
                "--metrics-port", str(metrics_port), "--data-dir", str(self.root / "sidecar")]
        env = _sidecar_env(self.redis_url, self.postgres_url, self.clickhouse_url, self.token)
        proc = self._service(Service("tierproxy", argv, self.root / "sidecar.log",
                                     f"{url}/readyz", env))
        servers = {"redis": self.redis_pid, "postgres": self.postgres_pid}
        pids = {"sidecar": proc.pid} | {k: v for k, v in servers.items() if v is not None}
        return Target("sidecar", url, pids, auth_headers(self.token))

    def _start_bare(self) -> Target:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, str(BARE_SERVER), "--port", str(port)]
        proc = self._service(Service("bare aiohttp", argv, self.root / "bare.log",
                                     f"{url}/readyz"))
        return Target("bare", url, {"bare": proc.pid})


@contextlib.contextmanager
def temporary_stack(keep: bool = False, **kwargs: Any) -> Iterator[Stack]:
    """A Stack under a fresh temporary directory, removed afterwards unless `keep`."""
    with contextlib.ExitStack() as stack:
        if keep:
            root = Path(tempfile.mkdtemp(prefix="tierproxy-bench-"))
        else:
            root = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="tierproxy-bench-",
                                            ignore_cleanup_errors=True)))
        yield stack.enter_context(Stack(root, **kwargs))


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so context managers stop the servers (as Ctrl-C does)."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ---- the load client


class _CpuMeter:
    """CPU used by some process trees, and by the whole machine, between start() and stop(),
    in % of one core. A tree is a process and its children at start() (PostgreSQL's backends).
    The machine figure exposes load we did not start: other jobs on the box are noise."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._roots = pids
        self._procs: dict[str, list[psutil.Process]] = {}
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _now(self) -> dict[str, float]:
        m = psutil.cpu_times()
        busy = m.user + m.nice + m.system + m.irq + m.softirq + getattr(m, "steal", 0.0)
        out = {"machine": busy}
        for name, procs in self._procs.items():
            out[name] = 0.0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    out[name] += times.user + times.system
        return out

    def start(self) -> None:
        self._procs = {}
        for name, pid in self._roots.items():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                self._procs[name] = [root, *root.children(recursive=True)]
        self._start, self._t0 = self._now(), time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        end = self._now()
        return {name: round(100.0 * (end[name] - self._start[name]) / wall, 1)
                for name in end if name in self._start and wall > 0}


def settle(pids: dict[str, int], below_pct: float = 10.0, window_s: float = 0.5,
           timeout_s: float = 60.0) -> float:
    """Wait until these processes together use less than `below_pct` of a core (the sidecar
    flushing what the previous run wrote would skew the next run); return the seconds waited."""
    started = time.monotonic()
    meter = _CpuMeter(pids)
    while time.monotonic() - started < timeout_s:
        meter.start()
        time.sleep(window_s)
        used = meter.stop()
        used.pop("machine", None)
        if sum(used.values()) < below_pct:
            break
    return time.monotonic() - started


def run_load(target: Target, spec: Spec) -> dict[str, Any]:
    """Run loadgen.py against `target` and return its summary plus `cpu_pct`: % of one core
    used in the measured window by each server process and by the client."""
    spec = dataclasses.replace(spec, base_url=target.url,
                               headers={**spec.headers, **target.headers})
    meter = _CpuMeter(target.cpu_pids)
    cpu: dict[str, float] = {}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, str(LOADGEN), orjson.dumps(dataclasses.asdict(spec)).decode()],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, cwd=REPO,
            preexec_fn=_die_with_parent())
        try:
            result = _read_result(proc, meter, cpu)
            proc.wait(timeout=_STOP_TIMEOUT_S)
        finally:
            if proc.poll() is None:  # an error or Ctrl-C here, or the client hangs
                proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if result is None or proc.returncode != 0:
        raise HarnessError(f"load client failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    cpu["client"] = round(100.0 * result["client_cpu_s"] / spec.duration_s, 1)
    if "machine" in cpu:  # what the rest of the machine used meanwhile (noise, if large)
        cpu["others"] = round(max(0.0, cpu.pop("machine") - sum(cpu.values())), 1)
    return {**result, "target": target.name, "cpu_pct": cpu}


def _read_result(proc: subprocess.Popen[bytes], meter: _CpuMeter,
                 cpu: dict[str, float]) -> dict[str, Any] | None:
    assert proc.stdout is not None
    for line in proc.stdout:
        text = line.strip()
        if text == b"measuring":
            meter.start()
        elif text == b"done":
            cpu.update(meter.stop())
        elif text.startswith(b"{"):
            result: dict[str, Any] = orjson.loads(text)
            return result
    return None


# ---- test data


async def prepare_threads(target: Target, thread_ids: Sequence[str], messages: int = 0,
                          concurrency: int = 32) -> None:
    """Create the threads (PUT, idempotent) and append `messages` messages to each."""
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(target.url, headers=target.headers) as session:

        async def call(method: str, path: str, body: dict[str, Any]) -> None:
            async with sem, session.request(method, path, json=body) as resp:
                if resp.status >= 300:
                    raise HarnessError(f"{method} {path} during setup: {resp.status} "
                                       f"{await resp.text()}")

        await asyncio.gather(*(call("PUT", f"/v1/threads/{tid}", {"title": f"bench {tid}"})
                               for tid in thread_ids))
        await asyncio.gather(*(call("POST", f"/v1/threads/{tid}/messages", message_body(i))
                               for tid in thread_ids for i in range(messages)))


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def message_body(i: int = 0, content_chars: int = 200) -> dict[str, Any]:
    """A typical chat message: a couple of hundred characters and a little metadata."""
    text = f"message {i}: " + "lorem ipsum dolor sit amet " * (content_chars // 27 + 1)
    return {"role": "user", "content": text[:content_chars], "metadata": {"source": "bench"}}
