"""WebSocket subscribers across a write-through spell (issue 11): Redis's pub/sub is down with
Redis, so messages written through PostgreSQL reach a subscriber once Redis is back — by the
hub's resync (a backfill from the subscriber's last seq) — gapless, in order, exactly once,
and live pushes carry on after them."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from proxy.embedded import RedisServer
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import body, past_503, wait_for
from tests.test_failover import flushed
from tests.test_ws import created_seqs, hub_listening, subscribe

Client = TestClient[Any, Any]


async def append(c: Client, tid: str, mid: str) -> Any:
    return await c.post(f"/v1/threads/{tid}/messages",
                        json={"message_id": mid, "role": "user", "content": mid})


@pytest.mark.timeout(90)
async def test_write_through_messages_reach_subscribers_after_recovery(
        client_for: AppClient, servers: Servers, own_redis: RedisServer,
        pg: asyncpg.Connection) -> None:
    s = make_settings(servers, redis={"url": own_redis.url, "write_through": True,
                                      "socket_timeout_s": 1.0}, shutdown={"deadline_s": 1.0})
    c = await client_for(s)
    await hub_listening(c, s.redis.shards)
    await body(await c.put("/v1/threads/w1", json={"title": "t"}), 201)
    async with c.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "w1")
        await body(await append(c, "w1", "m1"), 201)
        assert await created_seqs(ws, "w1", until=1) == [1]
        # Flushed first: an append acknowledged by Redis but not yet in PostgreSQL when Redis
        # dies would lose its seq to write-through's and move (RELIABILITY.md).
        await wait_for(lambda: flushed(pg, "w1", 1))

        own_redis.kill()

        for mid, seq in (("m2", 2), ("m3", 3)):
            resp = await past_503(lambda mid=mid: append(c, "w1", mid))
            assert resp.headers["X-Tier"] == "postgres"
            assert (await body(resp, 201))["seq"] == seq

        own_redis.start()

        async def behind() -> Any:
            resp = await append(c, "w1", f"r{time.monotonic_ns()}")
            doc = await body(resp, 201)
            return doc if resp.headers["X-Tier"] == "redis" else None

        last = (await wait_for(behind, timeout_s=20, interval_s=0.1))["seq"]
        # Written through meanwhile, by the reconcile, then in Redis: each seq once, in order.
        assert await created_seqs(ws, "w1", until=last, timeout_s=20) == list(range(2, last + 1))
