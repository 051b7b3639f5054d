"""The nemesis cluster: three sidecar subprocesses on one Redis of their own (AOF with
`appendfsync always`, so a kill -9 of Redis loses nothing acknowledged), the session's
PostgreSQL, and one chDB directory.

chDB is one process per directory, so only sidecar 0 streams to ClickHouse (`flush.sinks =
pg,ch`, on its own directory, reopened when it restarts); sidecars 1 and 2 flush to PostgreSQL
only and point at a ClickHouse nobody listens on, so their degraded reads answer 503 (like
sidecars that cannot reach ClickHouse) instead of reading an empty engine of their own.
With `write_through`, every sidecar serves from PostgreSQL alone while Redis is down.

Settings make churn: flushed keys expire after 1 s, a thread's window holds 3 flushed
messages, dead consumers' entries are claimed after 1.5 s, an entry is dead-lettered after 3
failed attempts, and dead-letter replays stall 0.5 s between reading and moving the letters
(so two replays at once race)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import psutil

from proxy.embedded import PostgresServer, RedisServer, clickhouse_url
from tests.sidecar import Sidecar

SIDECARS = 3
UNREACHABLE_CLICKHOUSE = "http://127.0.0.1:1/default"
ALWAYS_FAILPOINTS = "before-replay-move:sleep:0.5"
CHURN = {
    "TIERPROXY_CACHE_TTL_S": "1", "TIERPROXY_REDIS_WINDOW": "3",
    "TIERPROXY_FLUSH_MAX_ATTEMPTS": "3", "TIERPROXY_FLUSH_BACKOFF_BASE_MS": "20",
    "TIERPROXY_API_REQUEST_TIMEOUT_S": "4", "TIERPROXY_POSTGRES_COMMAND_TIMEOUT_S": "3",
    "TIERPROXY_REDIS_SOCKET_TIMEOUT_S": "2", "TIERPROXY_REDIS_HEALTH_CHECK_INTERVAL_S": "1",
}


class Cluster:
    """Starts, kills, pauses and restarts the processes; `url(i)` is sidecar i's address now
    (a restarted sidecar listens on a new port)."""

    def __init__(self, root: Path, postgres: PostgresServer, postgres_url: str, *,
                 write_through: bool = False) -> None:
        self.root = root
        self.write_through = write_through
        self.redis = RedisServer(root / "redis", extra_args=["--appendfsync", "always"])
        self.postgres = postgres
        self.postgres_url = postgres_url
        self.size = SIDECARS
        self._sidecars: list[Sidecar | None] = [None] * SIDECARS
        self._paused: set[int] = set()
        self.log_paths: list[Path] = []

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def clickhouse_url(self) -> str:
        """Sidecar 0's chDB: query it only while sidecar 0 is stopped."""
        return clickhouse_url(self.root / "s0")

    def url(self, i: int) -> str:
        sidecar = self._sidecars[i]
        assert sidecar is not None, f"sidecar {i} was never started"
        return sidecar.url

    def running(self, i: int) -> bool:
        """Up and answering (not killed, not paused)."""
        sidecar = self._sidecars[i]
        return (sidecar is not None and sidecar.proc is not None
                and sidecar.proc.poll() is None and i not in self._paused)

    async def start(self) -> None:
        # Redis from this (the main) thread: it dies with the thread that started it.
        self.redis.start()
        await asyncio.gather(*(self.restart(i) for i in range(self.size)))

    async def restart(self, i: int, failpoints: str = "") -> None:
        """kill -9 sidecar i if it runs, then start it (with extra failpoints) and wait until
        it is ready."""
        await self.kill(i)
        data = self.root / f"s{i}"
        spec = ",".join(filter(None, [ALWAYS_FAILPOINTS, failpoints]))
        sidecar = Sidecar(data, self.redis.url, self.postgres_url,
                          self.clickhouse_url if i == 0 else UNREACHABLE_CLICKHOUSE,
                          TIERPROXY_FLUSH_SINKS="pg,ch" if i == 0 else "pg",
                          TIERPROXY_DEBUG_FAILPOINT=spec,
                          TIERPROXY_REDIS_WRITE_THROUGH=str(self.write_through).lower(), **CHURN)
        self._sidecars[i] = sidecar
        self.log_paths.append(sidecar.log_path)
        await _start(sidecar)

    async def kill(self, i: int) -> None:
        """kill -9 (a stopped process dies too)."""
        sidecar = self._sidecars[i]
        if sidecar is not None:
            await asyncio.to_thread(sidecar.kill)
        self._paused.discard(i)

    def pause(self, i: int) -> None:
        self._signal(i, signal.SIGSTOP)
        self._paused.add(i)

    def resume(self, i: int) -> None:
        self._paused.discard(i)
        self._signal(i, signal.SIGCONT)

    def _signal(self, i: int, sig: signal.Signals) -> None:
        """To every process of the sidecar (its supervisor, API processes and worker)."""
        sidecar = self._sidecars[i]
        if sidecar is not None and sidecar.proc is not None and sidecar.proc.poll() is None:
            tree = psutil.Process(sidecar.proc.pid)
            for p in [tree, *tree.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)

    async def stop(self, i: int) -> None:
        """SIGTERM and wait (the final flush runs), kill -9 if it hangs."""
        sidecar = self._sidecars[i]
        if sidecar is not None:
            self.resume(i)
            await asyncio.to_thread(sidecar.stop)

    async def close(self) -> None:
        for i in range(self.size):
            await self.kill(i)
        self.redis.stop()

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every sidecar log (one file per start), for a failure report."""
        out = []
        for path in self.log_paths:
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {path}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


async def _start(sidecar: Sidecar, timeout_s: float = 60.0) -> None:
    """Start and wait until ready; a sidecar that exits during startup (it needs Redis, which
    may be restarting) is started again, as a kubelet would."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await asyncio.to_thread(sidecar.start, timeout_s)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)  # a crash-looping container's restart delay
