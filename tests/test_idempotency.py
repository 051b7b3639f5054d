"""Idempotent appends: one logical message per message_id, whatever races the check against
PostgreSQL runs into, and whatever happened to the message since (ARCHITECTURE's API: same id
and body again answers 200 with the original; another body 409)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys, model
from tests.conftest import AppClient, Servers, make_settings
from tests.faults.tcpproxy import FaultProxy
from tests.helpers import append, body, wait_for

Client = TestClient[Any, Any]


@pytest.fixture
def pg_proxy(servers: Servers) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session PostgreSQL."""
    url = urlsplit(servers.postgres_url)
    with FaultProxy(url.hostname or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy


def through(url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else \
        f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_a_stalled_check_never_gives_a_repeated_id_a_second_seq(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection, pg_proxy: FaultProxy) -> None:
    # B flushes, trims (a window of one message) and forgets the ids (one recent id kept); A
    # reaches PostgreSQL through the proxy and flushes nothing, so its checks can be held
    # while B works. Ids that are not ULIDs: their age is unknown, so they need the check.
    cached = {"redis": {"window": 1}, "cache": {"recent_ids": 1}}
    b = await client_for(make_settings(servers, **cached))
    a = await client_for(make_settings(
        servers, **cached, flush={"sinks": ""},
        postgres={"url": through(servers.postgres_url, pg_proxy)}))
    await body(await b.put("/v1/threads/i1", json={}), 201)
    for i in range(3):
        await append(b, "i1", f"m{i}")
    t = keys.thread(keys.shard_of("i1", 4), "i1")
    await wait_for(lambda: _forgotten(redis, t))  # the oldest id: in PostgreSQL only
    # A's one pooled connection has the lookup prepared, so under the hold it runs at once.
    await body(await a.get("/v1/threads/i1/messages/nope"), 404)

    pg_proxy.set_mode("hold_replies")
    checking = asyncio.create_task(append(a, "i1", "hello", status=200, message_id="x1"))
    await wait_for(lambda: _checked(pg))  # A's check answered "not there"; the answer is held
    first = await append(b, "i1", "hello", message_id="x1")  # a peer appends the same id
    for i in range(2):
        await append(b, "i1", f"after {i}")
    m = keys.messages(keys.shard_of("i1", 4), "i1")
    await wait_for(lambda: _gone_field(redis, m, "m|x1"))  # flushed, trimmed, forgotten
    pg_proxy.set_mode("pass")
    again = await checking
    assert again["seq"] == first["seq"], (first, again)
    assert again["message_id"] == "x1"


async def _checked(pg: asyncpg.Connection) -> bool:
    """PostgreSQL ran a message lookup by id and is done with it: only A's check does one."""
    return bool(await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle'"
        " AND query LIKE 'SELECT message_id%WHERE thread_id = $1 AND message_id = $2'"))


async def _forgotten(redis: aioredis.Redis, thread_key: str) -> bool:
    return int(await redis.hget(thread_key, "ft") or 0) > 0


async def _gone_field(redis: aioredis.Redis, key: str, field: str) -> bool:
    return not await redis.hexists(key, field)



async def test_a_retry_after_an_edit_is_still_the_original(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis) -> None:
    c = await client_for(make_settings(servers, cache={"ttl_s": 1}))
    await body(await c.put("/v1/threads/i2", json={}), 201)
    first = await append(c, "i2", "original", message_id="r1")
    edited = await body(await c.patch("/v1/threads/i2/messages/r1", json={"content": "edit"}),
                        200)
    t = keys.thread(keys.shard_of("i2", 4), "i2")
    await wait_for(lambda: _gone(redis, t))  # flushed: only PostgreSQL knows the message
    again = await append(c, "i2", "original", status=200, message_id="r1")  # the retry
    assert again["seq"] == first["seq"] and again["version"] == edited["version"]
    await append(c, "i2", "another body", status=409, message_id="r1")


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_recent_ids_and_new_ulids_need_no_postgres(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis) -> None:
    postgres = servers.postgres
    if postgres is None:
        pytest.skip("external PostgreSQL: the test cannot stop it")
    c = await client_for(make_settings(servers, redis={"window": 1},
                                       cache={"recent_ids": 2, "id_clock_skew_s": 0.001}))
    await body(await c.put("/v1/threads/i3", json={}), 201)
    sent = [await append(c, "i3", f"m{i}", message_id=f"a{i}") for i in range(5)]
    t = keys.thread(keys.shard_of("i3", 4), "i3")
    await wait_for(lambda: _forgotten(redis, t))  # a0..a1 forgotten, a2..a3 recent, a4 window
    m = keys.messages(keys.shard_of("i3", 4), "i3")
    await wait_for(lambda: _gone_field(redis, m, "d|a3"))
    await asyncio.to_thread(postgres.stop)
    try:
        again = await append(c, "i3", "m3", status=200, message_id="a3")  # a recent id
        assert again == sent[3]
        new = await append(c, "i3", "new", message_id=model.new_id())  # made after a0..a1
        assert new["seq"] == 6
        resp = await c.post("/v1/threads/i3/messages",  # beyond the window: PostgreSQL decides
                            json={"message_id": "a-new", "role": "user", "content": "?"})
        await body(resp, 503)
        assert resp.headers["Retry-After"]
    finally:
        await asyncio.to_thread(postgres.start)
