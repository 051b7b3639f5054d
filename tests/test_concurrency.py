"""Many concurrent writers on one thread, message or state key: seqs are assigned atomically
(1..N, no gap, no repeat), and conditional or idempotent writes have exactly one winner, with
exactly one log entry for it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from proxy import keys
from proxy.settings import Settings
from tests.conftest import Servers, make_settings
from tests.helpers import PAUSED, body, log_entries

Client = TestClient[Any, Any]
APPENDS = 500


@pytest.fixture
def settings(servers: Servers) -> Settings:
    """Write-behind paused: the log keeps every entry the API wrote."""
    return make_settings(servers, **PAUSED)


async def race(n: int, make: Callable[[int], Awaitable[ClientResponse]]) -> list[tuple[int, Any]]:
    """Run n requests as concurrent tasks; (status, JSON body) of each, in task order."""

    async def one(i: int) -> tuple[int, Any]:
        resp = await make(i)
        return resp.status, orjson.loads(await resp.read())

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(i)) for i in range(n)]
    return [t.result() for t in tasks]


async def logged(redis: aioredis.Redis, settings: Settings, entity_id: str) -> list[Any]:
    """(event, id, version, doc) of every log entry of one thread or state key."""
    stream = keys.log(keys.shard_of(entity_id, settings.redis.shards))
    return [(e["e"], e["id"], int(e["v"]), orjson.loads(e["d"]))
            for e in await log_entries(redis, stream) if entity_id in (e["id"], e.get("tid"))]


async def test_concurrent_appends_get_seqs_1_to_n(client: Client, redis: aioredis.Redis,
                                                  settings: Settings) -> None:
    await body(await client.put("/v1/threads/t1", json={}), 201)
    results = await race(APPENDS, lambda i: client.post(
        "/v1/threads/t1/messages", json={"role": "user", "content": f"n{i}"}))
    assert Counter(status for status, _ in results) == {201: APPENDS}
    docs = [doc for _, doc in results]
    assert [doc["content"] for doc in docs] == [f"n{i}" for i in range(APPENDS)]
    acked = {doc["message_id"]: doc["seq"] for doc in docs}
    assert len(acked) == APPENDS
    assert sorted(acked.values()) == list(range(1, APPENDS + 1))

    created = [(i, v, d) for e, i, v, d in await logged(redis, settings, "t1")
               if e == "message.created"]
    assert len(created) == APPENDS
    assert {mid: doc["seq"] for mid, _, doc in created} == acked
    assert [doc["seq"] for _, _, doc in created] == list(range(1, APPENDS + 1))  # log order
    assert all(v == 1 and doc in docs for _, v, doc in created)

    thread = await body(await client.get("/v1/threads/t1"), 200)
    assert thread["last_seq"] == APPENDS
    page = await body(await client.get(f"/v1/threads/t1/messages?after=0&limit={APPENDS}"), 200)
    assert [(m["message_id"], m["seq"]) for m in page["items"]] == sorted(
        acked.items(), key=lambda item: item[1])


async def test_concurrent_idempotent_appends_have_one_winner(client: Client,
                                                             redis: aioredis.Redis,
                                                             settings: Settings) -> None:
    await body(await client.put("/v1/threads/t1", json={}), 201)
    msg = {"message_id": "m1", "role": "user", "content": "same", "metadata": {"a": 1}}
    results = await race(50, lambda i: client.post("/v1/threads/t1/messages", json=msg))
    assert Counter(status for status, _ in results) == {201: 1, 200: 49}
    winner = next(doc for status, doc in results if status == 201)
    assert winner["seq"] == 1
    assert all(doc == winner for _, doc in results)
    assert await logged(redis, settings, "t1") == [
        ("thread.created", "t1", 1, await thread_doc(redis, settings)),
        ("message.created", "m1", 1, winner)]


async def thread_doc(redis: aioredis.Redis, settings: Settings) -> Any:
    shard = keys.shard_of("t1", settings.redis.shards)
    return orjson.loads(await redis.hget(keys.thread(shard, "t1"), "doc"))


async def test_concurrent_appends_of_one_id_with_other_bodies(client: Client,
                                                              redis: aioredis.Redis,
                                                              settings: Settings) -> None:
    await body(await client.put("/v1/threads/t1", json={}), 201)
    results = await race(50, lambda i: client.post(
        "/v1/threads/t1/messages", json={"message_id": "m1", "role": "user", "content": f"{i}"}))
    assert Counter(status for status, _ in results) == {201: 1, 409: 49}
    winner = next(doc for status, doc in results if status == 201)
    assert {doc["error"]["code"] for status, doc in results if status == 409} == {"conflict"}
    assert [d for e, _, _, d in await logged(redis, settings, "t1")
            if e == "message.created"] == [winner]


async def one_winner(results: list[tuple[int, Any]], version: int) -> Any:
    """Exactly one 200 (at `version`); every other request got 412 naming that version."""
    assert Counter(status for status, _ in results) == {200: 1, 412: len(results) - 1}
    losers = [doc["error"] for status, doc in results if status == 412]
    assert {(e["code"], orjson.dumps(e["detail"])) for e in losers} == {
        ("precondition_failed", orjson.dumps({"version": str(version)}))}
    winner = next(doc for status, doc in results if status == 200)
    assert winner["version"] == version
    return winner


async def test_concurrent_patches_with_if_match_have_one_winner(client: Client,
                                                                redis: aioredis.Redis,
                                                                settings: Settings) -> None:
    await body(await client.put("/v1/threads/t1", json={}), 201)
    await body(await client.post("/v1/threads/t1/messages",
                                 json={"message_id": "m1", "role": "user", "content": "v1"}), 201)
    results = await race(20, lambda i: client.patch(
        "/v1/threads/t1/messages/m1", json={"content": f"edit {i}"}, headers={"If-Match": '"1"'}))
    winner = await one_winner(results, 2)
    assert await body(await client.get("/v1/threads/t1/messages/m1"), 200) == winner
    updates = [(v, d) for e, _, v, d in await logged(redis, settings, "t1")
               if e == "message.updated"]
    assert updates == [(2, winner)]


async def test_concurrent_patches_without_if_match_all_apply(client: Client,
                                                             redis: aioredis.Redis,
                                                             settings: Settings) -> None:
    """Unconditional edits of one message all succeed, each as its own version."""
    await body(await client.put("/v1/threads/t1", json={}), 201)
    await body(await client.post("/v1/threads/t1/messages",
                                 json={"message_id": "m1", "role": "user", "content": "v1"}), 201)
    results = await race(20, lambda i: client.patch(
        "/v1/threads/t1/messages/m1", json={"content": f"edit {i}"}))
    assert Counter(status for status, _ in results) == {200: 20}
    assert sorted(doc["version"] for _, doc in results) == list(range(2, 22))
    updates = [v for e, _, v, _ in await logged(redis, settings, "t1") if e == "message.updated"]
    assert updates == list(range(2, 22))


async def test_concurrent_state_puts_with_if_match_have_one_winner(client: Client,
                                                                   redis: aioredis.Redis,
                                                                   settings: Settings) -> None:
    await body(await client.put("/v1/state/k1", json={"value": 0}), 201)
    results = await race(20, lambda i: client.put(
        "/v1/state/k1", json={"value": i}, headers={"If-Match": '"1"'}))
    winner = await one_winner(results, 2)
    assert await body(await client.get("/v1/state/k1"), 200) == winner
    assert [(v, d) for _, _, v, d in await logged(redis, settings, "k1")][1:] == [(2, winner)]


async def test_concurrent_thread_puts_with_if_match_have_one_winner(client: Client,
                                                                    redis: aioredis.Redis,
                                                                    settings: Settings) -> None:
    await body(await client.put("/v1/threads/t1", json={"title": "v1"}), 201)
    results = await race(20, lambda i: client.put(
        "/v1/threads/t1", json={"title": f"t{i}"}, headers={"If-Match": '"1"'}))
    winner = await one_winner(results, 2)
    assert await body(await client.get("/v1/threads/t1"), 200) == winner
    updates = [v for e, _, v, _ in await logged(redis, settings, "t1") if e == "thread.updated"]
    assert updates == [2]
