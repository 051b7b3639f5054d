"""Dependency outages (FAULTS.md 5, 9, 14, 16): PostgreSQL stopped or restarted with `-m
immediate` mid-batch, PostgreSQL and Redis black-holed through the fault proxy, all while a
sidecar subprocess takes writes. After healing, the history is checked (invariants [1], [2]
and [9]; FAULTS.md's I1–I4, mapped in checker.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from proxy.backends.postgres.sql import STAGE
from tests.conftest import Servers
from tests.faults.conftest import SHARDS, StartSidecar, metric
from tests.faults.history import FAIL, HELD, INFO, OK, Load, check, first_ack_after
from tests.faults.results import Outcome
from tests.faults.tcpproxy import FaultProxy
from tests.helpers import wait_for
from tests.sidecar import Sidecar


def through(url: str, proxy: FaultProxy) -> str:
    """url with its host:port replaced by the fault proxy's."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def upstream(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def status(http: aiohttp.ClientSession, sidecar: Sidecar) -> Any:
    async with http.get(f"{sidecar.url}/v1/status") as resp:
        assert resp.status == 200
        return await resp.json()


async def persisted_write_succeeds(http: aiohttp.ClientSession, sidecar: Sidecar) -> bool:
    """A write-through (X-Durability: persisted) goes through the PostgreSQL pool."""
    try:
        async with http.put(f"{sidecar.url}/v1/state/probe", json={"value": 1},
                            headers={"X-Durability": "persisted"}) as resp:
            return resp.status in (200, 201)
    except (aiohttp.ClientError, TimeoutError):
        return False


async def ready(http: aiohttp.ClientSession, sidecar: Sidecar) -> bool:
    async with http.get(f"{sidecar.url}/readyz") as resp:
        return resp.status == 200


def log_lines(sidecar: Sidecar) -> int:
    return len(sidecar.log_path.read_bytes().splitlines())


async def some_acked(load: Load, count: int = 50) -> bool:
    return len(load.history.of(OK)) >= count


# ---- PostgreSQL stopped


@pytest.mark.timeout(120)
async def test_postgres_stopped_writes_acked_backlog_grows_then_all_lands(
        sidecars: StartSidecar, servers: Servers, http: aiohttp.ClientSession,
        outcome: Outcome) -> None:
    if servers.postgres is None:
        pytest.skip("external PostgreSQL: the test cannot stop it")
    outcome.describe("PostgreSQL stopped under writes, then started",
                     faults_md=9, recovery=f"PostgreSQL started -> {HELD} (the load runs "
                     "0.5 s more)")
    postgres = servers.postgres
    s = await sidecars("a")
    # Threads stay under the Redis window (200): an append with a client id to a thread
    # whose flushed messages left Redis must ask PostgreSQL, which is down (503 by design).
    async with Load([s.url], clients=8, threads=24, rate_per_s=400) as load:
        await load.setup()
        load.start()
        await wait_for(lambda: some_acked(load))
        lines = log_lines(s)
        try:
            await asyncio.to_thread(postgres.stop)
            stopped = time.monotonic()
            down = await wait_for(lambda: _pg_sink(http, s, circuit="open", min_backlog=1))
            await wait_for(lambda: _pg_sink(http, s, min_backlog=down["backlog"] + 100))
            await asyncio.sleep(1.0)  # the outage goes on under load
            assert (await status(http, s))["tiers"]["postgres"]["state"] == "down"
            outage_lines = log_lines(s) - lines
        finally:
            await asyncio.to_thread(postgres.start)
            healed = time.monotonic()
        await asyncio.sleep(0.5)  # writes continue across the recovery
        history = await load.stop()
    outcome.notes = (f"down {healed - stopped:.1f} s; the backlog grew past "
                     f"{down['backlog'] + 100} entries, every write acknowledged")
    assert history.of(FAIL) == [] and history.of(INFO) == [], history.summary()
    assert outage_lines < 100, f"{outage_lines} log lines during the outage: a retry loop?"
    await wait_for(lambda: persisted_write_succeeds(http, s), timeout_s=10)
    verdict = await check(history, servers.postgres_url, servers.redis_url, SHARDS,
                          deadline_s=20, outcome=outcome)
    outcome.recovered(healed, verdict.held_at)
    # The monitor saw it all through: status shows the recovery (and /readyz stayed green).
    await wait_for(lambda: _pg_sink(http, s, circuit="closed", max_backlog=0), timeout_s=5)
    assert await ready(http, s)
    print(f"postgres stopped: {verdict}")


@pytest.mark.timeout(90)
async def test_postgres_stopped_while_idle_status_says_down_then_up(
        sidecars: StartSidecar, servers: Servers, http: aiohttp.ClientSession) -> None:
    """With nothing to flush, no write fails and the circuit stays closed: the monitor's
    probe must still tell /v1/status (the nemesis saw 4-5 s outages no status called down)."""
    if servers.postgres is None:
        pytest.skip("external PostgreSQL: the test cannot stop it")
    s = await sidecars("a")
    await wait_for(lambda: _pg_tier(http, s, "up"))
    try:
        await asyncio.to_thread(servers.postgres.stop)
        said = await wait_for(lambda: _pg_tier(http, s, "down"), timeout_s=15)
        assert any(d.startswith("pg: unreachable") for d in said["degraded"]), said
        assert said["sinks"]["pg"]["backlog"] == 0, "the test means an idle flusher"
    finally:
        await asyncio.to_thread(servers.postgres.start)
    await wait_for(lambda: _pg_tier(http, s, "up"), timeout_s=15)


async def _pg_tier(http: aiohttp.ClientSession, sidecar: Sidecar, state: str) -> Any:
    """/v1/status if it says the postgres tier is `state`, else None."""
    st = await status(http, sidecar)
    return st if st["tiers"]["postgres"]["state"] == state else None


async def _pg_sink(http: aiohttp.ClientSession, sidecar: Sidecar, circuit: str | None = None,
                   min_backlog: int = 0, max_backlog: int | None = None) -> Any:
    """The pg sink of /v1/status if it matches, else None."""
    sink = (await status(http, sidecar))["sinks"]["pg"]
    if circuit is not None and sink["circuit"] != circuit:
        return None
    if sink["backlog"] < min_backlog:
        return None
    if max_backlog is not None and sink["backlog"] > max_backlog:
        return None
    return sink


@pytest.mark.timeout(120)
async def test_postgres_immediate_restart_with_a_batch_in_flight(
        sidecars: StartSidecar, servers: Servers, http: aiohttp.ClientSession,
        outcome: Outcome) -> None:
    if servers.postgres is None:
        pytest.skip("external PostgreSQL: the test cannot restart it")
    outcome.describe("PostgreSQL stopped -m immediate with a batch upsert in flight, then "
                     "started", faults_md=5, recovery=f"PostgreSQL started -> {HELD} (the "
                     "load runs 0.5 s more)")
    postgres = servers.postgres
    s = await sidecars("a")
    locker = await asyncpg.connect(servers.postgres_url)
    async with Load([s.url], clients=8, threads=24, rate_per_s=400) as load:
        await load.setup()
        load.start()
        await wait_for(lambda: some_acked(load))
        try:
            # Hold the messages table, so the next batch upsert is certainly in flight
            # (waiting on the lock inside its transaction) when PostgreSQL crashes.
            await locker.execute("BEGIN; LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            await wait_for(lambda: _upsert_waiting(servers.postgres_url), timeout_s=10)
            await asyncio.to_thread(postgres.stop, "immediate")
            stopped = time.monotonic()
            await asyncio.sleep(1.0)  # the outage goes on under load
        finally:
            locker.terminate()  # never left holding the lock
            await asyncio.to_thread(postgres.start)
            healed = time.monotonic()
        await asyncio.sleep(0.5)  # writes continue across the recovery
        history = await load.stop()
    assert history.of(FAIL) == [] and history.of(INFO) == [], history.summary()
    # The pool recovers: a write-through works again within 10 s of the restart.
    await wait_for(lambda: persisted_write_succeeds(http, s), timeout_s=10)
    outcome.notes = (f"down {healed - stopped:.1f} s, every write acknowledged; a persisted "
                     f"write went through again {time.monotonic() - healed:.2f} s after the "
                     "start (the asyncpg pool recovered)")
    verdict = await check(history, servers.postgres_url, servers.redis_url, SHARDS,
                          deadline_s=20, outcome=outcome)
    outcome.recovered(healed, verdict.held_at)
    print(f"postgres immediate restart: {verdict}")


async def _upsert_waiting(url: str) -> bool:
    """A flush transaction waits on the lock: one of its statements on the staged batch
    (the first to touch messages is MOVE_TAKEN_CSEQ's, before the upsert)."""
    conn = await asyncpg.connect(url)
    try:
        return bool(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            f" AND query LIKE '%{STAGE}%'"))
    finally:
        await conn.close()


# ---- black holes through the fault proxy


@pytest.mark.timeout(90)
async def test_postgres_black_hole_times_out_retries_and_drains(
        sidecars: StartSidecar, servers: Servers, http: aiohttp.ClientSession,
        outcome: Outcome) -> None:
    outcome.describe("PostgreSQL black-holed (fault proxy) under writes",
                     faults_md=16, recovery=f"proxy passes again -> {HELD} (the load runs "
                     "0.5 s more)")
    with FaultProxy(*upstream(servers.postgres_url)) as proxy:
        s = await sidecars("a", postgres_url=through(servers.postgres_url, proxy),
                           TIERPROXY_POSTGRES_COMMAND_TIMEOUT_S=1.0)
        async with Load([s.url], clients=8, rate_per_s=300) as load:
            await load.setup()
            load.start()
            await wait_for(lambda: some_acked(load))
            retries = await metric(s, 'tierproxy_flush_retries_total{sink="pg"}')
            lines = log_lines(s)
            proxy.set_mode("blackhole")
            holed = time.monotonic()
            await wait_for(lambda: _pg_sink(http, s, min_backlog=100), timeout_s=10)
            await asyncio.sleep(3.0)  # the fault lasts a while
            fault_lines = log_lines(s) - lines
            proxy.set_mode("pass")
            proxy.cut()  # reset what the black hole left out of step
            healed = time.monotonic()
            await asyncio.sleep(0.5)  # writes continue after the heal
            history = await load.stop()
        outcome.notes = (f"black-holed {healed - holed:.1f} s, every write acknowledged; "
                         f"{fault_lines} log lines during the fault")
        # Write-behind: the HTTP path never waited on PostgreSQL.
        assert history.of(FAIL) == [] and history.of(INFO) == [], history.summary()
        verdict = await check(history, servers.postgres_url, servers.redis_url, SHARDS,
                              deadline_s=20, outcome=outcome)
        outcome.recovered(healed, verdict.held_at)
        # The statement timeout fired and the batch was retried (same entries, no duplicate:
        # I2 above).
        assert await metric(s, 'tierproxy_flush_retries_total{sink="pg"}') > retries
        assert "failed (TimeoutError())" in s.logs(), s.logs()
        assert fault_lines < 100, f"{fault_lines} log lines during the fault: a retry loop?"
    print(f"postgres black hole: {fault_lines} log lines during the fault; {verdict}")


@pytest.mark.timeout(90)
async def test_redis_black_hole_answers_503_in_time_then_flushers_reconnect(
        sidecars: StartSidecar, servers: Servers, http: aiohttp.ClientSession,
        outcome: Outcome) -> None:
    socket_timeout_s, request_timeout_s = 1.0, 1.0
    outcome.describe("Redis black-holed (fault proxy) under writes",
                     faults_md=14, recovery="proxy passes again -> first write acknowledged "
                     "after it")
    with FaultProxy(*upstream(servers.redis_url)) as proxy:
        s = await sidecars("a", redis_url=through(servers.redis_url, proxy),
                           TIERPROXY_REDIS_SOCKET_TIMEOUT_S=socket_timeout_s,
                           TIERPROXY_REDIS_HEALTH_CHECK_INTERVAL_S=1.0,
                           TIERPROXY_API_REQUEST_TIMEOUT_S=request_timeout_s)
        # Idle streams first: blocking reads return within the socket timeout, so a healthy
        # Redis never looks dead (FAULTS.md 15).
        await asyncio.sleep(2 * socket_timeout_s)  # an idle period, not a synchronisation
        assert "Timeout reading" not in s.logs(), s.logs()
        async with Load([s.url], clients=8, rate_per_s=300) as load:
            await load.setup()
            load.start()
            await wait_for(lambda: some_acked(load))
            lines = log_lines(s)
            proxy.set_mode("blackhole")
            down = time.monotonic()
            readiness = await _readiness_during(http, s, socket_timeout_s + 2)  # the fault
            fault_lines = log_lines(s) - lines
            proxy.set_mode("pass")
            proxy.cut()
            healed = time.monotonic()
            acked = len(load.history.of(OK))
            await wait_for(lambda: some_acked(load, acked + 50))
            history = await load.stop()
        assert 200 not in readiness, f"/readyz said ready with Redis unreachable: {readiness}"
        assert fault_lines < 100, f"{fault_lines} log lines during the fault: a retry loop?"
        # No hang: every request was answered within the request timeout (+ scheduling).
        assert history.of(INFO) == [], history.summary()
        slow = [o for o in history.ops if o.seconds > request_timeout_s + 1.0]
        assert slow == [], slow[:5]
        during = history.between(down + 0.1, healed)
        outcome.notes = (f"black-holed {healed - down:.1f} s: {len(during)} writes sent meanwhile, "
                         f"{sum(o.status == 503 for o in during)} answered 503; /readyz "
                         f"answers {sorted(set(readiness))}")
        if (acked := first_ack_after(history, healed)) is not None:
            outcome.recovered(healed, acked)
        assert during and all(o.status == 503 for o in during), history.summary()
        verdict = await check(history, servers.postgres_url, servers.redis_url, SHARDS,
                              deadline_s=20, outcome=outcome)
        await wait_for(lambda: ready(http, s), timeout_s=5)
    print(f"redis black hole: {len(during)} answered 503 during the fault, {fault_lines} log "
          f"lines; {verdict}")


async def _readiness_during(http: aiohttp.ClientSession, sidecar: Sidecar,
                            seconds: float) -> list[int]:
    """/readyz statuses polled for `seconds` (the fault's duration)."""
    seen, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            async with http.get(f"{sidecar.url}/readyz") as resp:
                seen.append(resp.status)
        except (aiohttp.ClientError, TimeoutError):
            seen.append(0)
        await asyncio.sleep(0.2)
    return seen
