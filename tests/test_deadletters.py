"""Dead letters (ARCHITECTURE invariant 6): entries that keep failing leave the way after
flush.max_attempts, each exactly once, and come back exactly once when replayed — however many
sidecars replay at the same time — without disturbing what the hot tier counts as unflushed."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys, metrics
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import append, body, wait_for

Client = TestClient[Any, Any]
RACE = "before-replay-move:sleep:1"  # both replays read the dead letters, then move them


async def dead_letters(c: Client) -> int:
    return int((await body(await c.get("/v1/status"), 200))["sinks"]["pg"]["dead_letters"])


async def test_concurrent_replays_move_each_dead_letter_once(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection, poison: None) -> None:
    s = make_settings(servers, flush={"max_attempts": 2}, debug={"failpoint": RACE})
    a, b = await client_for(s), await client_for(s)
    await body(await a.put("/v1/threads/dl", json={}), 201)
    bad = await append(a, "dl", "poison")
    await wait_for(lambda: _true_async(dead_letters(a), 1), timeout_s=20)
    await pg.execute("ALTER TABLE messages DROP CONSTRAINT poison")  # fixed
    errors_before = metrics.UNFLUSHED_COUNT_ERRORS._value.get()

    answers = await asyncio.gather(a.post("/v1/admin/dead-letters/replay"),
                                   b.post("/v1/admin/dead-letters/replay"))
    replayed = [(await body(r, 200))["replayed"] for r in answers]
    assert sorted(replayed) == [0, 1], replayed

    async def landed() -> bool:
        return bool(await pg.fetchval("SELECT count(*) FROM messages WHERE message_id = $1",
                                      bad["message_id"]))

    await wait_for(landed, timeout_s=20)
    t = keys.thread(keys.shard_of("dl", s.redis.shards), "dl")
    await wait_for(lambda: _expiring(redis, t), timeout_s=20)
    assert await redis.hget(t, "pend") == b"0"
    assert metrics.UNFLUSHED_COUNT_ERRORS._value.get() == errors_before
    await wait_for(lambda: _true_async(dead_letters(a), 0))  # the status catches up


async def _expiring(redis: aioredis.Redis, key: str) -> bool:
    return bool(await redis.pttl(key) > 0)


async def _true_async(count: Any, want: int) -> bool:
    return bool(await count == want)


async def test_a_poisoned_edit_leaves_the_version_it_edits_in_postgres(
        client_for: AppClient, servers: Servers, pg: asyncpg.Connection, poison: None) -> None:
    # One batch holds the message at version 1 and its edit at version 2, which PostgreSQL
    # rejects: coalescing folds v1 into v2, and v1 must not be acknowledged unwritten.
    c = await client_for(make_settings(servers, flush={"max_attempts": 2, "max_delay_ms": 500}))
    await body(await c.put("/v1/threads/dp", json={}), 201)
    mid = (await append(c, "dp", "good"))["message_id"]
    await body(await c.patch(f"/v1/threads/dp/messages/{mid}", json={"content": "poison"}), 200)
    await wait_for(lambda: _true_async(dead_letters(c), 1), timeout_s=20)

    async def kept() -> Any:
        return await pg.fetchrow("SELECT version, content FROM messages WHERE message_id = $1",
                                 mid)

    row = await wait_for(kept)
    assert (row["version"], row["content"]) == (1, "good")
