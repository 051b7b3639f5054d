"""WebSocket subscribers across a write-through spell (issue 11): Redis's pub/sub is down with
Redis, so messages written through PostgreSQL reach a subscriber once Redis is back — by the
hub's resync (a backfill from the subscriber's last seq) — gapless, in order, exactly once,
and live pushes carry on after them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from proxy.embedded import RedisServer
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import body, wait_for
from tests.test_failover import flushed
from tests.test_ws import created_seqs, hub_listening, subscribe

Client = TestClient[Any, Any]


@pytest.fixture
async def own_redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis", extra_args=["--appendfsync", "always"])
    server.start()
    yield server
    server.kill()


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
        # dies collides with write-through's seq (FAULTS.md 7, open; RELIABILITY.md).
        await wait_for(lambda: flushed(pg, "w1", 1))

        own_redis.kill()

        async def through(mid: str) -> Any:
            resp = await append(c, "w1", mid)
            return None if resp.status == 503 else resp

        for mid, seq in (("m2", 2), ("m3", 3)):
            resp = await wait_for(lambda mid=mid: through(mid), timeout_s=20, interval_s=0.05)
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
