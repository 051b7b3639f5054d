"""What a sidecar process runs, built in one sequence that reads top to bottom as the startup
order; teardown is its reverse (an AsyncExitStack), one failure skipping no other.

Roles: `api` serves requests (the hot tier, push, read-through), `worker` does the background
work (flushers, streamer, trimmer, monitor) and answers the API processes on its socket, `all`
is both in one process (tests, and `--workers 0`). aiohttp runs this as a cleanup context, so
on SIGTERM the order is: readiness red and WebSockets closed with 1001 (on_shutdown), in-flight
requests finish, then the teardown — a worker's final flush comes after the last handler.
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
from typing import Any

from aiohttp import web

from proxy import internal, routes
from proxy.backends import CH, GROUPS, PG, SINKS
from proxy.backends.ch_backing import ClickHouseBacking
from proxy.backends.clickhouse import ClickHouseSink, ClickHouseStore
from proxy.backends.postgres import SCHEMA_ERRORS, PostgresBacking, PostgresSink, PostgresStore
from proxy.backends.postgres.writethrough import Leases, WriteThrough
from proxy.backoff import Backoff
from proxy.circuit import Circuit
from proxy.errors import Unavailable
from proxy.failover import LEASE_S, Failover, Recovering
from proxy.failpoints import Failpoints
from proxy.flusher import FlushConfig, Flusher
from proxy.hot import HotTier
from proxy.hub import WebSocketHub
from proxy.metrics import RequestStats
from proxy.model import ERASED
from proxy.monitor import Monitor
from proxy.reconcile import Reconciler
from proxy.redisconn import RedisClient, connect
from proxy.settings import Settings
from proxy.tiers import PostgresTier, Tiers
from proxy.workers import Health, Workers
from proxy.writelog import Backlog, WriteLog

logger = logging.getLogger(__name__)
ROLE = web.AppKey("role", str)
HEALTH = web.AppKey("health", Health)
REDIS = web.AppKey("redis", RedisClient)
FAILPOINTS = web.AppKey("failpoints", Failpoints)  # tests switch them at runtime
STATS = web.AppKey("stats", RequestStats)
API_ROLES, WORKER_ROLES = ("api", "all"), ("worker", "all")


def consumer_name() -> str:
    """Unique per process (host + pid + start time), so no two processes share a PEL."""
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000)}"


async def services(app: web.Application) -> AsyncIterator[None]:
    s, role, health = app[routes.SETTINGS], app[ROLE], app[HEALTH]
    async with AsyncExitStack() as stack:
        # 1. Redis, its log, and the stores below it (both lazy: they may be down at start).
        client = app[REDIS] = connect(s, s.redis.url)
        stack.push_async_callback(client.aclose)
        if hasattr(client, "initialize"):  # a Cluster client reads the slot map first
            await client.initialize()
        log = app[routes.LOG] = WriteLog(client, s.redis.shards, GROUPS, app[FAILPOINTS],
                                         s.redis.socket_timeout_s)
        await log.check_eviction_policy()
        await log.ensure_groups()
        pg_store = await PostgresStore.open(s.postgres.url, s.postgres.pool_max,
                                            s.postgres.command_timeout_s, app[FAILPOINTS])
        stack.push_async_callback(pg_store.close)
        circuits = {sink.name: Circuit(s.circuit.failure_threshold, s.circuit.open_s)
                    for sink in SINKS}
        events = await _event_reads(stack, s, role, app)
        # 2. The hot tier (requests; the worker's flush acknowledgements).
        backing = PostgresBacking(pg_store, circuits[PG.name])
        hot = app[routes.HOT] = HotTier(
            client, s, backing, Backlog(),
            ClickHouseBacking(events, s.clickhouse.store_content), app[FAILPOINTS])
        stack.push_async_callback(hot.aclose)
        failover = _failover(app, s, role, client, pg_store, hot)
        app[routes.TIERS] = Tiers(hot, PostgresTier(WriteThrough(pg_store), backing), failover)
        # 3. Background work, stopped first on exit (the final flush within the deadline);
        # the flushers' blocking reads on a pool of their own, closed after they stopped.
        if role in WORKER_ROLES:
            consumers = connect(s, s.redis.url, 2 * s.redis.shards + 8)
            stack.push_async_callback(consumers.aclose)
        workers = Workers(health)
        stack.push_async_callback(workers.stop, s.shutdown.deadline_s)
        folding = MetricsFold(app[STATS])
        workers.start("metrics", folding.run, folding.stop)
        if role in API_ROLES:
            hub = app[routes.HUB] = WebSocketHub(s, hot)
            workers.start("ws-hub", hub.run)
        if failover is not None:
            await failover.follow()
            workers.start("failover", failover.run, failover.stop)
        if role in WORKER_ROLES:
            await _background(app, workers, client, consumers, pg_store, circuits, hot)
        else:
            remote = internal.RemoteStatus(_worker_link(stack, s), hot.backlog)
            app[routes.STATUS] = remote
            workers.start("worker-status", remote.run, remote.stop)
        health.started = True
        yield


def _failover(app: web.Application, s: Settings, role: str, client: Any,
              pg_store: PostgresStore, hot: HotTier) -> Failover | None:
    """redis.write_through: an API process's switch to PostgreSQL alone while Redis is down."""
    if not (s.redis.write_through and role in API_ROLES):
        return None
    reconciler = Reconciler(client, pg_store, s.redis.shards)
    through, log = WriteThrough(pg_store), app[routes.LOG]
    # Flushes in hand commit within a couple of flush delays (and the statement timeout).
    settle_s = 2 * s.flush.max_delay_ms / 1000 + 0.2

    written_through: set[str] = set()  # what this process took since Redis went down
    erased: set[tuple[str, str]] = set()  # (thread id, message id or '') erased meanwhile

    async def publish(entries: list[tuple[str, dict[str, str]]]) -> None:
        # An erasure first leaves Redis (its entries of every group too), then its event
        # joins the log: ClickHouse blanks what it stores once the event reaches it.
        for _, fields in entries:
            if fields["e"] in ERASED:
                erased.add(await hot.recovery.erased(fields))
        await log.add_for(CH.name, entries)
        written_through.update(routing_id for routing_id, _ in entries)

    async def pending_behind(final: bool) -> int:
        """Write-through's changes go to ClickHouse (its erasures leave Redis first); what
        Redis holds behind PostgreSQL is dropped once clean (and, at the end, the rest has
        its counters raised). What was erased is blanked in PostgreSQL again each pass: a
        flush may have raced its erasure from Redis (WriteThrough.erase_again)."""
        await through.take_events(publish)
        pending = await reconciler.run("raise" if final else "drop", frozenset(written_through))
        await through.erase_again(sorted(erased))
        if final:
            written_through.clear()
            erased.clear()
        return pending["raised"]

    holder = consumer_name()
    failover = app[routes.FAILOVER] = Failover(
        s.circuit.failure_threshold, settle_s, lambda: asyncio.wait_for(client.ping(), 1.0),
        pending_behind, Leases(pg_store, holder, LEASE_S), Recovering(client, holder))
    return failover


async def _event_reads(stack: AsyncExitStack, s: Settings, role: str,
                       app: web.Application) -> Any:
    """ClickHouse for /stats and degraded reads: its own client, unless it is embedded chDB
    in an API process — the worker owns that one and answers for it on its socket."""
    if role == "api" and s.clickhouse.url.startswith("chdb://"):
        reads = internal.WorkerAnalytics(_worker_link(stack, s))
        app[routes.ANALYTICS] = reads
        return reads
    store = app[internal.CH_STORE] = ClickHouseStore(s.clickhouse.url)
    stack.push_async_callback(store.close)
    app[routes.ANALYTICS] = store
    return store


def _worker_link(stack: AsyncExitStack, s: Settings) -> internal.WorkerLink:
    link = internal.WorkerLink(s.worker.socket)
    stack.push_async_callback(link.aclose)
    return link


async def _background(app: web.Application, workers: Workers, client: Any, consumers: Any,
                      pg_store: PostgresStore, circuits: dict[str, Circuit],
                      hot: HotTier) -> None:
    """Flushers, the ClickHouse streamer and the monitor (trims, backlog, dead consumers,
    data-loss checks)."""
    s, failpoints, log = app[routes.SETTINGS], app[FAILPOINTS], app[routes.LOG]
    consumer = consumer_name()
    consumer_log = WriteLog(consumers, s.redis.shards, GROUPS, failpoints,
                            s.redis.socket_timeout_s)
    cfg = _flush_config(s)
    pg = Flusher(consumer_log, PostgresSink(pg_store), circuits[PG.name], cfg, consumer,
                 s.flush.max_inflight, hot.release, failpoints)
    workers.start("flusher-pg", lambda: _prepared(
        pg_store.migrate, SCHEMA_ERRORS, "postgres schema",
        pg.run if PG.name in s.flush.sink_names else _nothing), pg.stop)
    ch_store = app[internal.CH_STORE]
    ch = Flusher(consumer_log, ClickHouseSink(ch_store, consumer, s.clickhouse.store_content,
                                              failpoints),
                 circuits[CH.name], dataclasses.replace(cfg, max_batch=s.clickhouse.max_batch,
                                                        max_delay_ms=s.clickhouse.interval_ms),
                 consumer, 1, log.ack_changes, failpoints)
    if CH.name in s.flush.sink_names:
        workers.start("flusher-ch", lambda: _prepared(
            lambda: ch_store.create_schema(s.clickhouse.retention_days), (Unavailable,),
            "clickhouse schema", ch.run), ch.stop)
    monitor = Monitor(log, circuits, hot.backlog, s.flush.trim_interval_s, consumer,
                      2 * s.flush.claim_idle_ms, s.flush.max_lag_s,
                      Reconciler(client, pg_store, s.redis.shards),
                      lambda: pg_store.ping(s.postgres.command_timeout_s))
    app[routes.STATUS] = app[internal.MONITOR] = monitor
    with contextlib.suppress(Unavailable):  # measured before ready; else the loop does
        await monitor.measure()
    workers.start("monitor", monitor.run, monitor.stop)


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


class MetricsFold:
    """Folds the requests counted since the last second into the Prometheus metrics, and a
    last time when it stops."""

    def __init__(self, stats: RequestStats) -> None:
        self._stats = stats
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._stopping.wait()
            self._stats.fold()

    def stop(self) -> None:
        self._stopping.set()
