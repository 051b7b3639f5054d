"""Erasure while Redis is down (redis.write_through; ARCHITECTURE.md invariant 10): an erase
goes through PostgreSQL like the other writes (X-Tier postgres, X-Durability persisted,
If-Match, a deleted message erasable) and PostgreSQL holds none of the content once it is
answered; once Redis is back, what Redis still held (cached docs, log entries it had not
flushed, dead letters) is erased before write-behind resumes, and ClickHouse blanks what it
stored when the erase event reaches it. Each test searches every tier for unique marker
bytes (tests/test_erasure.py's search) in the test's own Redis, killed and started again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys
from proxy.app import FAILPOINTS
from proxy.backends.clickhouse import ClickHouseStore
from proxy.embedded import RedisServer
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import append, body, past_503, settled, wait_for, write_behind_again
from tests.test_erasure import ch_holding, holding, marker, nowhere, pg_holding, redis_holding

Client = TestClient[Any, Any]
SHARDS = 4  # make_settings'


@pytest.fixture
async def r(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def sidecar(client_for: AppClient, servers: Servers, own_redis: RedisServer) -> Client:
    return await client_for(make_settings(
        servers, redis={"url": own_redis.url, "write_through": True, "socket_timeout_s": 1.0},
        flush={"max_attempts": 2}))


async def switched(c: Client, own_redis: RedisServer) -> None:
    """Kill Redis, and write (a state entry) until PostgreSQL answers."""
    own_redis.kill()

    resp = await past_503(lambda: c.put("/v1/state/switch", json={"value": 1}))
    assert resp.headers["X-Tier"] == "postgres"


async def resumed(c: Client, own_redis: RedisServer, r: aioredis.Redis) -> None:
    own_redis.start()
    await r.connection_pool.disconnect()  # the test's connections died with the old server

    await write_behind_again(c)


async def erased_through(c: Client, path: str, status: int = 200,
                         headers: dict[str, str] | None = None) -> Any:
    resp = await c.delete(f"{path}?erase=true", headers=headers or {})
    doc = await body(resp, status)
    if status == 200:
        assert (resp.headers["X-Tier"], resp.headers["X-Durability"]) == ("postgres",
                                                                          "persisted")
    return doc


async def gone_everywhere(r: aioredis.Redis, pg: asyncpg.Connection, ch: ClickHouseStore,
                          *secrets: str) -> None:
    async def gone() -> bool:
        for s in secrets:
            if not nowhere(await holding(r, pg, ch, s)):
                return False
        return True

    await wait_for(gone, timeout_s=30, interval_s=0.2)


def thread_key(tid: str) -> str:
    return keys.thread(keys.shard_of(tid, SHARDS), tid)


async def test_a_message_erased_through_postgres_leaves_no_byte_in_any_tier(
        sidecar: Client, own_redis: RedisServer, r: aioredis.Redis, pg: asyncpg.Connection,
        ch: ClickHouseStore) -> None:
    secret, kept = marker("through"), marker("kept")
    await body(await sidecar.put("/v1/threads/fe1", json={}), 201)
    mid = (await append(sidecar, "fe1", f"{secret} 1", metadata={"n": secret}))["message_id"]
    await body(await sidecar.patch(f"/v1/threads/fe1/messages/{mid}",
                                   json={"content": f"{secret} 2"}), 200)
    await append(sidecar, "fe1", kept)
    await wait_for(lambda: ch_holding(ch, secret), timeout_s=20)
    await wait_for(lambda: settled(r), timeout_s=20)
    assert await redis_holding(r, secret) and await pg_holding(pg, secret)

    await switched(sidecar, own_redis)
    # Tombstoned first: a deleted message can still be erased, at its version.
    gone = await body(await sidecar.delete(f"/v1/threads/fe1/messages/{mid}"), 200)
    await erased_through(sidecar, f"/v1/threads/fe1/messages/{mid}", 412,
                         {"If-Match": '"1"'})
    doc = await erased_through(sidecar, f"/v1/threads/fe1/messages/{mid}",
                               headers={"If-Match": f'"{gone["version"]}"'})
    assert (doc["version"], doc["deleted"], doc["content"]) == (4, True, "")
    assert not await pg_holding(pg, secret)  # at once, in PostgreSQL
    assert await pg.fetchval("SELECT count(*) FROM write_through_events"
                             " WHERE fields->>'e' = 'message.erased'") == 1
    await body(await sidecar.get(f"/v1/threads/fe1/messages/{mid}"), 404)

    await resumed(sidecar, own_redis, r)
    await gone_everywhere(r, pg, ch, secret)
    assert await pg_holding(pg, kept) and await ch_holding(ch, kept)  # only what was erased
    page = await body(await sidecar.get("/v1/threads/fe1/messages"), 200)
    assert [m["content"] for m in page["items"]] == ["", kept]


async def test_an_erase_through_postgres_removes_unflushed_entries_and_dead_letters(
        sidecar: Client, own_redis: RedisServer, r: aioredis.Redis, pg: asyncpg.Connection,
        ch: ClickHouseStore, poison: None) -> None:
    """m2's edit is poison to PostgreSQL (dead-lettered, in ClickHouse), m1's edit never left
    the log (the flushers fail after reading) when Redis dies: both erased through
    PostgreSQL, the entries leave Redis on recovery, their unflushed counts with them."""
    in_log, in_dlq = marker("log"), marker("dead")
    await body(await sidecar.put("/v1/threads/fe2", json={}), 201)
    m1 = (await append(sidecar, "fe2", "first"))["message_id"]
    m2 = (await append(sidecar, "fe2", "second"))["message_id"]
    await body(await sidecar.patch(f"/v1/threads/fe2/messages/{m2}",
                                   json={"content": "poison", "metadata": {"n": in_dlq}}), 200)
    dlq = keys.dead_letters(keys.shard_of("fe2", SHARDS))

    async def dead_lettered() -> bool:
        return in_dlq in repr(await r.xrange(dlq))

    await wait_for(dead_lettered, timeout_s=20)
    await wait_for(lambda: ch_holding(ch, in_dlq), timeout_s=20)
    await wait_for(lambda: settled(r), timeout_s=20)
    sidecar.app[FAILPOINTS].set("after-read:raise")  # the next batches stay in the log
    await body(await sidecar.patch(f"/v1/threads/fe2/messages/{m1}",
                                   json={"content": in_log}), 200)
    assert await r.hget(thread_key("fe2"), "pend") == b"2"  # the dead letter and the edit

    await switched(sidecar, own_redis)
    for mid in (m1, m2):
        await erased_through(sidecar, f"/v1/threads/fe2/messages/{mid}")
    assert not await pg_holding(pg, in_log) and not await pg_holding(pg, in_dlq)
    sidecar.app[FAILPOINTS].set("")

    await resumed(sidecar, own_redis, r)  # erased from Redis before write-behind resumed
    assert not await r.xrange(dlq)
    assert not await redis_holding(r, in_log) and not await redis_holding(r, in_dlq)
    await gone_everywhere(r, pg, ch, in_log, in_dlq)
    await wait_for(lambda: settled(r), timeout_s=20)
    # Counts given back: nothing unflushed left, so the thread's keys may expire.
    assert (await r.hget(thread_key("fe2"), "pend") or b"0") == b"0"
    status = await body(await sidecar.get("/v1/status"), 200)
    assert not [d for d in status["dead_letters"] if d.get("tid") == "fe2"]
    rows = await pg.fetch("SELECT message_id, version, deleted, content FROM messages"
                          " WHERE thread_id = 'fe2' ORDER BY seq")
    assert [(x["message_id"], x["deleted"], x["content"]) for x in rows] == [
        (m1, True, ""), (m2, True, "")]


async def test_a_thread_erased_through_postgres_leaves_no_byte_in_any_tier(
        sidecar: Client, own_redis: RedisServer, r: aioredis.Redis, pg: asyncpg.Connection,
        ch: ClickHouseStore) -> None:
    secret = marker("thread")
    await body(await sidecar.put("/v1/threads/fe3", json={"title": secret}), 201)
    for i in (1, 2):
        await append(sidecar, "fe3", f"{secret} {i}", metadata={"n": secret})
    await wait_for(lambda: ch_holding(ch, f"{secret} 2"), timeout_s=20)
    await wait_for(lambda: settled(r), timeout_s=20)
    assert await redis_holding(r, secret) and await pg_holding(pg, secret)

    await switched(sidecar, own_redis)
    await erased_through(sidecar, "/v1/threads/fe3", 412, {"If-Match": '"7"'})
    doc = await erased_through(sidecar, "/v1/threads/fe3")
    assert (doc["deleted"], doc["title"]) == (True, "")
    assert not await pg_holding(pg, secret)
    await body(await sidecar.get("/v1/threads/fe3"), 404)
    await erased_through(sidecar, "/v1/threads/fe3")  # a deleted thread too, once more
    await body(await sidecar.put("/v1/threads/fe3", json={}), 409)

    await resumed(sidecar, own_redis, r)
    await gone_everywhere(r, pg, ch, secret)
    await body(await sidecar.get("/v1/threads/fe3"), 404)
    await body(await sidecar.put("/v1/threads/fe3", json={}), 409)


async def test_unflushed_edits_above_the_erased_version_bring_nothing_back(
        sidecar: Client, own_redis: RedisServer, r: aioredis.Redis, pg: asyncpg.Connection,
        ch: ClickHouseStore) -> None:
    """Redis acknowledged edits 2 and 3 and had not flushed them when it died; the erase
    through PostgreSQL is version 2. Whether a flusher reads them in the instant Redis is
    back or the recovery erases them first, PostgreSQL keeps the tombstone (a tombstone is
    final: sql.py) and no tier keeps their content."""
    first, second = marker("v2"), marker("v3")
    await body(await sidecar.put("/v1/threads/fe4", json={}), 201)
    mid = (await append(sidecar, "fe4", "plain"))["message_id"]
    await wait_for(lambda: settled(r), timeout_s=20)
    sidecar.app[FAILPOINTS].set("after-read:raise")
    for text in (first, second):
        await body(await sidecar.patch(f"/v1/threads/fe4/messages/{mid}",
                                       json={"content": text}), 200)

    await switched(sidecar, own_redis)
    doc = await erased_through(sidecar, f"/v1/threads/fe4/messages/{mid}")
    assert doc["version"] == 2
    sidecar.app[FAILPOINTS].set("")
    await resumed(sidecar, own_redis, r)
    await gone_everywhere(r, pg, ch, first, second)
    await wait_for(lambda: settled(r), timeout_s=20)
    row = await pg.fetchrow("SELECT version, deleted, content FROM messages"
                            " WHERE message_id = $1", mid)
    assert (row["version"], row["deleted"], row["content"]) == (2, True, "")
    await body(await sidecar.get(f"/v1/threads/fe4/messages/{mid}"), 404)
    assert not await redis_holding(r, first) and not await pg_holding(pg, second)
