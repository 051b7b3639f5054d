"""Redis losing data it had acknowledged (a restart from an AOF missing the last second, a
failover to a replica that missed writes, or an empty restart) is detected, alarmed and
reconciled: Redis's counters are raised to PostgreSQL's, so seqs and versions are not handed
out twice after it (ARCHITECTURE invariants 1 and 2; FAULTS.md scenarios 3 and 4)."""

from __future__ import annotations

from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys, metrics
from proxy.backends import GROUPS
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import append, body, settled, wait_for

Client = TestClient[Any, Any]


def loss(kind: str) -> float:
    return metrics.REDIS_DATA_LOSS.labels(kind)._value.get()


async def in_postgres(pg: asyncpg.Connection, tid: str) -> list[int]:
    return [r["seq"] for r in await pg.fetch(
        "SELECT seq FROM messages WHERE thread_id = $1 ORDER BY seq", tid)]


async def test_a_redis_that_went_back_gets_its_counters_raised(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection) -> None:
    c = await client_for(make_settings(servers, flush={"max_attempts": 2}))
    await body(await c.put("/v1/threads/dl1", json={}), 201)
    for i in range(2):
        await append(c, "dl1", f"m{i}")
    await wait_for(lambda: settled(redis))
    s = keys.shard_of("dl1", 4)
    names = [keys.thread(s, "dl1"), keys.messages(s, "dl1"), keys.window(s, "dl1")]
    before = {k: await redis.dump(k) for k in names}  # Redis as it will come back
    for i in range(2, 4):
        await append(c, "dl1", f"m{i}")
    await wait_for(lambda: _equal(in_postgres(pg, "dl1"), [1, 2, 3, 4]))
    for k, dumped in before.items():  # the last two appends are lost from Redis
        await redis.restore(k, 0, dumped, replace=True)
    seen = loss("seq_taken")

    reused = await append(c, "dl1", "after the loss")
    assert reused["seq"] == 3  # Redis does not know better yet: PostgreSQL has a 3
    await wait_for(lambda: _true(loss("seq_taken") > seen), timeout_s=20)
    # Acknowledged, so kept: it moved to the end of the thread, seqs still unique and gapless.
    await wait_for(lambda: _equal(in_postgres(pg, "dl1"), [1, 2, 3, 4, 5]))
    assert await pg.fetchval("SELECT seq FROM messages WHERE message_id = $1",
                             reused["message_id"]) == 5
    await wait_for(lambda: _reconciled(redis, names[0], 5))
    fresh = await append(c, "dl1", "next")
    assert fresh["seq"] == 6
    await wait_for(lambda: _equal(in_postgres(pg, "dl1"), [1, 2, 3, 4, 5, 6]))
    status = await body(await c.get("/v1/status"), 200)
    assert status["dead_letters"] == [], status

    async def served_at_5() -> bool:  # Redis's copy (seq 3) dropped once clean, read through
        resp = await c.get(f"/v1/threads/dl1/messages/{reused['message_id']}")
        return resp.status == 200 and (await resp.json())["seq"] == 5

    await wait_for(served_at_5, timeout_s=20)


async def test_an_empty_redis_is_noticed_by_every_process(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis) -> None:
    a, b = await client_for(make_settings(servers)), await client_for(make_settings(servers))
    seen = loss("all")
    await redis.flushall()  # as a restart without persistence would leave it
    await wait_for(lambda: _true(loss("all") >= seen + 2), timeout_s=20)  # both noticed
    for c in (a, b):
        await body(await c.put("/v1/threads/after", json={}), 201 if c is a else 200)
    groups = {g["name"].decode() for g in await redis.xinfo_groups(keys.log(0))}
    assert groups == set(GROUPS)


async def _equal(got: Any, want: list[int]) -> bool:
    return bool(await got == want)


async def _reconciled(redis: aioredis.Redis, key: str, seq: int) -> bool:
    """Redis's copy of the thread dropped (clean: read through again) or its seq raised."""
    return not await redis.exists(key) or int(await redis.hget(key, "seq") or 0) >= seq


async def _true(value: bool) -> bool:
    return value
