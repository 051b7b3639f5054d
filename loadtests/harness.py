"""What the load scripts share: the servers under test, the load client process, test data.

- `Stack`: embedded Redis + PostgreSQL (unless URLs are given), a tierproxy sidecar
  subprocess (`python -m proxy serve`) and the baselines (`baselines=True`): the bare
  aiohttp server (`bare_server.py`, the ceiling) and the old way (`oldway_server.py`, one
  synchronous PostgreSQL transaction per append) on the local PostgreSQL and on one that
  takes 20 ms per transaction; all under one temporary directory, stopped in reverse order
  on exit, errors and Ctrl-C included. `restart_sidecar`/`kill_sidecar` replace the sidecar
  (a paused flusher, a crash); `extra_sidecar` runs another on the same Redis and
  PostgreSQL; `memory` watches the RSS of every sidecar process the stack started.
- `run_load`: runs `loadgen.py` in its own process and samples the servers' CPU during its
  measured window, so a result says whether the server or the client was the limit
  (`wrkload.run_wrk` does the same with wrk).
- `prepare_threads`: creates the threads (and messages) a scenario needs before it is timed.

The scripts call the API through `proxy.client` (`Target.client()`), except where the call
is the measurement: loadgen.py and wrk send pre-built requests on their own connections, the
same to every baseline (which are no tierproxy), and time each one.

Used by bench.py, the other load scripts and tests/test_loadtests.py; not by the locustfile
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import psutil
from loadgen import Spec
from procs import MemoryWatch, TreeMeter

from proxy.client import Client, ClientError
from proxy.embedded import PostgresServer, RedisServer, free_port
from proxy.embedded import clickhouse_url as chdb_url

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOADGEN = HERE / "loadgen.py"
BARE_SERVER = HERE / "bare_server.py"
OLDWAY_SERVER = HERE / "oldway_server.py"
SLOW_PG_MS = 20  # the old way's loaded PostgreSQL: pg_sleep(0.02) in every transaction
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


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
        return children
    return []


def _kill_all(procs: Sequence[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=_STOP_TIMEOUT_S)


class Service:
    """A server subprocess with its output in a log file; ready when `ready_url` answers 200.
    It may be a process tree (a supervisor and its workers): stopping it stops them all."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, ready_url: str,
                 env: dict[str, str] | None = None,
                 ready_timeout_s: float = _READY_TIMEOUT_S) -> None:
        self.name, self.argv, self.log, self.ready_url, self.env = name, argv, log, ready_url, env
        self.ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._deadline = 0.0

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise HarnessError(f"{self.name}: not started")
        return self._proc.pid

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it (several start faster side by side)."""
        with open(self.log, "ab") as out:
            self._proc = subprocess.Popen(
                list(self.argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO,
                env=self.env, preexec_fn=_die_with_parent())
        self._deadline = time.monotonic() + self.ready_timeout_s

    def wait_ready(self) -> None:
        """Until `ready_url` answers 200; stops the process and raises if it exits first or
        takes longer than ready_timeout_s from its launch."""
        proc = self._proc
        if proc is None:
            raise HarnessError(f"{self.name}: not launched")
        while not _get_ok(self.ready_url):
            if proc.poll() is not None or time.monotonic() > self._deadline:
                code = proc.poll()
                self.stop()
                raise HarnessError(f"{self.name} not ready at {self.ready_url} (exit code "
                                   f"{code}); {self.log} tail:\n{_tail(self.log)}")
            time.sleep(0.05)

    def terminate(self) -> None:
        """SIGTERM without waiting (stop() then waits): several stop faster side by side."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited in time; always reaps the process.
        Descendants still alive once it has exited (a supervisor that did not stop its
        workers) are killed."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return  # never started, or stopped and reaped (its pid may be another's now)
        children = _descendants(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        _kill_all([c for c in children if c.is_running()])

    def kill(self) -> None:
        """SIGKILL the process and every descendant at once, like a crashed pod: no cleanup,
        no final flush."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        children = _descendants(proc.pid)
        proc.kill()
        _kill_all(children)
        proc.wait()


@dataclass(frozen=True)
class Target:
    """A server the load client can hit, and the process trees whose CPU its answers cost."""

    name: str
    url: str
    cpu_pids: dict[str, int]
    token: str = ""  # the API's bearer token ("": none)
    log: Path | None = None  # its output, shown when a setup step fails

    @property
    def headers(self) -> dict[str, str]:
        """What every request to it carries (loadgen, wrk): the token, if any."""
        return auth_headers(self.token)

    def client(self, **options: Any) -> Client:
        """A proxy.client.Client of it (`options`: the Client's, e.g. retry=NO_RETRY)."""
        return Client(self.url, token=self.token or None, **options)


@dataclass(frozen=True)
class Sidecar:
    """One `tierproxy serve` subprocess (or process tree) and where it answers."""

    name: str
    service: Service
    port: int
    metrics_port: int

    @property
    def pid(self) -> int:
        return self.service.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def _sidecar_env(redis_url: str, postgres_url: str, ch_url: str, token: str) -> dict[str, str]:
    """The caller's environment without its TIERPROXY_* settings, plus ours: a developer's
    shell must not change what is benchmarked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPROXY_")}
    env.update(TIERPROXY_REDIS_URL=redis_url, TIERPROXY_POSTGRES_URL=postgres_url,
               TIERPROXY_CLICKHOUSE_URL=ch_url, TIERPROXY_API_TOKEN=token,
               TIERPROXY_LOG_LEVEL="warning",
               # Shutdown is not measured: keep a sidecar's final flush deadline short.
               TIERPROXY_SHUTDOWN_DEADLINE_S=str(_SIDECAR_SHUTDOWN_S))
    return env


class Stack:
    """Redis, PostgreSQL, the sidecar and (if `baselines`) the bare aiohttp server and the
    old way on the local and on the 20 ms PostgreSQL, under `root`.

    Give `redis_url`/`postgres_url`/`clickhouse_url` to use running servers instead of the
    embedded ones (Redis and PostgreSQL are started here; chDB is a directory).
    """

    def __init__(self, root: Path, *, token: str = "", redis_url: str = "",
                 postgres_url: str = "", clickhouse_url: str = "",
                 baselines: bool = True) -> None:
        self.root = root.resolve()
        self.token = token
        self.redis_url = redis_url
        self.postgres_url = postgres_url
        self.clickhouse_url = clickhouse_url
        self.with_baselines = baselines
        self.redis_pid: int | None = None
        self.postgres_pid: int | None = None
        self.sidecar: Target | None = None  # the main sidecar, as the load client sees it
        self.bare: Target | None = None
        self.oldway: Target | None = None
        self.oldway_slow: Target | None = None
        self.memory = MemoryWatch(self._sidecar_roots, self._sidecar_ports)
        self._main: Sidecar | None = None
        self._sidecars: dict[str, Sidecar] = {}  # every sidecar running now, by name
        self._services: list[Service] = []  # every server subprocess started, to stop on exit
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
        # chDB runs inside the sidecar process: its inserts and merges use the sidecar's CPU,
        # which an external ClickHouse (--clickhouse-url) would not.
        self.clickhouse_url = self.clickhouse_url or chdb_url(self.root)
        # Launched side by side, then waited for: Python servers take a while to import.
        sidecar = self.start_sidecar("sidecar", wait=False)
        baselines = self._baselines() if self.with_baselines else {}
        for service, _url in baselines.values():
            service.launch()
            self._exit.callback(service.stop)
            self._services.append(service)
        for service in [sidecar.service] + [service for service, _ in baselines.values()]:
            service.wait_ready()
        self._set_main(sidecar)
        for name, (service, url) in baselines.items():  # the old way's database is its cost
            databases = self._servers() if name != "bare" else {}
            setattr(self, name, Target(name, url, {name: service.pid, **databases}))
        self.memory.start()
        self._exit.callback(self.memory.stop)
        self._exit.callback(self._terminate_all)  # runs first on exit (last registered)

    def _terminate_all(self) -> None:
        """SIGTERM every server at once; each one's stop callback then waits for it."""
        for service in self._services:
            service.terminate()

    @property
    def metrics_url(self) -> str:
        """The main sidecar's Prometheus endpoint."""
        return self.main_sidecar().metrics_url

    @property
    def server_pids(self) -> dict[str, int]:
        """The processes that keep working after a run (flushing): settle() waits for them."""
        return self.sidecar.cpu_pids if self.sidecar else {}

    def _servers(self) -> dict[str, int]:
        servers = {"redis": self.redis_pid, "postgres": self.postgres_pid}
        return {k: v for k, v in servers.items() if v is not None}

    def main_sidecar(self) -> Sidecar:
        if self._main is None:
            raise HarnessError("the main sidecar is not running")
        return self._main

    def _set_main(self, sidecar: Sidecar | None) -> None:
        self._main = sidecar
        self.sidecar = None if sidecar is None else Target(
            "sidecar", sidecar.url, {"sidecar": sidecar.pid, **self._servers()}, self.token,
            sidecar.service.log)

    def _sidecar_roots(self) -> Mapping[str, int]:
        return {name: s.pid for name, s in list(self._sidecars.items())}

    def _sidecar_ports(self) -> Mapping[str, int]:
        return {name: s.port for name, s in list(self._sidecars.items())}

    def start_sidecar(self, name: str, env: Mapping[str, str] | None = None, port: int = 0,
                      metrics_port: int = 0, wait: bool = True) -> Sidecar:
        """Start a sidecar on this stack's Redis, PostgreSQL and ClickHouse, with `env`
        added to its environment (e.g. TIERPROXY_DEBUG_FAILPOINT); its log is <root>/<name>.log.
        Returns once it is ready, unless not `wait` (then call its service's wait_ready()).
        stop_sidecar() stops it; so does leaving the stack."""
        port, metrics_port = port or free_port(), metrics_port or free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "proxy", "serve", "--port", str(port),
                "--metrics-port", str(metrics_port),
                "--data-dir", str(self.root / name)]
        full_env = {**_sidecar_env(self.redis_url, self.postgres_url, self.clickhouse_url,
                                   self.token), **(env or {})}
        service = Service(name, argv, self.root / f"{name}.log", f"{url}/readyz", full_env)
        service.launch()
        self._exit.callback(service.stop)  # a no-op once stopped
        self._services.append(service)
        if wait:
            service.wait_ready()
        sidecar = Sidecar(name, service, port, metrics_port)
        self._sidecars[name] = sidecar
        return sidecar

    def stop_sidecar(self, sidecar: Sidecar, kill: bool = False) -> None:
        """SIGTERM (or with `kill`, SIGKILL of the whole tree) and forget it."""
        self._sidecars.pop(sidecar.name, None)
        if sidecar is self._main:
            self._set_main(None)
        if kill:
            sidecar.service.kill()
        else:
            sidecar.service.stop()

    def restart_sidecar(self, env: Mapping[str, str] | None = None, kill: bool = False) -> None:
        """Replace the main sidecar by one with `env` added, on the same ports and data
        directory (the same URLs for the scenarios); `kill`: SIGKILL the old one (a crash)."""
        old = self.main_sidecar()
        self.stop_sidecar(old, kill=kill)
        self._set_main(self.start_sidecar("sidecar", env, old.port, old.metrics_port))

    @contextlib.contextmanager
    def extra_sidecar(self, name: str) -> Iterator[Sidecar]:
        """Another sidecar on the same servers (own data directory, own chDB) while inside."""
        sidecar = self.start_sidecar(name, {"TIERPROXY_CLICKHOUSE_URL":
                                            chdb_url(self.root / name)})
        try:
            yield sidecar
        finally:
            self.stop_sidecar(sidecar)

    def _baseline(self, name: str, argv: Sequence[str]) -> tuple[Service, str]:
        """The service of a baseline server (not launched yet) and its URL."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        return Service(name, [*argv, "--port", str(port)], self.root / f"{name}.log",
                       f"{url}/readyz"), url

    def _baselines(self) -> dict[str, tuple[Service, str]]:
        def oldway(name: str, sleep_ms: int) -> tuple[Service, str]:
            return self._baseline(name, [sys.executable, str(OLDWAY_SERVER), "--postgres-url",
                                         self.postgres_url, "--schema", name,
                                         "--sleep-ms", str(sleep_ms)])

        return {"bare": self._baseline("bare", [sys.executable, str(BARE_SERVER)]),
                "oldway": oldway("oldway", 0), "oldway_slow": oldway("oldway_slow", SLOW_PG_MS)}


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


def with_others(cpu: dict[str, float], extra: float = 0.0) -> dict[str, float]:
    """Replace `machine` (a TreeMeter's whole-machine figure) by `others`: what processes
    we did not measure used (another job on the box, if large); `extra` is CPU of ours
    already in `machine` but not in `cpu` (the client)."""
    out = dict(cpu)
    if "machine" in out:
        machine = out.pop("machine")
        out["others"] = round(max(0.0, machine - sum(out.values()) - extra), 1)
    return out


def settle(pids: dict[str, int], below_pct: float = 10.0, window_s: float = 0.5,
           timeout_s: float = 60.0) -> float:
    """Wait until these processes together use less than `below_pct` of a core (the sidecar
    flushing what the previous run wrote would skew the next run); return the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        meter = TreeMeter(pids)
        meter.start()
        time.sleep(window_s)
        used = meter.stop()
        used.pop("machine", None)
        if sum(used.values()) < below_pct:
            break
    return time.monotonic() - started


def run_load(target: Target, spec: Spec) -> dict[str, Any]:
    """Run loadgen.py against `target` and return its summary plus `cpu_pct`: % of one core
    used in the measured window by each server process tree and by the client."""
    spec = dataclasses.replace(spec, base_url=target.url,
                               headers={**spec.headers, **target.headers})
    meter = TreeMeter(target.cpu_pids)
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
    client = round(100.0 * result["client_cpu_s"] / spec.duration_s, 1)
    cpu = with_others(cpu, client)
    cpu["client"] = client
    return {**result, "target": target.name, "cpu_pct": cpu, "cpu_s": meter.cpu_s}


def _read_result(proc: subprocess.Popen[bytes], meter: TreeMeter,
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
    """Create the threads (PUT, idempotent) and append `messages` messages to each. Not
    measured: the client's retries are welcome here."""
    sem = asyncio.Semaphore(concurrency)  # queued calls wait here, not on the client's timeout
    async with target.client(connections=concurrency) as c:

        async def put(tid: str) -> None:
            async with sem:
                with _setup_step(target, f"PUT thread {tid}"):
                    await c.put_thread(tid, title=f"bench {tid}")

        async def append(tid: str, i: int) -> None:
            m = message_body(i)
            async with sem:
                with _setup_step(target, f"append to {tid}"):
                    await c.append(tid, m["content"], role=m["role"], metadata=m["metadata"])

        await asyncio.gather(*(put(tid) for tid in thread_ids))
        await asyncio.gather(*(append(tid, i) for tid in thread_ids for i in range(messages)))


@contextlib.contextmanager
def _setup_step(target: Target, what: str) -> Iterator[None]:
    """The client's error as the harness's, naming the target and the step."""
    try:
        yield
    except ClientError as e:
        log = f"; {target.log} tail:\n{_tail(target.log)}" if target.log else ""
        raise HarnessError(f"{target.name}: {what} during setup: {e}{log}") from e


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def message_body(i: int = 0, content_chars: int = 200) -> dict[str, Any]:
    """A typical chat message: a couple of hundred characters and a little metadata."""
    text = f"message {i}: " + "lorem ipsum dolor sit amet " * (content_chars // 27 + 1)
    return {"role": "user", "content": text[:content_chars], "metadata": {"source": "bench"}}
