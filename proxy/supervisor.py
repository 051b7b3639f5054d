"""The supervisor of `tierproxy serve`: it runs the API in `--workers` processes sharing the API
port (SO_REUSEPORT) and the background work (flushers, streamer, trimmer, monitor) in one
worker process, restarts any that dies (with backoff), and stops them in order on SIGTERM:
the API processes drain first, then the worker makes its final flush.

It also serves the metrics port: /metrics adds up every process's metrics (prometheus-client's
multiprocess mode, in a directory of its own), /healthz says the supervisor lives, /readyz asks
an API process (the API listens on loopback only, so kubelet probes come here) and says which
process is down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.backoff import Backoff
from proxy.embedded.common import die_with_parent
from proxy.settings import Settings

logger = logging.getLogger(__name__)
POLL_S = 0.2  # how often children are checked
UP_FOR_S = 30.0  # a child that ran this long has its restart backoff reset


@dataclass
class Child:
    role: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 10.0))
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, settings: Settings, role: str, workers: int, argv: list[str],
                 env: dict[str, str]) -> None:
        self._s = settings
        self._run_dir = Path(tempfile.mkdtemp(prefix="tierproxy-run-"))
        self._metrics_dir = self._run_dir / "metrics"
        self._metrics_dir.mkdir()
        self._env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir),
                     "TIERPROXY_WORKER_SOCKET": settings.worker.socket
                     or str(self._run_dir / "worker.sock")}
        base = [sys.executable, "-m", "proxy", "serve", "--child", *argv]
        self._children = [Child("api", [*base, "--role", "api"]) for _ in range(workers)]
        if role == "all":
            self._children.append(Child("worker", [*base, "--role", "worker"]))
        self._stopping = asyncio.Event()

    async def run(self) -> int:
        """Until SIGTERM/SIGINT; then the ordered stop. 0 on a clean stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        metrics = await self._serve_metrics()
        try:
            for child in self._children:
                self._start(child)
            announce = asyncio.create_task(self._announce_when_ready())
            while not self._stopping.is_set():
                self._watch()
                await _sleep_or(self._stopping, POLL_S)
            announce.cancel()
            await self._stop_in_order()
            return 0
        finally:
            await metrics.cleanup()
            shutil.rmtree(self._run_dir, ignore_errors=True)

    async def _announce_when_ready(self) -> None:
        """Say where it listens once an API process answers ready (what tests and `make run`
        wait for), and every 10 s until then why not."""
        waited = time.monotonic()
        while problems := await _api_readiness(self._s):
            if time.monotonic() - waited >= 10:
                logger.warning("not ready yet: %s", "; ".join(problems))
                waited = time.monotonic()
            await asyncio.sleep(POLL_S)
        apis = sum(c.role == "api" for c in self._children)
        worker = ", 1 worker" if any(c.role == "worker" for c in self._children) else ""
        print(f"tierproxy listening on http://{self._s.api.host}:{self._s.api.port} "
              f"(metrics on http://{self._s.metrics.host}:{self._s.metrics.port}/metrics; "
              f"{apis} API process(es){worker})", flush=True)

    # ---- children

    def _start(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.argv, env=self._env, stdin=subprocess.DEVNULL,
                                      preexec_fn=die_with_parent(os.getpid(), signal.SIGKILL))
        child.started = time.monotonic()
        logger.info("started %s process %d", child.role, child.proc.pid)

    def _watch(self) -> None:
        """Restart what died, after its backoff."""
        now = time.monotonic()
        for child in self._children:
            if child.proc is not None and child.proc.poll() is not None:
                self._died(child, now)
            elif child.proc is None and now >= child.restart_at:
                self._start(child)

    def _died(self, child: Child, now: float) -> None:
        assert child.proc is not None
        code, pid = child.proc.returncode, child.proc.pid
        _forget_metrics(self._metrics_dir, pid)
        if now - child.started > UP_FOR_S:
            child.backoff.reset()
        delay = child.backoff.failed()
        logger.error("%s process %d exited with %s; restarting in %.1f s", child.role, pid,
                     code, delay)
        child.proc, child.restart_at = None, now + delay

    async def _stop_in_order(self) -> None:
        """Every process gets SIGTERM at once, so all share one deadline: the API processes
        drain (readiness red, in-flight requests answered, sockets 1001) while the worker keeps
        flushing; once they are gone, SIGUSR1 tells the worker to make its final flush."""
        started = time.monotonic()
        live = [c for c in self._children if c.proc is not None]
        for child in live:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        for role in ("api", "worker"):
            for child in (c for c in live if c.role == role):
                assert child.proc is not None
                if role == "worker" and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGUSR1)
                left = max(1.0, self._s.shutdown.deadline_s + 2 - (time.monotonic() - started))
                await asyncio.to_thread(_wait_or_kill, child, left)
        logger.info("%6.2fs all processes stopped", time.monotonic() - started)

    # ---- the metrics port

    async def _serve_metrics(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics, allow_head=False)
        app.router.add_get("/healthz", _healthz, allow_head=False)
        app.router.add_get("/readyz", self._readyz, allow_head=False)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self._s.metrics.host, self._s.metrics.port).start()
        return runner

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._metrics_dir))  # type: ignore[no-untyped-call]
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _readyz(self, request: web.Request) -> web.Response:
        problems = [f"{c.role} process down" for c in self._children
                    if c.proc is None or c.proc.poll() is not None]
        if self._stopping.is_set():
            problems.append("draining")
        api = await _api_readiness(self._s) if not problems else None
        if api is not None:
            problems += api
        body = {"ready": not problems, "problems": problems}
        return web.json_response(body, status=200 if not problems else 503)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _api_readiness(s: Settings) -> list[str]:
    """What an API process's /readyz says is wrong (it answers for the worker too)."""
    host = "127.0.0.1" if s.api.host in ("0.0.0.0", "") else s.api.host
    url = f"http://{host}:{s.api.port}/readyz"
    headers = {"Authorization": f"Bearer {s.api.token}"} if s.api.token else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http, \
                http.get(url, headers=headers) as resp:
            body = await resp.json()
            return list(body.get("problems", [])) if resp.status != 200 else []
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return [f"api: not answering ({e or type(e).__name__})"]


def _wait_or_kill(child: Child, timeout_s: float) -> None:
    assert child.proc is not None
    try:
        child.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        logger.error("%s process %d did not stop within %.0f s; killing it", child.role,
                     child.proc.pid, timeout_s)
        child.proc.kill()
        child.proc.wait()


def _forget_metrics(path: Path, pid: int) -> None:
    """A dead process's live gauges no longer count (its counters still do)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass
