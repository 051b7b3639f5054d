"""The inbox (GET /v1/threads?owner_id=): an owner's threads, newest activity first, right on
every sidecar right after any write; pages with the cursor neither repeat nor skip a thread;
what Redis no longer holds comes from PostgreSQL, merged with what Redis holds unflushed
(deletes, owner changes and new activity of threads PostgreSQL still lists otherwise)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys
from proxy.embedded import RedisServer
from proxy.settings import Settings
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import PAUSED, append, body, error, unchanged, wait_for

Client = TestClient[Any, Any]


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(servers, cache={"ttl_s": 1})


async def put(client: Client, tid: str, owner: str, title: str = "") -> Any:
    resp = await client.put(f"/v1/threads/{tid}", json={"title": title, "owner_id": owner})
    assert resp.status in (200, 201), await resp.text()
    await asyncio.sleep(0.002)  # the next write gets a later millisecond: a strict order
    return await resp.json()


async def touch(client: Client, tid: str) -> None:
    await append(client, tid)
    await asyncio.sleep(0.002)


async def inbox(client: Client, owner: str, **query: Any) -> Any:
    return await body(await client.get("/v1/threads", params={"owner_id": owner, **query}),
                      200)


async def tids(client: Client, owner: str, **query: Any) -> list[str]:
    return [t["thread_id"] for t in (await inbox(client, owner, **query))["items"]]


async def every_page(client: Client, owner: str, limit: int) -> list[str]:
    """Follow next_cursor to the end; the thread ids of all pages, in order."""
    out: list[str] = []
    query: dict[str, Any] = {"limit": limit}
    while True:
        page = await inbox(client, owner, **query)
        assert len(page["items"]) <= limit
        out += [t["thread_id"] for t in page["items"]]
        if page["next_cursor"] is None:
            return out
        query["before"] = page["next_cursor"]


def thread_key(settings: Settings, tid: str) -> str:
    return keys.thread(keys.shard_of(tid, settings.redis.shards), tid)


async def gone_from_redis(redis: aioredis.Redis, settings: Settings, *tids_: str) -> bool:
    """Flushed and expired (released thread keys get the 1 s cache TTL)."""
    return not await redis.exists(*(thread_key(settings, t) for t in tids_))


async def test_newest_activity_first_on_both_sidecars(pair: tuple[Client, Client]) -> None:
    a, b = pair
    for tid in ("t1", "t2", "t3"):
        await put(a, tid, "u1")
    await put(b, "other", "u2")
    assert await tids(a, "u1") == await tids(b, "u1") == ["t3", "t2", "t1"]
    await touch(b, "t1")  # B never saw t1: it learns its owner from Redis
    assert await tids(a, "u1") == ["t1", "t3", "t2"]
    await put(b, "t2", "u1", title="renamed")  # a change of the thread is activity too
    assert await tids(a, "u1") == await tids(b, "u1") == ["t2", "t1", "t3"]
    page = await inbox(a, "u1")
    assert page["owner_id"] == "u1" and page["next_cursor"] is None
    first = page["items"][0]
    assert first["title"] == "renamed" and first["last_seq"] == 0
    assert first["last_activity_at"] == first["updated_at"]
    stamps = [t["last_activity_at"] for t in page["items"]]
    assert stamps == sorted(stamps, reverse=True)
    t1 = page["items"][1]
    assert t1["last_seq"] == 1 and t1["last_activity_at"] > t1["updated_at"]
    assert await tids(b, "u2") == ["other"]
    assert await tids(a, "nobody") == []


async def test_deleted_and_moved_threads_leave_the_inbox(pair: tuple[Client, Client]) -> None:
    a, b = pair
    for tid in ("t1", "t2", "t3"):
        await put(a, tid, "u1")
    await body(await b.delete("/v1/threads/t2"), 200)
    assert await tids(a, "u1") == ["t3", "t1"]
    await put(b, "t1", "u2")  # another owner: it moves
    assert await tids(a, "u1") == ["t3"]
    assert await tids(a, "u2") == ["t1"]
    await touch(a, "t1")  # A believed u1 owns t1: told otherwise, it appends to u2's index
    assert await tids(b, "u2") == ["t1"] and await tids(b, "u1") == ["t3"]


async def test_pages_neither_repeat_nor_skip_while_writes_go_on(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    all_tids = [f"p{i:02d}" for i in range(40)]
    for i, tid in enumerate(all_tids):
        await put(a if i % 2 else b, tid, "u1")
    assert await every_page(a, "u1", 7) == all_tids[::-1]
    written: set[str] = set()
    rng = random.Random(7)

    async def writes() -> None:
        for _ in range(30):
            tid = rng.choice(all_tids)
            written.add(tid)
            await touch(rng.choice((a, b)), tid)

    writer = asyncio.create_task(writes())
    seen = await every_page(b, "u1", 5)
    await writer
    assert len(seen) == len(set(seen)), seen  # no thread twice
    # A thread written meanwhile may move above the cursor; every other one is there, in order.
    untouched = [t for t in all_tids[::-1] if t not in written]
    assert [t for t in seen if t not in written] == untouched
    final = await every_page(a, "u1", 6)
    assert sorted(final) == all_tids and final[:1] == await tids(b, "u1", limit=1)


async def test_threads_redis_no_longer_holds_come_from_postgres(
        pair: tuple[Client, Client], redis: aioredis.Redis, pg: asyncpg.Connection,
        settings: Settings) -> None:
    a, b = pair
    for tid in ("t1", "t2", "t3", "t4"):
        await put(a, tid, "u1")
    await touch(b, "t2")
    await body(await a.delete("/v1/threads/t4"), 200)
    order = await tids(a, "u1")
    assert order == ["t2", "t3", "t1"]
    await wait_for(lambda: gone_from_redis(redis, settings, "t1", "t2", "t3", "t4"))
    for client in (a, b):
        resp = await client.get("/v1/threads", params={"owner_id": "u1", "limit": 2})
        assert resp.headers["X-Tier"] == "postgres"
        assert await every_page(client, "u1", 2) == order
    row = await pg.fetchrow("SELECT t.last_activity_at, max(m.created_at) AS last_message"
                            " FROM threads t JOIN messages m USING (thread_id)"
                            " WHERE thread_id = 't2' GROUP BY t.last_activity_at")
    assert row["last_activity_at"] == row["last_message"]
    # The index entries of threads that left Redis went with the reads.
    assert not await redis.exists(*(keys.inbox(s, "u1") for s in range(settings.redis.shards)))
    page = await inbox(b, "u1")
    assert page["items"][0]["last_seq"] == 1 and page["items"][0]["title"] == ""


async def test_unflushed_changes_win_over_what_postgres_still_lists(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        settings: Settings) -> None:
    """Flushed and expired first; then, with flushing paused on both sidecars, Redis holds
    changes PostgreSQL does not: a delete, an owner change, new activity of old threads."""
    first = await client_for(settings)
    all_tids = [f"t{i}" for i in range(8)]
    for tid in all_tids:
        await put(first, tid, "u1")
    await wait_for(lambda: gone_from_redis(redis, settings, *all_tids))
    await first.close()
    paused = make_settings(servers, cache={"ttl_s": 1}, **PAUSED)
    a, b = await client_for(paused), await client_for(paused)
    await body(await a.delete("/v1/threads/t7"), 200)  # the newest two in PostgreSQL
    await put(a, "t6", "u2")
    await touch(b, "t0")  # the oldest one
    await touch(a, "t3")
    want = ["t3", "t0", "t5", "t4", "t2", "t1"]
    for client in (a, b):
        assert await tids(client, "u1") == want
        for limit in (1, 2, 3):  # PostgreSQL's top rows include the deleted and moved ones
            assert await every_page(client, "u1", limit) == want
    assert await tids(b, "u2") == ["t6"]


async def test_bad_queries_are_refused_and_change_nothing(client: Client,
                                                          redis: aioredis.Redis) -> None:
    await put(client, "t1", "u1")
    async with unchanged(redis):
        await error(await client.get("/v1/threads"), 400, "malformed")
        await error(await client.get("/v1/threads", params={"owner_id": "bad id"}), 422,
                    "invalid_field")
        for query in ({"limit": "0"}, {"limit": "201"}, {"limit": "x"}, {"before": "garbage"},
                      {"before": "12.bad id"}, {"before": "9" * 16 + ".t1"}, {"after": "1"}):
            detail = await error(await client.get(
                "/v1/threads", params={"owner_id": "u1", **query}), 400, "malformed")
            assert detail is None or detail.get("param") in query, query
    assert await tids(client, "u1") == ["t1"]


async def test_with_a_user_each_thread_says_how_many_are_unread(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    await put(a, "r1", "own")
    await put(a, "r2", "own")
    for _ in range(3):
        await touch(a, "r1")
    await touch(b, "r2")
    marker = await a.put("/v1/threads/r1/read-markers/u9", json={"seq": 1})
    assert marker.status == 200, await marker.text()
    gone = await append(b, "r1")  # the newest of r1: deleted, so not unread
    resp = await b.delete(f"/v1/threads/r1/messages/{gone['message_id']}")
    assert resp.status == 200, await resp.text()
    for side in (a, b):
        items = (await inbox(side, "own", user_id="u9"))["items"]
        assert {t["thread_id"]: t["unread"] for t in items} == {"r1": 2, "r2": 1}
        assert all("unread" not in t for t in (await inbox(side, "own"))["items"])
    await error(await a.get("/v1/threads", params={"owner_id": "own", "user_id": "bad id"}),
                422, "invalid_field")


async def test_a_cursor_from_another_page_size_or_sidecar_goes_on_from_there(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    for i in range(6):
        await put(a, f"c{i}", "u1")
    page = await inbox(a, "u1", limit=2)
    assert [t["thread_id"] for t in page["items"]] == ["c5", "c4"]
    rest = await inbox(b, "u1", limit=10, before=page["next_cursor"])
    assert [t["thread_id"] for t in rest["items"]] == ["c3", "c2", "c1", "c0"]
    assert rest["next_cursor"] is None


async def test_with_redis_down_the_inbox_comes_from_postgres_alone(
        client_for: AppClient, servers: Servers, own_redis: RedisServer,
        pg: asyncpg.Connection) -> None:
    c = await client_for(make_settings(servers, redis={
        "url": own_redis.url, "write_through": True, "socket_timeout_s": 1.0}))
    for tid in ("w1", "w2", "w3"):
        await put(c, tid, "u1")
    await wait_for(lambda: pg.fetchval("SELECT count(*) = 3 FROM threads WHERE version > 0"))
    own_redis.kill()

    async def through() -> Any:
        resp = await c.get("/v1/threads", params={"owner_id": "u1"})
        return resp if resp.status == 200 and resp.headers["X-Tier"] == "postgres" else None

    resp = await wait_for(through, timeout_s=20, interval_s=0.05)
    assert [t["thread_id"] for t in (await resp.json())["items"]] == ["w3", "w2", "w1"]
    await append(c, "w1")  # written through: its activity moves in PostgreSQL
    await body(await c.delete("/v1/threads/w3"), 200)
    assert await every_page(c, "u1", 1) == ["w1", "w2"]
