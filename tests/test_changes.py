"""The changes feed on real Redis and PostgreSQL: every change of a thread or one of its
messages takes the thread's next cseq (gapless, from any sidecar); GET .../changes answers the
current doc of each entity changed after a position, from Redis, from PostgreSQL once Redis let
go, and merged when PostgreSQL is behind; WebSocket subscribe with after_cseq replays, then
goes live, each change exactly once; a position that cannot be served gets `resync`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

import proxy
from proxy import keys
from proxy.app import FAILPOINTS
from proxy.settings import Settings
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import append, body, error, settled, unchanged, wait_for

Client = TestClient[Any, Any]
WS = aiohttp.ClientWebSocketResponse
DEADLINE_S = 15.0
PARK = "after-read:sleep"  # every flusher parks after its next read: nothing is flushed


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(servers, shutdown={"deadline_s": 0.5})


async def feed(client: Client, tid: str, after: int = 0, limit: int = 1000
               ) -> tuple[Any, str]:
    resp = await client.get(f"/v1/threads/{tid}/changes",
                            params={"after_cseq": after, "limit": limit})
    return await body(resp, 200), resp.headers["X-Tier"]


async def walk(client: Client, tid: str, limit: int, after: int = 0) -> list[Any]:
    """Every item of the feed after `after`, page by page along next_cursor."""
    items: list[Any] = []
    while True:
        page, _ = await feed(client, tid, after, limit)
        assert len(page["items"]) <= limit
        assert all(after < i["doc"]["cseq"] for i in page["items"])
        items += page["items"]
        if page["next_cursor"] is None:
            return items
        assert page["next_cursor"]["after_cseq"] > after  # always progress
        after = page["next_cursor"]["after_cseq"]


def entity(item: Any) -> str:
    return item["doc"]["message_id"] if item["kind"] == "message" else ""


def state(items: list[Any]) -> dict[str, Any]:
    """What a client following the feed holds: each entity's last doc seen."""
    held: dict[str, Any] = {}
    for item in items:
        held[entity(item)] = item["doc"]
    return held


def once_by_cseq(items: list[Any]) -> None:
    cseqs = [i["doc"]["cseq"] for i in items]
    assert cseqs == sorted(set(cseqs)), cseqs
    members = [entity(i) for i in items]
    assert len(members) == len(set(members)), members


async def edit(client: Client, tid: str, mid: str, content: str) -> Any:
    resp = await client.patch(f"/v1/threads/{tid}/messages/{mid}", json={"content": content})
    return await body(resp, 200)


async def remove(client: Client, tid: str, mid: str) -> Any:
    return await body(await client.delete(f"/v1/threads/{tid}/messages/{mid}"), 200)


async def new_thread(client: Client, tid: str) -> Any:
    return await body(await client.put(f"/v1/threads/{tid}", json={"title": tid}), 201)


def thread_keys(settings: Settings, tid: str) -> list[str]:
    s = keys.shard_of(tid, settings.redis.shards)
    return [keys.thread(s, tid), keys.changes(s, tid)]


# ---- cseq


async def test_every_change_takes_the_threads_next_cseq_from_any_sidecar(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    cseqs = [(await new_thread(a, "t1"))["cseq"]]

    async def writer(c: Client, name: str) -> list[int]:
        out = []
        for i in range(15):
            m = await append(c, "t1", f"{name}{i}")
            out.append(m["cseq"])
            if i % 3 == 0:
                out.append((await edit(c, "t1", m["message_id"], f"{name}{i}!"))["cseq"])
            if i % 5 == 0:
                out.append((await remove(c, "t1", m["message_id"]))["cseq"])
        return out

    for done in await asyncio.gather(writer(a, "a"), writer(b, "b")):
        cseqs += done
    cseqs.append((await body(await b.put("/v1/threads/t1", json={"title": "x"}), 200))["cseq"])
    assert sorted(cseqs) == list(range(1, len(cseqs) + 1))  # gapless, each once

    page, tier = await feed(a, "t1")
    assert tier == "redis"
    assert page["last_cseq"] == len(cseqs) and page["next_cursor"] is None
    once_by_cseq(page["items"])
    assert [i["kind"] for i in page["items"]].count("message") == 30
    assert page["items"][-1] == {"kind": "thread", "doc": {**page["items"][-1]["doc"],
                                                             "title": "x"}}
    for item in page["items"][:-1]:  # each message's current doc, as a read answers it
        resp = await b.get(f"/v1/threads/t1/messages/{item['doc']['message_id']}")
        if item["doc"]["deleted"]:
            assert resp.status == 404
        else:
            assert await body(resp, 200) == item["doc"]


async def test_pages_follow_the_cursor_and_end_caught_up(client: Client) -> None:
    await new_thread(client, "t1")
    mids = [(await append(client, "t1", f"m{i}"))["message_id"] for i in range(30)]
    for mid in mids[::4]:
        await edit(client, "t1", mid, "edited")
    whole, _ = await feed(client, "t1")
    paged = await walk(client, "t1", 7)
    assert paged == whole["items"] and len(paged) == 31
    last = whole["last_cseq"]
    assert last == 1 + 30 + len(mids[::4])
    page, _ = await feed(client, "t1", after=last)
    assert page == {"thread_id": "t1", "last_cseq": last, "next_cursor": None, "items": []}
    # After a position: only what changed since, each at its latest change.
    since = await walk(client, "t1", 3, after=last - 3)
    assert [entity(i) for i in since] == mids[20::4]


# ---- below Redis


async def test_the_feed_comes_from_postgres_once_redis_let_the_thread_go(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection) -> None:
    s = make_settings(servers, cache={"ttl_s": 1})
    client = await client_for(s)
    await new_thread(client, "t1")
    mids = [(await append(client, "t1", f"m{i}"))["message_id"] for i in range(12)]
    await edit(client, "t1", mids[0], "first, edited")
    await remove(client, "t1", mids[5])
    before, tier = await feed(client, "t1")
    assert tier == "redis"
    for key in thread_keys(s, "t1"):  # flushed, then expired: the changes set too
        await wait_for(lambda key=key: _gone(redis, key))
    assert await pg.fetchval("SELECT last_cseq FROM threads WHERE thread_id = 't1'") == 15

    after, tier = await feed(client, "t1")
    assert tier == "postgres"
    assert after == before
    assert await walk(client, "t1", 4) == before["items"]
    # A change after the refill continues the numbering (the fill carried cs).
    assert (await append(client, "t1", "next"))["cseq"] == 16
    page, tier = await feed(client, "t1", after=15)
    assert tier == "redis" and [i["doc"]["content"] for i in page["items"]] == ["next"]


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_an_unflushed_change_of_a_trimmed_message_wins_over_postgres(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis) -> None:
    s = make_settings(servers, redis={"window": 3}, shutdown={"deadline_s": 0.1})
    client = await client_for(s)
    await new_thread(client, "t1")
    mids = [(await append(client, "t1", f"m{i}"))["message_id"] for i in range(10)]
    await wait_for(lambda: settled(redis))  # flushed; m0..m6 trimmed out of the window
    changes = thread_keys(s, "t1")[1]
    assert await redis.zcard(changes) == 4  # the thread and the window's three messages
    client.app[FAILPOINTS].set(PARK)
    edited = await edit(client, "t1", mids[1], "edited, not flushed")  # below the window
    for limit in (2, 3, 1000):
        items = await walk(client, "t1", limit)
        once_by_cseq(items)
        held = state(items)
        assert held[mids[1]] == edited and len(held) == 11
        assert items[-1]["doc"] == edited
    _, tier = await feed(client, "t1")
    assert tier == "postgres"


async def _redis_lost_the_thread(redis: aioredis.Redis, s: Settings, tid: str) -> None:
    """Redis went back to before the unflushed changes of `tid` (its keys are gone)."""
    shard = keys.shard_of(tid, s.redis.shards)
    await redis.delete(*thread_keys(s, tid), keys.messages(shard, tid),
                       keys.window(shard, tid))


async def test_a_position_redis_lost_is_refused_with_resync(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection) -> None:
    s = make_settings(servers, shutdown={"deadline_s": 0.1})
    client = await client_for(s)
    await new_thread(client, "t1")
    await append(client, "t1", "kept")
    await wait_for(lambda: pg.fetchval("SELECT last_cseq FROM threads WHERE thread_id = 't1'"))
    await wait_for(lambda: settled(redis))
    client.app[FAILPOINTS].set(PARK)
    seen = (await append(client, "t1", "lost"))["cseq"]
    assert seen == 3
    await _redis_lost_the_thread(redis, s, "t1")
    resp = await client.get("/v1/threads/t1/changes", params={"after_cseq": seen})
    assert await error(resp, 409, "resync") == {"cseq": 2}
    page, _ = await feed(client, "t1")  # from the current state: what PostgreSQL has
    assert [i["doc"]["cseq"] for i in page["items"]] == [1, 2] and page["last_cseq"] == 2


# ---- bad input


@pytest.mark.parametrize("query", [
    {"after_cseq": "-1"}, {"after_cseq": "x"}, {"after_cseq": ""}, {"after_cseq": "1.5"},
    {"after_cseq": str(2**53 + 1)}, {"limit": "0"}, {"limit": "1001"}, {"after": "1"},
    {"before": "3"}])
async def test_a_bad_query_is_400_and_changes_nothing(client: Client, redis: aioredis.Redis,
                                                      query: dict[str, str]) -> None:
    await new_thread(client, "t1")
    async with unchanged(redis):
        resp = await client.get("/v1/threads/t1/changes", params=query)
        await error(resp, 400, "malformed")


async def test_unknown_bad_and_deleted_threads(client: Client) -> None:
    await error(await client.get("/v1/threads/nope/changes"), 404, "not_found")
    await error(await client.get("/v1/threads/a%20b/changes"), 422, "invalid_field")
    await new_thread(client, "t1")
    await body(await client.delete("/v1/threads/t1"), 200)
    await error(await client.get("/v1/threads/t1/changes"), 404, "not_found")
    await new_thread(client, "t2")
    resp = await client.get("/v1/threads/t2/changes", params={"after_cseq": 2})
    assert await error(resp, 409, "resync") == {"cseq": 1}


# ---- WebSocket


async def recv(ws: WS) -> Any:
    msg = await ws.receive(timeout=DEADLINE_S)
    assert msg.type is WSMsgType.TEXT, (msg.type, msg.data)
    return orjson.loads(msg.data)


async def subscribe(ws: WS, tid: str, **fields: Any) -> Any:
    await ws.send_str(orjson.dumps({"op": "subscribe", "thread_id": tid, **fields}).decode())
    return await recv(ws)


async def frames_until(ws: WS, cseq: int) -> list[Any]:
    """The change frames received until the one of `cseq` (each checked against its doc)."""
    out: list[Any] = []
    async with asyncio.timeout(DEADLINE_S):
        while not out or out[-1]["cseq"] < cseq:
            frame = await recv(ws)
            kind = frame["type"].split(".")[0]
            assert frame["cseq"] == frame[kind]["cseq"], frame
            out.append(frame)
    return out


def as_items(frames: list[Any]) -> list[Any]:
    return [{"kind": k, "doc": f[k]} for f in frames for k in ("message", "thread") if k in f]


async def test_after_cseq_replays_edits_and_deletes_once_then_goes_live(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    mids = [(await append(b, "t1", f"m{i}"))["message_id"] for i in range(5)]  # cseq 2..6
    await edit(b, "t1", mids[1], "edited")  # 7
    await remove(b, "t1", mids[2])  # 8
    async with a.ws_connect("/v1/ws") as ws:
        assert (await subscribe(ws, "t1", after_cseq=1))["type"] == "subscribed"
        replayed = await frames_until(ws, 8)
        assert [(f["type"], f["cseq"]) for f in replayed] == [
            ("message.created", 2), ("message.created", 5), ("message.created", 6),
            ("message.updated", 7), ("message.deleted", 8)]
        assert [f["message"]["message_id"] for f in replayed] == [mids[i] for i in (0, 3, 4,
                                                                                    1, 2)]
        await append(b, "t1", "live")  # 9
        await edit(b, "t1", mids[0], "again")  # 10
        await remove(b, "t1", mids[3])  # 11
        await body(await b.put("/v1/threads/t1", json={"title": "renamed"}), 200)  # 12
        live = await frames_until(ws, 12)
        assert [(f["type"], f["cseq"]) for f in live] == [
            ("message.created", 9), ("message.updated", 10), ("message.deleted", 11),
            ("thread.updated", 12)]


async def test_after_cseq_is_exactly_once_while_writes_go_on(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    for i in range(20):
        await append(b, "t1", f"old{i}")

    async def write() -> int:
        last = 0
        for i in range(40):
            m = await append(b, "t1", f"new{i}")
            last = m["cseq"]
            if i % 4 == 0:
                last = (await edit(b, "t1", m["message_id"], "edited"))["cseq"]
        return last

    async with a.ws_connect("/v1/ws") as ws:
        writes = asyncio.create_task(write())
        assert (await subscribe(ws, "t1", after_cseq=5))["type"] == "subscribed"
        frames = await frames_until(ws, await writes)
    cseqs = [f["cseq"] for f in frames]
    assert cseqs == sorted(set(cseqs)), cseqs  # in order, none twice
    page, _ = await feed(a, "t1", after=5)
    assert state(as_items(frames)) == state(page["items"])  # nothing missed


async def test_a_position_past_the_thread_gets_a_resync_frame(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    await append(b, "t1", "one")
    async with a.ws_connect("/v1/ws") as ws:
        assert (await subscribe(ws, "t1", after_cseq=9))["type"] == "subscribed"
        frame = await recv(ws)
        assert frame["type"] == "error" and frame["code"] == "resync", frame
        assert frame["cseq"] == 2 and frame["thread_id"] == "t1"
        await append(b, "t1", "two")  # the subscription ended: nothing more arrives
        await ws.send_str('{"op": "ping"}')
        assert (await recv(ws))["type"] == "pong"
        # From the current state it works.
        await subscribe(ws, "t1", after_cseq=3)
        await append(b, "t1", "three")
        assert [f["cseq"] for f in await frames_until(ws, 4)] == [4]


@pytest.mark.parametrize("fields", [{"after_seq": 0, "after_cseq": 0}, {"after_cseq": -1},
                                    {"after_cseq": "1"}, {"after_cseq": True},
                                    {"after_cseq": 2**53 + 1}])
async def test_bad_after_cseq_is_an_invalid_field_error(client: Client,
                                                        fields: dict[str, Any]) -> None:
    await new_thread(client, "t1")
    async with client.ws_connect("/v1/ws") as ws:
        frame = await subscribe(ws, "t1", **fields)
        assert frame["type"] == "error" and frame["code"] == "invalid_field", frame


# ---- reconciliation after Redis lost data


async def _raise(redis: aioredis.Redis, tid: str, pg_cseq: int) -> Any:
    """raise_counters as reconcile.py calls it: PostgreSQL at version 1, last seq 0, and the
    thread's own pair ('', last_cseq)."""
    s = 0
    ks = [keys.thread(s, tid), keys.messages(s, tid), keys.window(s, tid), keys.recent(s, tid),
          keys.overlay(s, tid), keys.markers(s, tid), keys.changes(s, tid)]
    script = (Path(proxy.__file__).parent / "scripts" / "raise_counters.lua").read_text()
    return await redis.eval(script, len(ks), *ks, "raise", 1, 0, "", pg_cseq)


async def test_reconciling_raises_the_cseq_and_the_floor_to_postgres(
        redis: aioredis.Redis) -> None:
    t, c = keys.thread(0, "r1"), keys.changes(0, "r1")
    await redis.hset(t, mapping={"v": 1, "seq": 0, "pend": 1, "cs": 3, "cf": 0, "doc": "{}"})
    await redis.zadd(c, {"": 3})
    assert await _raise(redis, "r1", 3) == 0  # not behind: untouched
    assert await _raise(redis, "r1", 7) == 2  # unflushed changes kept, counters raised
    assert await redis.hmget(t, "cs", "cf") == [b"7", b"7"]
    assert await redis.zscore(c, "") == 3
    await redis.hset(t, "pend", 0)
    assert await _raise(redis, "r1", 9) == 1  # clean: dropped, read through again
    assert not await redis.exists(t, c)
