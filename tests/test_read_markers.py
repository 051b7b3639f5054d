"""Read markers (issue 12.2) on two real sidecars sharing Redis, PostgreSQL and ClickHouse: a
marker only moves forward, `unread` counts the thread's live messages after it on every
sidecar right after any append or delete (in the window, below it, with a deletion below it not
flushed yet), markers are written behind to PostgreSQL and ClickHouse, read through once Redis
no longer holds them (never an older one, however long the refill stalls), pushed to
subscribers as read.updated, and bad input changes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys
from proxy.app import FAILPOINTS
from proxy.backends.clickhouse import TABLE, ClickHouseStore
from proxy.backends.postgres import PostgresBacking, PostgresStore
from proxy.backends.postgres.writethrough import WriteThrough
from proxy.circuit import Circuit
from proxy.failpoints import Failpoints
from proxy.settings import Settings
from proxy.tiers import PostgresTier
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import append, body, error, settled, unchanged, wait_for

Client = TestClient[Any, Any]
# Long enough for a move, its flush to both sinks and its release to fit inside the stall.
STALL = "after-load-before-fill:sleep:4"


@pytest.fixture
def settings(servers: Servers) -> Settings:
    # A window of 2 messages: a thread of a few messages already reaches below it once flushed.
    return make_settings(servers, redis={"window": 2}, shutdown={"deadline_s": 0.1})


def marker_path(tid: str, uid: str) -> str:
    return f"/v1/threads/{tid}/read-markers/{uid}"


async def put_marker(c: Client, tid: str, uid: str, seq: int, status: int = 200,
                     **headers: str) -> Any:
    return await body(await c.put(marker_path(tid, uid), json={"seq": seq}, headers=headers),
                      status)


async def get_marker(c: Client, tid: str, uid: str) -> Any:
    return await body(await c.get(marker_path(tid, uid)), 200)


async def thread_with(c: Client, tid: str, n: int) -> list[Any]:
    """A new thread with n messages; their answers (seq 1..n)."""
    await body(await c.put(f"/v1/threads/{tid}", json={}), 201)
    return [await append(c, tid, f"m{i}") for i in range(1, n + 1)]


async def delete(c: Client, tid: str, mid: str) -> None:
    await body(await c.delete(f"/v1/threads/{tid}/messages/{mid}"), 200)


async def test_a_marker_moves_forward_only(pair: tuple[Client, Client],
                                          redis: aioredis.Redis) -> None:
    a, b = pair
    await thread_with(a, "t1", 3)
    assert await get_marker(b, "t1", "u1") == {"thread_id": "t1", "user_id": "u1", "seq": 0,
                                               "unread": 3}
    assert await put_marker(a, "t1", "u1", 2) == {"thread_id": "t1", "user_id": "u1", "seq": 2}
    assert await get_marker(b, "t1", "u1") == {"thread_id": "t1", "user_id": "u1", "seq": 2,
                                               "unread": 1}
    async with unchanged(redis):  # a lower or equal seq: the current marker, nothing written
        assert (await put_marker(b, "t1", "u1", 1))["seq"] == 2
        assert (await put_marker(a, "t1", "u1", 2))["seq"] == 2
    assert (await put_marker(b, "t1", "u1", 3))["seq"] == 3
    assert (await get_marker(a, "t1", "u1"))["unread"] == 0
    assert (await get_marker(a, "t1", "u2"))["seq"] == 0  # markers are per user


async def test_bad_input_gets_json_errors_and_changes_nothing(pair: tuple[Client, Client],
                                                             redis: aioredis.Redis) -> None:
    a, b = pair
    await thread_with(a, "t1", 2)
    await put_marker(a, "t1", "u1", 1)
    await body(await a.put("/v1/threads/gone", json={}), 201)
    await body(await a.delete("/v1/threads/gone"), 200)
    path = marker_path("t1", "u1")
    async with unchanged(redis):
        detail = await error(await b.put(path, json={"seq": 3}), 422, "invalid_field")
        assert detail == {"field": "seq", "last_seq": 2}
        for bad, field in (({"seq": -1}, "seq"), ({"seq": "2"}, "seq"), ({"seq": 1.5}, "seq"),
                           ({"seq": True}, "seq"), ({"seq": None}, "seq"), ({}, "seq"),
                           ({"seq": 2**53 + 1}, "seq"), ({"seq": 10**30}, "seq"),
                           ({"seq": 1, "user_id": "u1"}, "user_id"), ([2], "body")):
            detail = await error(await b.put(path, json=bad), 422, "invalid_field")
            assert detail == {"field": field}, bad
        await error(await b.put(path, data=b"{", headers={"Content-Type": "application/json"}),
                    400, "malformed")
        await error(await b.put(path, data=b'{"seq": 1}'), 415, "unsupported_media_type")
        await error(await b.put(path, json={"seq": 2}, headers={"X-Durability": "x"}), 400,
                    "malformed")
        for c in (a, b):
            await error(await c.put(marker_path("t1", "bad%20id"), json={"seq": 2}), 422,
                        "invalid_field")
            await error(await c.get(marker_path("t1", "x" * 129)), 422, "invalid_field")
            await error(await c.get(marker_path("bad%20id", "u1")), 422, "invalid_field")
            await error(await c.put(marker_path("nope", "u1"), json={"seq": 0}), 404,
                        "not_found")
            await error(await c.get(marker_path("nope", "u1")), 404, "not_found")
            await error(await c.put(marker_path("gone", "u1"), json={"seq": 0}), 404,
                        "not_found")
            await error(await c.get(marker_path("gone", "u1")), 404, "not_found")
    assert (await get_marker(b, "t1", "u1"))["seq"] == 1


async def test_unread_is_right_on_every_sidecar_after_appends_and_deletes(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    msgs = await thread_with(a, "t1", 3)
    await put_marker(b, "t1", "u1", 1)
    await append(a, "t1", "m4")
    for c in (a, b):
        assert (await get_marker(c, "t1", "u1"))["unread"] == 3  # seqs 2, 3, 4
    await delete(b, "t1", msgs[2]["message_id"])  # seq 3
    await delete(a, "t1", msgs[0]["message_id"])  # seq 1: before the marker, not counted
    for c in (a, b):
        assert (await get_marker(c, "t1", "u1"))["unread"] == 2
        assert (await get_marker(c, "t1", "u9"))["unread"] == 2  # no marker: from seq 1


async def flushed_marker(pg: asyncpg.Connection, tid: str, uid: str, seq: int) -> bool:
    return await pg.fetchval("SELECT seq FROM read_markers WHERE thread_id = $1"
                             " AND user_id = $2", tid, uid) == seq


async def window_size(redis: aioredis.Redis, settings: Settings, tid: str) -> int:
    return int(await redis.zcard(keys.window(keys.shard_of(tid, settings.redis.shards), tid)))


async def test_unread_below_the_window_counts_a_deletion_not_flushed_yet(
        pair: tuple[Client, Client], redis: aioredis.Redis, pg: asyncpg.Connection,
        settings: Settings) -> None:
    """Seqs 1..3 are flushed and trimmed out of the window (2 messages); then seq 2 is deleted
    while the flush is parked: PostgreSQL still has it live, the overlay knows better."""
    a, b = pair
    msgs = await thread_with(a, "t1", 5)
    await wait_for(lambda: settled(redis))
    assert await window_size(redis, settings, "t1") == 2
    for c in (a, b):
        c.app[FAILPOINTS].set("after-read:sleep")  # flushers park after their next read
    await delete(b, "t1", msgs[1]["message_id"])
    assert not await pg.fetchval("SELECT deleted FROM messages WHERE thread_id = 't1'"
                                 " AND seq = 2")
    for c in (a, b):
        resp = await c.get(marker_path("t1", "u1"))
        assert (await body(resp, 200))["unread"] == 4  # 1, 3, 4, 5
        assert resp.headers["X-Tier"] == "postgres"  # 1..3 counted there
    await put_marker(a, "t1", "u1", 1)
    for c in (a, b):
        assert (await get_marker(c, "t1", "u1"))["unread"] == 3  # 3, 4, 5
    await put_marker(b, "t1", "u1", 3)
    for c in (a, b):
        resp = await c.get(marker_path("t1", "u1"))
        assert (await body(resp, 200))["unread"] == 2  # 4, 5: all in the window
        assert resp.headers["X-Tier"] == "redis"


async def test_markers_are_written_behind_to_postgres_and_clickhouse(
        pair: tuple[Client, Client], pg: asyncpg.Connection, ch: ClickHouseStore) -> None:
    a, b = pair
    await thread_with(a, "t1", 3)
    await put_marker(a, "t1", "u1", 2)
    await put_marker(b, "t1", "u1", 3)
    await put_marker(a, "t1", "u1", 1)  # nothing moves, nothing is logged
    await wait_for(lambda: flushed_marker(pg, "t1", "u1", 3))

    async def events() -> Any:
        rows = await ch.query(f"SELECT entity_id, seq, version FROM {TABLE}"
                              " WHERE thread_id = 't1' AND event = 'read.updated'"
                              " ORDER BY version", {})
        return len(rows) == 2 and rows

    rows = await wait_for(events)
    assert [(r["entity_id"], r["seq"], r["version"]) for r in rows] == [("u1", 2, 2),
                                                                         ("u1", 3, 3)]


async def test_persisted_is_answered_once_postgres_has_it(pair: tuple[Client, Client],
                                                          pg: asyncpg.Connection) -> None:
    a, _ = pair
    await thread_with(a, "t1", 2)
    resp = await a.put(marker_path("t1", "u1"), json={"seq": 2},
                       headers={"X-Durability": "persisted"})
    assert (await body(resp, 200))["seq"] == 2
    assert resp.headers["X-Durability"] == "persisted"
    assert await flushed_marker(pg, "t1", "u1", 2)


async def test_a_marker_redis_no_longer_holds_is_read_through(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection) -> None:
    """Flushed and expired (cache.ttl_s 1): the marker and the unread count come from
    PostgreSQL on the other sidecar, and a lower seq still changes nothing."""
    s = make_settings(servers, cache={"ttl_s": 1}, redis={"window": 2})
    a, b = await client_for(s), await client_for(s)
    msgs = await thread_with(a, "t1", 5)
    await delete(a, "t1", msgs[3]["message_id"])  # seq 4
    await put_marker(a, "t1", "u1", 2)
    t = keys.thread(keys.shard_of("t1", s.redis.shards), "t1")
    m = keys.markers(keys.shard_of("t1", s.redis.shards), "t1")
    await wait_for(lambda: flushed_marker(pg, "t1", "u1", 2))

    async def expired() -> bool:
        return not await redis.exists(t, m)

    await wait_for(expired)
    resp = await b.get(marker_path("t1", "u1"))
    assert await body(resp, 200) == {"thread_id": "t1", "user_id": "u1", "seq": 2, "unread": 2}
    assert resp.headers["X-Tier"] == "postgres"
    assert (await put_marker(b, "t1", "u1", 1))["seq"] == 2
    assert (await put_marker(b, "t1", "u1", 5))["seq"] == 5
    assert (await get_marker(a, "t1", "u1"))["unread"] == 0


async def test_a_stalled_marker_refill_never_brings_back_an_older_marker(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection) -> None:
    """A's read-through loads marker 1 and stalls; meanwhile B moves it to 3, which is flushed
    and leaves Redis (the markers' TTL after the flush, here a DEL: the thread stays cached).
    A's fill must be refused (the release moved the fence): Redis never holds 1 again, not
    even until A's load is retried (stalled too), and A answers 3."""
    settings = make_settings(servers, api={"request_timeout_s": 30.0})  # two stalled loads
    a, b = await client_for(settings), await client_for(settings)
    await thread_with(b, "t1", 3)
    await put_marker(b, "t1", "u1", 1)
    await wait_for(lambda: flushed_marker(pg, "t1", "u1", 1))
    m = keys.markers(keys.shard_of("t1", settings.redis.shards), "t1")
    await redis.delete(m)
    a.app[FAILPOINTS].set(STALL)
    stalled = asyncio.create_task(a.get(marker_path("t1", "u1")))  # loads 1, then waits
    await asyncio.sleep(0.5)
    assert (await put_marker(b, "t1", "u1", 3))["seq"] == 3
    await wait_for(lambda: flushed_marker(pg, "t1", "u1", 3))
    await wait_for(lambda: settled(redis))  # released: the fence A's load holds is gone
    await redis.delete(m)
    while not stalled.done():  # Redis never holds the older marker, not even for a while
        assert await redis.hget(m, "u1") in (None, b"3")
        await asyncio.sleep(0.05)  # polling pace
    assert (await body(await stalled, 200))["seq"] == 3
    a.app[FAILPOINTS].set("")
    for c in (a, b):
        assert (await get_marker(c, "t1", "u1"))["seq"] == 3


async def test_read_updated_is_pushed_to_a_subscriber_on_another_sidecar(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    await thread_with(a, "t1", 2)
    async with b.ws_connect("/v1/ws") as ws:
        await ws.send_str(orjson.dumps({"op": "subscribe", "thread_id": "t1"}).decode())
        assert orjson.loads((await ws.receive(timeout=10)).data)["type"] == "subscribed"
        await put_marker(a, "t1", "u1", 2)
        frame = orjson.loads((await ws.receive(timeout=10)).data)
        assert {k: frame[k] for k in ("type", "thread_id", "seq", "user_id")} == {
            "type": "read.updated", "thread_id": "t1", "seq": 2, "user_id": "u1"}
        assert isinstance(frame["ts"], int)
        await put_marker(a, "t1", "u1", 1)  # nothing moved: nothing pushed
        await append(a, "t1", "m3")
        assert orjson.loads((await ws.receive(timeout=10)).data)["type"] == "message.created"


async def test_postgres_alone_serves_and_moves_markers(
        pair: tuple[Client, Client], servers: Servers, pg: asyncpg.Connection,
        redis: aioredis.Redis) -> None:
    """What write-through mode (Redis down) calls: the marker and unread from PostgreSQL; a
    move is forward only there, and the answer is the marker now."""
    a, _ = pair
    msgs = await thread_with(a, "t1", 4)
    await delete(a, "t1", msgs[2]["message_id"])
    await put_marker(a, "t1", "u1", 1)
    await wait_for(lambda: settled(redis))
    store = await PostgresStore.open(servers.postgres_url, 2, 5, Failpoints(""))
    try:
        tier = PostgresTier(WriteThrough(store), PostgresBacking(store, Circuit(3, 1.0)))
        got = await tier.get_marker("t1", "u1")
        assert (got.seq, got.unread, got.tier) == (1, 2, "postgres")
        assert (await tier.get_marker("t1", "u2")).unread == 3
        assert orjson.loads((await tier.put_marker("t1", "u1", 3)).doc)["seq"] == 3
        assert orjson.loads((await tier.put_marker("t1", "u1", 2)).doc)["seq"] == 3
        assert (await tier.get_marker("t1", "u1")).unread == 1
    finally:
        await store.close()
