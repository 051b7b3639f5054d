"""Between the processes of one sidecar: the worker answers on a unix socket
(`worker.socket`) what only it knows — its monitor's status (backlog, lag, circuits, dead
letters: what API processes admit writes by and report in /v1/status and /readyz) and, when
ClickHouse is embedded chDB (which only one process may open, and the worker streams to it),
the ClickHouse reads behind /stats and degraded reads. With a ClickHouse server, API processes
query it themselves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.backends import MessageRow, ThreadRow
from proxy.backends.clickhouse import ClickHouseStore
from proxy.errors import Unavailable
from proxy.monitor import Monitor
from proxy.workers import Health
from proxy.writelog import Backlog

logger = logging.getLogger(__name__)
POLL_S = 0.25  # how often an API process asks the worker for its status (a local socket)
STALE_S = 5.0  # a status older than this: the worker does not answer


MONITOR = web.AppKey("monitor", Monitor)
CH_STORE = web.AppKey("ch_store", ClickHouseStore)
WORKER_HEALTH = web.AppKey("worker_health", Health)


# ---- the worker's side


async def status(request: web.Request) -> web.Response:
    monitor, health = request.app[MONITOR], request.app[WORKER_HEALTH]
    return _json({"status": monitor.status(), "stuck": monitor.stuck() + health.failed,
                  "measured": monitor.measured, "load": vars(monitor.load())})


async def stats(request: web.Request) -> web.Response:
    return _json(await request.app[CH_STORE].thread_stats(request.match_info["tid"]))


async def thread(request: web.Request) -> web.Response:
    row = await request.app[CH_STORE].fetch_thread(request.match_info["tid"])
    return _json(None if row is None else _thread(row))


async def messages(request: web.Request) -> web.Response:
    q = request.query
    rows = await request.app[CH_STORE].fetch_messages(request.match_info["tid"], int(q["lo"]),
                                                      int(q["hi"]))
    return _json([_message(r) for r in rows])


async def message(request: web.Request) -> web.Response:
    row = await request.app[CH_STORE].fetch_message(request.match_info["tid"],
                                                    request.match_info["mid"])
    return _json(None if row is None else _message(row))


def worker_routes(app: web.Application) -> None:
    """What the worker answers on its socket (to API processes only)."""
    r = app.router
    r.add_get("/internal/status", status)
    r.add_get("/internal/stats/{tid}", stats)
    r.add_get("/internal/thread/{tid}", thread)
    r.add_get("/internal/messages/{tid}", messages)
    r.add_get("/internal/message/{tid}/{mid}", message)


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _thread(row: ThreadRow) -> dict[str, Any]:
    return {"doc": orjson.loads(row.doc), "version": row.version, "created_at": row.created_at,
            "last_seq": row.last_seq, "deleted": row.deleted}


def _message(row: MessageRow) -> dict[str, Any]:
    return {"mid": row.mid, "seq": row.seq, "version": row.version,
            "fingerprint": row.fingerprint, "doc": orjson.loads(row.doc)}


# ---- the API processes' side


class WorkerLink:
    """HTTP over the worker's unix socket; any failure is Unavailable."""

    def __init__(self, socket_path: str) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=socket_path),
            timeout=aiohttp.ClientTimeout(total=10))

    async def get(self, path: str, **params: Any) -> Any:
        try:
            async with self._session.get(f"http://worker{path}", params=params) as resp:
                if resp.status != 200:
                    raise Unavailable(f"worker: {path} answered {resp.status}")
                return orjson.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise Unavailable(f"worker: {path}: {e or type(e).__name__}") from e

    async def aclose(self) -> None:
        await self._session.close()


class RemoteStatus:
    """The worker's monitor as an API process sees it: polled once a second; what routes and
    readiness read (as they read a Monitor in a single process)."""

    def __init__(self, link: WorkerLink, backlog: Backlog) -> None:
        self._link = link
        self._backlog = backlog
        self._last: dict[str, Any] = {}
        self._at = 0.0
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._last, self._at = await self._link.get("/internal/status"), time.monotonic()
                vars(self._backlog).update(self._last["load"])
            except Unavailable as e:
                logger.debug("worker status: %s", e)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._stopping.wait()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def measured(self) -> bool:
        return bool(self._last.get("measured"))

    def status(self) -> dict[str, Any]:
        if not self._last:
            return {"tiers": {"redis": {"state": "unknown"}}, "sinks": {},
                    "degraded": ["worker: no status yet"]}
        return dict(self._last["status"])

    def stuck(self) -> list[str]:
        age = time.monotonic() - self._at
        if self._at and age > STALE_S:
            return [f"worker: no status for {age:.0f} s"]
        return list(self._last.get("stuck", []))

    def lag_s(self, sink: str) -> float:
        return float(self._last.get("status", {}).get("sinks", {}).get(sink, {}).get("lag_s", 0))


class WorkerAnalytics:
    """The ClickHouse reads of /stats and degraded reads, answered by the worker (chDB)."""

    def __init__(self, link: WorkerLink) -> None:
        self._link = link

    async def thread_stats(self, tid: str) -> dict[str, Any] | None:
        stats: dict[str, Any] | None = await self._link.get(f"/internal/stats/{tid}")
        return stats

    async def fetch_thread(self, tid: str) -> ThreadRow | None:
        r = await self._link.get(f"/internal/thread/{tid}")
        return None if r is None else ThreadRow(orjson.dumps(r["doc"]), r["version"],
                                                r["created_at"], r["last_seq"], r["deleted"])

    async def fetch_messages(self, tid: str, lo: int, hi: int) -> list[MessageRow]:
        return [_message_row(r) for r in await self._link.get(f"/internal/messages/{tid}",
                                                               lo=lo, hi=hi)]

    async def fetch_message(self, tid: str, mid: str) -> MessageRow | None:
        r = await self._link.get(f"/internal/message/{tid}/{mid}")
        return None if r is None else _message_row(r)


def _message_row(r: dict[str, Any]) -> MessageRow:
    return MessageRow(r["mid"], r["seq"], r["version"], r["fingerprint"], orjson.dumps(r["doc"]))
