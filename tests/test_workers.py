"""No background worker dies silently (ARCHITECTURE invariant 9): an unexpected error in a
flusher is logged, counted and retried with the batch left pending; a Redis that refuses writes
(NOREPLICAS, BUSY, ...) is a 503 on the request path and a retry in the background; a flusher
that falls behind while its sink is healthy turns readiness red."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import metrics
from proxy.app import FAILPOINTS
from proxy.embedded import clickhouse_url
from proxy.workers import Health, Workers
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import append, body, error, wait_for
from tests.sidecar import Sidecar

Client = TestClient[Any, Any]


def worker_errors(worker: str) -> float:
    return metrics.WORKER_ERRORS.labels(worker)._value.get()


async def landed(pg: asyncpg.Connection, tid: str, count: int) -> bool:
    rows = await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", tid)
    return bool(rows == count)


async def test_an_unexpected_flusher_error_is_counted_and_the_batch_retried(
        client: Client, pg: asyncpg.Connection) -> None:
    before = worker_errors("flusher-pg")
    client.app[FAILPOINTS].set("after-read:raise")  # every batch fails with a bug-like error
    await body(await client.put("/v1/threads/w1", json={}), 201)
    for i in range(5):
        await append(client, "w1", f"m{i}")
    await wait_for(lambda: _true(worker_errors("flusher-pg") > before))
    assert await pg.fetchval("SELECT count(*) FROM messages") == 0
    client.app[FAILPOINTS].set("")  # fixed: the batch left pending is flushed after all
    await wait_for(lambda: landed(pg, "w1", 5), timeout_s=20)


async def test_a_redis_refusing_writes_is_503_and_the_flusher_resumes(
        client: Client, redis: aioredis.Redis, pg: asyncpg.Connection) -> None:
    await body(await client.put("/v1/threads/w2", json={}), 201)
    await append(client, "w2", "before")
    await redis.config_set("min-replicas-to-write", 1)  # every write: NOREPLICAS
    try:
        resp = await client.post("/v1/threads/w2/messages", json={"role": "u", "content": "x"})
        await error(resp, 503, "unavailable")
        assert resp.headers["Retry-After"]
    finally:
        await redis.config_set("min-replicas-to-write", 0)
    await append(client, "w2", "after")
    await wait_for(lambda: landed(pg, "w2", 2), timeout_s=20)
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()


@pytest.fixture
async def lagging(client_for: AppClient, servers: Servers) -> Client:
    """A sidecar whose PostgreSQL flusher parks on its first batch, with a 1 s lag bound."""
    s = make_settings(servers, debug={"failpoint": "after-read:sleep"},
                      shutdown={"deadline_s": 0.1}, flush={"max_lag_s": 1.0})
    return await client_for(s)


async def test_a_flusher_that_falls_behind_turns_readiness_red(lagging: Client) -> None:
    async def ready() -> bool:
        return (await lagging.get("/readyz")).status == 200

    await wait_for(ready)  # once the monitor measured the backlog
    await body(await lagging.put("/v1/threads/w3", json={}), 201)

    async def red() -> Any:
        resp = await lagging.get("/readyz")
        return resp.status == 503 and await resp.json()

    readiness = await wait_for(red, timeout_s=15)
    assert any("pg" in p and "flush.max_lag_s" in p for p in readiness["problems"]), readiness
    status = await body(await lagging.get("/v1/status"), 200)
    assert status["sinks"]["pg"]["lag_s"] > 1.0
    assert any("pg" in d for d in status["degraded"]), status


async def _true(value: bool) -> bool:
    return value


def test_a_stalled_trim_does_not_hold_readiness_back(servers: Servers, tmp_path: Path) -> None:
    """Trimming is housekeeping: readiness waits for the first measurement only. The nemesis
    found a restarted sidecar kept unready for a minute while its trims were stalled and Redis
    kept restarting (before: 20 s per shard before the first measurement)."""
    side = Sidecar(tmp_path, servers.redis_url, servers.postgres_url, clickhouse_url(tmp_path),
                   TIERPROXY_DEBUG_FAILPOINT="before-trim:sleep:20")
    try:
        side.start(timeout_s=15)
    finally:
        side.kill()


async def test_a_crashed_worker_is_logged_counted_and_restarted_with_backoff(
        caplog: pytest.LogCaptureFixture) -> None:
    """Pure supervision (no servers): a task that raises is restarted after a backoff pause
    (full jitter), readiness names it only during the pause, and each crash is logged with its
    traceback and counted."""
    health, runs, failed_seen = Health(), [], []
    workers = Workers(health, restart_base_s=0.05, restart_max_s=0.2)
    before = worker_errors("flaky")

    async def flaky() -> None:
        runs.append(asyncio.get_running_loop().time())
        failed_seen.append(list(health.failed))
        if len(runs) < 3:
            raise ValueError(f"crash {len(runs)}")

    with caplog.at_level(logging.ERROR, logger="proxy.workers"):
        workers.start("flaky", flaky)
        await wait_for(lambda: _true(len(runs) == 3), timeout_s=5)
        await workers.stop(1.0)
    assert worker_errors("flaky") - before == 2
    crashes = [r for r in caplog.records if "flaky crashed" in r.getMessage()]
    assert len(crashes) == 2 and all(r.exc_info for r in crashes)
    assert failed_seen == [[], [], []]  # back to ready once it runs again


async def _true(value: bool) -> bool:
    return value


def _loads_clickhouse_driver(p: psutil.Process) -> bool:
    """Whether clickhouse-connect is imported in `p` (its C extensions are mapped)."""
    return any("clickhouse_connect" in m.path for m in p.memory_maps())


async def test_the_api_process_of_the_embedded_default_never_loads_the_clickhouse_driver(
        servers: Servers, tmp_path: Path) -> None:
    """chDB is the worker's (one process per directory): the API reaches /stats through it,
    so the driver (some 20 MB of the API's RSS, issue 10's ≤ 80 MB) stays out of the API."""
    side = Sidecar(tmp_path, servers.redis_url, servers.postgres_url, clickhouse_url(tmp_path))
    side.start()
    try:
        async with aiohttp.ClientSession(side.url) as http:
            await body(await http.put("/v1/threads/ch-free", json={}), 201)
            await append(http, "ch-free", "counted by the worker's chDB")

            async def counted() -> bool:
                resp = await http.get("/v1/threads/ch-free/stats")
                return resp.status == 200 and (await resp.json())["messages"] == 1

            await wait_for(counted, timeout_s=30)
        (worker,), apis = side.processes("worker"), side.processes("api")
        assert apis and _loads_clickhouse_driver(worker)  # the check sees the driver
        assert not any(_loads_clickhouse_driver(p) for p in apis)
    finally:
        side.kill()
