"""create_app(settings): the one composition root.

`_services` builds everything in one sequence that reads top to bottom as the startup order;
teardown is its reverse (an AsyncExitStack), one failure skipping no other. aiohttp runs it as
a cleanup context, so on SIGTERM the order is: readiness red and WebSockets closed with 1001
(on_shutdown), in-flight requests finish, then the teardown — the flushers' final flush comes
after the last handler, so it takes their writes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import openapi, routes
from proxy.backends import CH, GROUPS, PG, SINKS
from proxy.backends.clickhouse import ClickHouseBacking, ClickHouseSink, ClickHouseStore
from proxy.backends.postgres import SCHEMA_ERRORS, PostgresBacking, PostgresSink, PostgresStore
from proxy.backoff import Backoff
from proxy.circuit import Circuit
from proxy.errors import Unavailable
from proxy.failpoints import Failpoints
from proxy.flusher import FlushConfig, Flusher
from proxy.hot import HotTier
from proxy.hub import WebSocketHub
from proxy.monitor import Monitor
from proxy.reconcile import Reconciler
from proxy.redisconn import RedisClient, connect
from proxy.settings import Settings
from proxy.workers import Health, Workers
from proxy.writelog import Backlog, WriteLog

logger = logging.getLogger(__name__)
HEALTH = web.AppKey("health", Health)
REDIS = web.AppKey("redis", RedisClient)
FAILPOINTS = web.AppKey("failpoints", Failpoints)  # tests switch them at runtime


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
    app[FAILPOINTS] = Failpoints(settings.debug.failpoint)
    app.cleanup_ctx.append(_services)
    app.on_shutdown.append(_drain)
    routes.add_routes(app)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/openapi.json", openapi_json, allow_head=False)
    return app


async def _services(app: web.Application) -> AsyncIterator[None]:
    s, health, failpoints = app[routes.SETTINGS], app[HEALTH], app[FAILPOINTS]
    async with AsyncExitStack() as stack:
        # 1. Redis: one pool for requests, one for the log consumers' blocking reads.
        client = connect(s, s.redis.url)
        stack.push_async_callback(client.aclose)
        consumers = connect(s, s.redis.url, 2 * s.redis.shards + 8)
        stack.push_async_callback(consumers.aclose)
        log = WriteLog(client, s.redis.shards, GROUPS, failpoints, s.redis.socket_timeout_s)
        await log.check_eviction_policy()
        await log.ensure_groups()
        app[REDIS] = client
        # 2. The stores below Redis, both lazy: a sidecar starts while they are down.
        ch_store = ClickHouseStore(s.clickhouse.url)
        stack.push_async_callback(ch_store.close)
        pg_store = await PostgresStore.open(s.postgres.url, s.postgres.pool_max,
                                            s.postgres.command_timeout_s, failpoints)
        stack.push_async_callback(pg_store.close)
        circuits = {sink.name: Circuit(s.circuit.failure_threshold, s.circuit.open_s)
                    for sink in SINKS}
        # 3. The request path: the hot tier over its backings, analytics, push.
        hot = app[routes.HOT] = HotTier(
            client, s, PostgresBacking(pg_store, circuits[PG.name]), Backlog(),
            ClickHouseBacking(ch_store, s.clickhouse.store_content), failpoints)
        stack.push_async_callback(hot.aclose)
        app[routes.ANALYTICS] = ch_store
        hub = app[routes.HUB] = WebSocketHub(s, hot)
        # 4. Background work, stopped first on exit (final flush within the deadline).
        workers = Workers(health)
        stack.push_async_callback(workers.stop, s.shutdown.deadline_s)
        workers.start("ws-hub", hub.run)
        consumer = consumer_name()
        consumer_log = WriteLog(consumers, s.redis.shards, GROUPS, failpoints,
                                s.redis.socket_timeout_s)
        cfg = _flush_config(s)
        pg = Flusher(consumer_log, PostgresSink(pg_store), circuits[PG.name], cfg, consumer,
                     s.flush.max_inflight, hot.release, failpoints)
        workers.start("flusher-pg", lambda: _prepared(
            pg_store.migrate, SCHEMA_ERRORS, "postgres schema",
            pg.run if PG.name in s.flush.sink_names else _nothing), pg.stop)
        ch = Flusher(consumer_log, ClickHouseSink(ch_store, consumer, s.clickhouse.store_content,
                                                  failpoints),
                     circuits[CH.name], dataclasses.replace(
                         cfg, max_batch=s.clickhouse.max_batch,
                         max_delay_ms=s.clickhouse.interval_ms),
                     consumer, 1, log.ack_changes, failpoints)
        if CH.name in s.flush.sink_names:
            workers.start("flusher-ch", lambda: _prepared(ch_store.create_schema, (Unavailable,),
                                                          "clickhouse schema", ch.run), ch.stop)
        monitor = app[routes.MONITOR] = Monitor(
            log, circuits, hot.backlog, s.flush.trim_interval_s, consumer,
            2 * s.flush.claim_idle_ms, s.flush.max_lag_s,
            Reconciler(client, pg_store, s.redis.shards))
        with contextlib.suppress(Unavailable):  # measured before ready; else the loop does
            await monitor.refresh()
        workers.start("monitor", monitor.run, monitor.stop)
        health.started = True
        yield


def _flush_config(s: Settings) -> FlushConfig:
    f = s.flush
    return FlushConfig(f.max_batch, f.max_delay_ms, f.max_attempts, f.claim_idle_ms,
                       f.backoff_base_ms, f.backoff_max_ms)


async def _prepared(prepare: Callable[[], Awaitable[None]],
                    errors: tuple[type[Exception], ...], what: str,
                    run: Callable[[], Awaitable[None]]) -> None:
    """Prepare (retrying while the dependency is down), then run."""
    backoff = Backoff(0.1, 5.0)
    while True:
        try:
            await prepare()
            break
        except errors as e:
            delay = backoff.failed()
            if backoff.should_log:
                logger.warning("%s not applied yet (%s), retrying", what, e)
            await asyncio.sleep(delay)
    await run()


async def _nothing() -> None:
    """A flusher this sidecar does not run (flush.sinks)."""


async def _drain(app: web.Application) -> None:
    """SIGTERM: readiness goes false at once and WebSockets close with 1001, before aiohttp
    waits for the in-flight handlers (a socket's handler would hold it up to the timeout)."""
    app[HEALTH].drain()
    hub = app.get(routes.HUB)
    if hub is not None:
        await hub.shutdown()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readiness(app: web.Application) -> web.Response:
    """Ready = started, not draining, no worker dead or stuck, Redis answering."""
    health = app[HEALTH]
    problems = list(health.failed)
    monitor = app.get(routes.MONITOR)
    if monitor is not None:
        problems += monitor.stuck()
        if not monitor.snapshot.measured:  # backlog unknown: admission and status would lie
            problems.append("monitor: first measurement pending")
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
