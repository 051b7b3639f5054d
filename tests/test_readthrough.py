"""No refill installs a version or seq older than one already acknowledged, however long the
refill stalls (ARCHITECTURE invariant 8). Each test widens the race with the failpoint between
a read-through's PostgreSQL load and its fill script on sidecar A, while sidecar B writes,
flushes and lets the key expire (cache.ttl_s = 1) inside that window. And Redis failing in
that window is a 503, never a degraded read from ClickHouse while PostgreSQL is up."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys
from proxy.app import FAILPOINTS
from proxy.backends.clickhouse import ClickHouseStore
from proxy.settings import Settings
from tests.conftest import AppClient, Servers, make_settings
from tests.faults.tcpproxy import FaultProxy
from tests.helpers import append, body, error, wait_for

Client = TestClient[Any, Any]
STALL = "after-load-before-fill:sleep:2.5"
PAUSABLE: dict[str, Any] = {"shutdown": {"deadline_s": 0.1}}  # parked flushers: cancel at once


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(servers, cache={"ttl_s": 1})


async def gone(redis: aioredis.Redis, key: str) -> bool:
    """Flushed and expired (released keys get the 1 s cache TTL)."""
    return not await redis.exists(key)


def state_key(settings: Settings, key: str) -> str:
    return keys.state(keys.shard_of(key, settings.redis.shards), key)


def thread_key(settings: Settings, tid: str) -> str:
    return keys.thread(keys.shard_of(tid, settings.redis.shards), tid)


async def test_a_stalled_state_refill_never_brings_back_an_old_value(
        pair: tuple[Client, Client], redis: aioredis.Redis, pg: asyncpg.Connection,
        settings: Settings) -> None:
    a, b = pair
    k = state_key(settings, "s1")
    await body(await b.put("/v1/state/s1", json={"value": "v1"}), 201)
    await wait_for(lambda: gone(redis, k))
    a.app[FAILPOINTS].set(STALL)
    stalled = asyncio.create_task(a.get("/v1/state/s1"))  # loads v1, then waits
    await asyncio.sleep(0.5)  # the load has happened (the failpoint holds the fill)
    second = await b.put("/v1/state/s1", json={"value": "v2"})
    assert second.status in (200, 201), await second.text()  # 201: issue 8.9, tested apart
    await wait_for(lambda: gone(redis, k))
    await (await stalled).read()  # its fill ran now, after v2 was flushed and expired
    third = await body(await b.put("/v1/state/s1", json={"value": "v3"}), 200)
    assert third["version"] == 3, third

    async def stored() -> Any:
        return await pg.fetchrow("SELECT version, value::text AS value FROM state_entries"
                                 " WHERE key = 's1' AND version = 3")

    row = await wait_for(stored)
    assert row["value"] == '"v3"'
    assert (await body(await a.get("/v1/state/s1"), 200))["value"] == "v3"


async def test_a_stalled_thread_refill_never_makes_a_seq_repeat(
        pair: tuple[Client, Client], redis: aioredis.Redis, pg: asyncpg.Connection,
        settings: Settings) -> None:
    a, b = pair
    t = thread_key(settings, "t1")
    await body(await b.put("/v1/threads/t1", json={}), 201)
    await append(b, "t1", "one")
    await wait_for(lambda: gone(redis, t))
    a.app[FAILPOINTS].set(STALL)
    stalled = asyncio.create_task(a.get("/v1/threads/t1"))  # loads last_seq 1, then waits
    await asyncio.sleep(0.5)
    assert (await append(b, "t1", "two"))["seq"] == 2
    await wait_for(lambda: gone(redis, t))
    await (await stalled).read()
    three = await append(b, "t1", "three")
    assert three["seq"] == 3, three

    async def flushed() -> Any:
        rows = await pg.fetch("SELECT seq, content FROM messages WHERE thread_id = 't1'"
                              " ORDER BY seq")
        return len(rows) == 3 and rows

    rows = await wait_for(flushed)
    assert [(r["seq"], r["content"]) for r in rows] == [(1, "one"), (2, "two"), (3, "three")]
    status = await body(await b.get("/v1/status"), 200)
    assert status["sinks"]["pg"]["dead_letters"] == 0, status


async def test_a_stalled_message_refill_never_serves_an_older_version(
        pair: tuple[Client, Client], redis: aioredis.Redis, settings: Settings) -> None:
    a, b = pair
    t = thread_key(settings, "t2")
    await body(await b.put("/v1/threads/t2", json={}), 201)
    mid = (await append(b, "t2", "v1"))["message_id"]
    await wait_for(lambda: gone(redis, t))
    a.app[FAILPOINTS].set(STALL)
    stalled = asyncio.create_task(a.get(f"/v1/threads/t2/messages/{mid}"))  # loads v1
    await asyncio.sleep(0.5)
    edited = await body(await b.patch(f"/v1/threads/t2/messages/{mid}",
                                      json={"content": "v2"}), 200)
    await wait_for(lambda: gone(redis, t))
    await (await stalled).read()
    a.app[FAILPOINTS].set("")
    for c in (a, b):  # acknowledged v2: no sidecar may serve v1 again
        got = await body(await c.get(f"/v1/threads/t2/messages/{mid}"), 200)
        assert (got["version"], got["content"]) == (edited["version"], "v2"), got


async def test_an_uncached_live_state_entry_can_be_matched_and_deleted(
        client: Client, redis: aioredis.Redis, settings: Settings) -> None:
    k = state_key(settings, "s2")
    await body(await client.put("/v1/state/s2", json={"value": 1}), 201)
    await wait_for(lambda: gone(redis, k))  # only PostgreSQL holds it now
    replaced = await client.put("/v1/state/s2", json={"value": 2}, headers={"If-Match": '"1"'})
    assert (await body(replaced, 200))["version"] == 2
    await wait_for(lambda: gone(redis, k))
    deleted = await body(await client.delete("/v1/state/s2"), 200)
    assert deleted["deleted"] is True and deleted["version"] == 3
    assert (await client.get("/v1/state/s2")).status == 404


async def test_messages_of_a_deleted_thread_are_gone_once_it_left_redis(
        client: Client, redis: aioredis.Redis, settings: Settings) -> None:
    t = thread_key(settings, "t3")
    await body(await client.put("/v1/threads/t3", json={}), 201)
    mid = (await append(client, "t3", "hello"))["message_id"]
    await wait_for(lambda: gone(redis, t))
    assert (await client.get(f"/v1/threads/t3/messages/{mid}")).status == 200  # cold cache
    await body(await client.delete("/v1/threads/t3"), 200)
    await wait_for(lambda: gone(redis, t))  # the tombstone flushed, the thread left Redis
    for path in (f"/v1/threads/t3/messages/{mid}", "/v1/threads/t3/messages",
                 "/v1/threads/t3"):
        assert (await client.get(path)).status == 404, path


async def test_a_message_flushed_before_its_thread_can_be_read_and_edited(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection) -> None:
    """Consumers flush in parallel: a message's entry may commit (and, flushed, leave Redis)
    while its thread's creation is still with another consumer — PostgreSQL then has the
    message and only a placeholder of the thread. Redis's live thread is the one that counts:
    the message is read through and edited, not 404 (the nemesis found PATCH answering
    "thread t0 not found" a moment after the setup)."""
    s = make_settings(servers, flush={"sinks": ""})  # nothing flushes but this test
    client = await client_for(s)
    await body(await client.put("/v1/threads/early", json={}), 201)
    mid = (await append(client, "early", "first"))["message_id"]
    shard = keys.shard_of("early", s.redis.shards)
    await pg.execute("INSERT INTO threads (thread_id, version, last_seq) VALUES ('early', 0, 1)")
    await pg.execute("INSERT INTO messages (message_id, thread_id, seq, role, content, version,"
                     " deleted, created_at, updated_at) VALUES ($1, 'early', 1, 'user', 'first',"
                     " 1, false, now(), now())", mid)
    await redis.hdel(keys.messages(shard, "early"), f"d|{mid}", f"m|{mid}", f"c|{mid}")
    await redis.zrem(keys.window(shard, "early"), mid)  # what release.lua does once flushed

    got = await client.get(f"/v1/threads/early/messages/{mid}")
    assert ((await body(got, 200))["content"], got.headers["X-Tier"]) == ("first", "postgres")
    edited = await client.patch(f"/v1/threads/early/messages/{mid}", json={"content": "2nd"})
    assert (await body(edited, 200))["version"] == 2


async def test_a_page_below_the_window_shows_unflushed_edits(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis) -> None:
    c = await client_for(make_settings(servers, redis={"window": 1}, **PAUSABLE))
    await body(await c.put("/v1/threads/t4", json={}), 201)
    sent = [await append(c, "t4", f"m{i}") for i in range(3)]
    w = keys.window(keys.shard_of("t4", 4), "t4")
    await wait_for(lambda: _window_is(redis, w, 1))  # seqs 1 and 2 are below the window now
    c.app[FAILPOINTS].set("after-read:sleep")  # nothing more is flushed
    mid = sent[0]["message_id"]
    edited = await body(await c.patch(f"/v1/threads/t4/messages/{mid}",
                                      json={"content": "edited"}), 200)
    deleted = await body(await c.delete(f"/v1/threads/t4/messages/{sent[1]['message_id']}"),
                         200)
    page = await body(await c.get("/v1/threads/t4/messages?before=3"), 200)
    assert page["items"] == [edited, deleted]


async def test_a_degraded_page_below_the_window_shows_unflushed_edits(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        ch: ClickHouseStore) -> None:
    """The same overlay on the ClickHouse path: PostgreSQL stopped, the page below the window
    comes from ClickHouse, and the edit and delete only Redis holds still win."""
    if servers.postgres is None:
        pytest.skip("needs the embedded PostgreSQL (an external one cannot be stopped)")
    c = await client_for(make_settings(servers, redis={"window": 1}, **PAUSABLE))
    await body(await c.put("/v1/threads/t6", json={}), 201)
    sent = [await append(c, "t6", f"m{i}") for i in range(3)]
    w = keys.window(keys.shard_of("t6", 4), "t6")
    await wait_for(lambda: _window_is(redis, w, 1))
    await wait_for(lambda: _events_in_clickhouse(ch, "t6", 4), timeout_s=20)
    c.app[FAILPOINTS].set("after-read:sleep")  # nothing more is flushed, to either sink
    mid = sent[0]["message_id"]
    edited = await body(await c.patch(f"/v1/threads/t6/messages/{mid}",
                                      json={"content": "edited"}), 200)
    deleted = await body(await c.delete(f"/v1/threads/t6/messages/{sent[1]['message_id']}"),
                         200)
    servers.postgres.stop()
    try:
        resp = await c.get("/v1/threads/t6/messages?before=3")
        page = await body(resp, 200)
    finally:
        servers.postgres.start()
    assert resp.headers["X-Tier"] == "clickhouse"
    assert page["items"] == [edited, deleted]


async def _events_in_clickhouse(ch: ClickHouseStore, tid: str, count: int) -> bool:
    rows = await ch.query("SELECT count() AS n FROM events FINAL WHERE thread_id = {tid:String}",
                          {"tid": tid})
    return bool(rows and rows[0]["n"] >= count)


async def _window_is(redis: aioredis.Redis, key: str, size: int) -> bool:
    return bool(await redis.zcard(key) == size)


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/threads/t5/messages/{mid}"), ("DELETE", "/v1/threads/t5/messages/{mid}"),
    ("GET", "/v1/threads/t5"), ("GET", "/v1/threads/t5/messages"),
])
async def test_redis_failing_during_a_read_through_is_a_503_not_a_degraded_404(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        ch: ClickHouseStore, method: str, path: str) -> None:
    """Redis goes away between a read-through's PostgreSQL load and its fill: PostgreSQL is
    up, so the answer is 503, not ClickHouse's (degraded reads are for PostgreSQL being
    down). ClickHouse lags (here: gets nothing), so its answer was a 404 for a live message
    (the nemesis, seeds 1 and 2: sidecar 0 during a Redis restart)."""
    port = int(servers.redis_url.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy("127.0.0.1", port) as proxy:
        s = make_settings(servers, redis={"url": f"redis://127.0.0.1:{proxy.port}/0"},
                          cache={"ttl_s": 1}, flush={"sinks": "pg"}, **PAUSABLE)
        c = await client_for(s)
        await body(await c.put("/v1/threads/t5", json={}), 201)
        mid = (await append(c, "t5", "live"))["message_id"]
        await wait_for(lambda: gone(redis, thread_key(s, "t5")))
        c.app[FAILPOINTS].set("after-load-before-fill:sleep:1.5")
        stalled = asyncio.create_task(c.request(method, path.format(mid=mid)))
        fence = keys.fence(keys.shard_of("t5", s.redis.shards), "t", "t5")
        await wait_for(lambda: redis.exists(fence))  # the load began
        await asyncio.sleep(0.3)  # loaded; the failpoint holds the fill
        proxy.set_mode("down")
        try:
            await error(await stalled, 503, "unavailable")
        finally:
            proxy.set_mode("pass")
        c.app[FAILPOINTS].set("")
        assert (await body(await c.get(f"/v1/threads/t5/messages/{mid}"), 200))["content"] \
            == "live"


@pytest.mark.parametrize("method,fields", [("DELETE", None), ("PATCH", {"content": "x"})])
async def test_a_write_never_builds_on_a_degraded_read(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        ch: ClickHouseStore, method: str, fields: Any) -> None:
    """PostgreSQL down and the message not in Redis: an edit or delete cannot be checked, so
    503 — not a 404 (or a 412) from ClickHouse, which lags (here: has nothing)."""
    if servers.postgres is None:
        pytest.skip("needs the embedded PostgreSQL (an external one cannot be stopped)")
    s = make_settings(servers, cache={"ttl_s": 1}, flush={"sinks": "pg"})
    c = await client_for(s)
    await body(await c.put("/v1/threads/t6", json={}), 201)
    mid = (await append(c, "t6", "live"))["message_id"]
    await wait_for(lambda: gone(redis, thread_key(s, "t6")))
    servers.postgres.stop()
    try:
        resp = await c.request(method, f"/v1/threads/t6/messages/{mid}", json=fields)
        await error(resp, 503, "unavailable")
    finally:
        servers.postgres.start()
    assert (await body(await c.get(f"/v1/threads/t6/messages/{mid}"), 200))["content"] \
        == "live"
