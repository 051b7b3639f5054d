"""create_app(settings): the one composition root. Startup order reads top to bottom; each
resource is a cleanup context, so teardown runs in reverse and one failure skips no other."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import keys, model, openapi, routes
from proxy.circuit import Circuit
from proxy.degraded import ClickHouseBacking
from proxy.errors import Unavailable
from proxy.failpoints import Failpoints
from proxy.fallback import PostgresBacking
from proxy.flusher import FlushConfig, Flusher
from proxy.hot import HotTier
from proxy.hub import WebSocketHub
from proxy.monitor import Monitor
from proxy.redisconn import connect
from proxy.settings import Settings
from proxy.sinks.clickhouse import ClickHouseSink, ClickHouseStore
from proxy.sinks.postgres import SCHEMA_ERRORS, PostgresSink, PostgresStore
from proxy.writelog import Backlog, Entry, WriteLog

logger = logging.getLogger(__name__)


class Health:
    """What /readyz reports: ready once started, not draining, no background worker dead."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False
        self.failed: list[str] = []

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and not self.failed


class Workers:
    """Owns the background tasks: starts them, turns readiness red if one dies, and cancels
    and awaits them all on exit."""

    def __init__(self, health: Health) -> None:
        self._health = health
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.create_task(self._guard(name, run), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("background worker %s crashed", name)
            self._health.failed.append(name)

    async def stop(self, deadline_s: float) -> None:
        """Give the workers deadline_s to finish what they hold, then cancel the rest."""
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=deadline_s)
        # Cancel until they end: a cancel can be lost. On Python 3.11 asyncio.wait_for, which
        # redis-py wraps around every command it sends, swallows a cancellation that arrives
        # as the send completes (CPython gh-86296), and the worker then just carries on.
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)


HEALTH = web.AppKey("health", Health)
WORKERS = web.AppKey("workers", Workers)
LOG = web.AppKey("log", WriteLog)
CONSUMER_LOG = web.AppKey("consumer_log", WriteLog)  # its own pool for blocking reads
REDIS = web.AppKey("redis", aioredis.Redis)
STORE = web.AppKey("store", PostgresStore)
CH_STORE = web.AppKey("ch_store", ClickHouseStore)
FAILPOINTS = web.AppKey("failpoints", Failpoints)  # tests switch them at runtime
FLUSHERS = web.AppKey("flushers", list[Flusher])


def consumer_name() -> str:
    """Unique per process (host + pid + start time), so no two processes share a PEL."""
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000)}"


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.api.max_body_bytes,
        middlewares=[routes.errors_middleware, routes.metrics_middleware,
                     routes.auth_middleware(settings.api.token),
                     routes.timeout_middleware(settings.api.request_timeout_s)])
    app[routes.SETTINGS] = settings
    app[HEALTH] = Health()
    app[WORKERS] = Workers(app[HEALTH])
    app[FLUSHERS] = []
    failpoints = app[FAILPOINTS] = Failpoints(settings.debug.failpoint)
    circuits = {group: Circuit(settings.circuit.failure_threshold, settings.circuit.open_s)
                for group in (keys.GROUP_PG, keys.GROUP_CH)}
    consumer = consumer_name()
    app.cleanup_ctx.append(_redis(settings))
    app.cleanup_ctx.append(_clickhouse(settings))
    app.cleanup_ctx.append(_postgres(settings, circuits[keys.GROUP_PG], failpoints))
    app.cleanup_ctx.append(_hub(settings))
    app.cleanup_ctx.append(_background(settings, circuits, consumer, failpoints))
    app.on_shutdown.append(_drain)
    app.on_shutdown.append(_close_sockets)
    routes.add_routes(app)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/openapi.json", openapi_json, allow_head=False)
    return app


def _redis(settings: Settings) -> Callable[[web.Application], Any]:
    """Redis for requests, a second pool for the log consumers' blocking reads."""

    @asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client = connect(settings, settings.redis.url)
        consumers = connect(settings, settings.redis.url, 2 * settings.redis.shards + 8)
        try:
            log = WriteLog(client, settings.redis.shards)
            await log.check_eviction_policy()
            await log.ensure_groups()
            app[REDIS] = client
            app[LOG] = log
            app[CONSUMER_LOG] = WriteLog(consumers, settings.redis.shards)
            yield
        finally:
            await consumers.aclose()
            await client.aclose()

    return lambda app: ctx(app)


def _postgres(settings: Settings, circuit: Circuit,
              failpoints: Failpoints) -> Callable[[web.Application], Any]:
    """The pool is lazy (min 0 at start), so a sidecar starts while PostgreSQL is down."""

    @asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pg = settings.postgres
        store = await PostgresStore.open(pg.url, 0, pg.pool_max, pg.command_timeout_s,
                                         failpoints)
        try:
            app[STORE] = store
            degraded = ClickHouseBacking(app[CH_STORE], settings.clickhouse.store_content)
            app[routes.HOT] = HotTier(app[REDIS], settings, PostgresBacking(store, circuit),
                                      Backlog(), degraded)
            yield
        finally:
            await store.close()

    return lambda app: ctx(app)


def _clickhouse(settings: Settings) -> Callable[[web.Application], Any]:
    """The client connects lazily and the schema is created in the background (see
    _background), so a sidecar starts while ClickHouse is down."""

    @asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = ClickHouseStore(settings.clickhouse.url)
        try:
            app[CH_STORE] = store
            app[routes.ANALYTICS] = store
            yield
        finally:
            await store.close()

    return lambda app: ctx(app)


def _hub(settings: Settings) -> Callable[[web.Application], Any]:
    """WebSocket push: the hub's pub/sub listener is its own worker (a crash turns /readyz
    red); it never finishes, so on exit it is cancelled at once."""

    @asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        hub = app[routes.HUB] = WebSocketHub(settings, app[routes.HOT])
        workers = Workers(app[HEALTH])
        workers.start("ws-hub", hub.run)
        yield
        await workers.stop(0)

    return lambda app: ctx(app)


def _background(settings: Settings, circuits: dict[str, Circuit], consumer: str,
                failpoints: Failpoints) -> Callable[[web.Application], Any]:
    """Flushers and the monitor; on exit they stop reading, finish the batch in hand within
    the shutdown deadline, and are cancelled past it."""

    @asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        f = settings.flush
        cfg = FlushConfig(f.max_batch, f.max_delay_ms, f.max_attempts, f.claim_idle_ms,
                          f.backoff_base_ms, f.backoff_max_ms)
        log, consumer_log = app[LOG], app[CONSUMER_LOG]

        async def release(shard: int, entries: list[Entry]) -> None:
            await log.release(shard, keys.GROUP_PG, entries, settings.cache.ttl_s * 1000,
                              settings.redis.window, model.now_ms())

        pg = Flusher(consumer_log, PostgresSink(app[STORE]), circuits[keys.GROUP_PG], cfg,
                     consumer, f.max_inflight, release, failpoints)
        app[FLUSHERS].append(pg)
        ch = _clickhouse_flusher(app, settings, cfg, circuits[keys.GROUP_CH], consumer,
                                 failpoints)
        app[FLUSHERS].append(ch)
        monitor = Monitor(log, circuits, app[routes.HOT].backlog, f.trim_interval_s, consumer,
                          2 * f.claim_idle_ms)
        app[routes.MONITOR] = monitor
        workers = app[WORKERS]
        workers.start("flusher-pg", lambda: _migrated(app[STORE], pg.run))
        workers.start("flusher-ch", lambda: _prepared(app[CH_STORE].create_schema, (Unavailable,),
                                                      "clickhouse schema", ch.run))
        workers.start("monitor", monitor.run)
        app[HEALTH].started = True
        yield
        for flusher in app[FLUSHERS]:
            flusher.stop()
        monitor.stop()
        await workers.stop(settings.shutdown.deadline_s)

    return lambda app: ctx(app)


def _clickhouse_flusher(app: web.Application, settings: Settings, pg_cfg: FlushConfig,
                        circuit: Circuit, consumer: str, failpoints: Failpoints) -> Flusher:
    """The ClickHouse streamer: the same loop with its own group, bigger and slower batches,
    every version kept (events, not state), a plain XACK (no cache TTLs to release)."""
    c, log = settings.clickhouse, app[LOG]
    cfg = dataclasses.replace(pg_cfg, max_batch=c.max_batch, max_delay_ms=c.interval_ms,
                              coalesce=False)

    async def ack(shard: int, entries: list[Entry]) -> None:
        await log.ack(shard, keys.GROUP_CH, [e.entry_id for e in entries])

    sink = ClickHouseSink(app[CH_STORE], consumer, c.store_content, failpoints)
    return Flusher(app[CONSUMER_LOG], sink, circuit, cfg, consumer, 1, ack, failpoints)


async def _migrated(store: PostgresStore, run: Callable[[], Awaitable[None]]) -> None:
    """Apply the schema (retrying while PostgreSQL is down), then run."""
    await _prepared(store.migrate, SCHEMA_ERRORS, "postgres schema", run)


async def _prepared(prepare: Callable[[], Awaitable[None]],
                    errors: tuple[type[Exception], ...], what: str,
                    run: Callable[[], Awaitable[None]]) -> None:
    """Prepare (retrying while the dependency is down), then run."""
    attempt = 0
    while True:
        try:
            await prepare()
            break
        except errors as e:
            attempt += 1
            if attempt in (1, 10) or attempt % 100 == 0:
                logger.warning("%s not applied yet (%s), retrying", what, e)
            await asyncio.sleep(min(5.0, 0.1 * 2 ** min(attempt, 6)))
    await run()


async def _drain(app: web.Application) -> None:
    """SIGTERM: readiness goes false at once, flushers stop reading new entries; aiohttp then
    lets in-flight requests finish."""
    app[HEALTH].draining = True
    for flusher in app[FLUSHERS]:
        flusher.stop()


async def _close_sockets(app: web.Application) -> None:
    """SIGTERM: WebSockets close with 1001 before aiohttp waits for the handlers."""
    hub = app.get(routes.HUB)
    if hub is not None:
        await hub.shutdown()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readiness(app: web.Application) -> web.Response:
    """Ready = started, not draining, no worker dead, Redis answering."""
    health = app[HEALTH]
    problems = list(health.failed)
    if not health.started:
        problems.append("starting")
    if health.draining:
        problems.append("draining")
    if not problems:
        try:
            await asyncio.wait_for(app[REDIS].ping(), 1.0)
        except Exception as e:  # any failure means not ready; the reason is reported
            problems.append(f"redis: {e or type(e).__name__}")
    return web.Response(body=orjson.dumps({"ready": not problems, "problems": problems}),
                        status=200 if not problems else 503, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    return await readiness(request.app)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(openapi.DOCUMENT), content_type="application/json")


def create_metrics_app(api: web.Application) -> web.Application:
    """/metrics on its own port (scrapable from outside the pod), plus the probes, since the
    API itself listens on loopback only."""
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def ready(request: web.Request) -> web.Response:
        return await readiness(api)

    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", ready, allow_head=False)
    return app
