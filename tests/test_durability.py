"""X-Durability: a write that is stored but did not reach the level asked for answers 202 with
the level it did reach — never a 503 after the write happened, never a 2xx that claims more
than happened — and a retry of it (same message_id) persists it once the level is reachable."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from proxy import keys
from proxy.embedded import RedisServer
from tests.conftest import AppClient, Servers, make_settings
from tests.faults.tcpproxy import FaultProxy
from tests.helpers import body, wait_for
from tests.redis_topology import SentinelSet, admin

Client = TestClient[Any, Any]
PERSISTED = {"X-Durability": "persisted"}


async def test_persisted_writes_say_so(client: Client, pg: asyncpg.Connection) -> None:
    resp = await client.put("/v1/threads/d1", json={"title": "t"}, headers=PERSISTED)
    await body(resp, 201)
    assert resp.headers["X-Durability"] == "persisted"
    assert await pg.fetchval("SELECT title FROM threads WHERE thread_id = 'd1'") == "t"
    plain = await client.put("/v1/threads/d1", json={"title": "u"})
    await body(plain, 200)
    assert plain.headers["X-Durability"] == "acknowledged"


async def test_persisted_while_postgres_is_down_is_202_and_a_retry_persists_it(
        client: Client, servers: Servers) -> None:
    postgres = servers.postgres
    if postgres is None:
        pytest.skip("external PostgreSQL: the test cannot stop it")
    await body(await client.put("/v1/threads/d2", json={}, headers=PERSISTED), 201)
    msg = {"message_id": "m1", "role": "user", "content": "hello"}
    await asyncio.to_thread(postgres.stop)
    try:
        resp = await client.post("/v1/threads/d2/messages", json=msg, headers=PERSISTED)
        stored = await body(resp, 202)
        assert resp.headers["X-Durability"] == "acknowledged"
        assert stored["seq"] == 1 and stored["content"] == "hello"
    finally:
        await asyncio.to_thread(postgres.start)

    async def retried() -> Any:  # what a client does with a 202: retry until persisted
        again = await client.post("/v1/threads/d2/messages", json=msg, headers=PERSISTED)
        doc = await body(again, again.status)
        assert again.status in (200, 202) and doc["seq"] == 1, doc
        return again.headers["X-Durability"] == "persisted" and again.status == 200

    await wait_for(retried, timeout_s=20, interval_s=0.2)
    conn = await asyncpg.connect(servers.postgres_url)  # the fixture's died with the server
    try:
        row = await conn.fetchrow("SELECT seq, content FROM messages WHERE message_id = 'm1'")
    finally:
        await conn.close()
    assert (row["seq"], row["content"]) == (1, "hello")


# ---- replicated: WAIT on the connection that ran the write


REPLICATED = {"X-Durability": "replicated"}


def _replica(sentinels: SentinelSet) -> RedisServer:
    primary = sentinels.primary()
    return next(s for s in sentinels.servers if s is not primary)


async def test_replicated_writes_are_on_the_replica_when_answered(
        client_for: AppClient, servers: Servers, sentinels: SentinelSet) -> None:
    """Answered `replicated` means the replica holds it already: read from the replica right
    after the answer, with no wait."""
    c = await client_for(make_settings(servers, redis={"url": sentinels.url}))
    tid = f"rep-{uuid.uuid4().hex[:8]}"
    shard = keys.shard_of(tid, 4)
    resp = await c.put(f"/v1/threads/{tid}", json={"title": "t"}, headers=REPLICATED)
    await body(resp, 201)
    assert resp.headers["X-Durability"] == "replicated"
    resp = await c.post(f"/v1/threads/{tid}/messages", headers=REPLICATED,
                        json={"message_id": "m1", "role": "user", "content": "hi"})
    await body(resp, 201)
    assert resp.headers["X-Durability"] == "replicated"
    with admin(_replica(sentinels).port) as r:
        assert r.hexists(keys.thread(shard, tid), "doc")
        assert r.hexists(keys.messages(shard, tid), "d|m1")
    plain = await c.put(f"/v1/threads/{tid}", json={"title": "u"})
    await body(plain, 200)
    assert plain.headers["X-Durability"] == "acknowledged"


async def test_replicated_is_the_default_with_ack_replicas(
        client_for: AppClient, servers: Servers, sentinels: SentinelSet) -> None:
    c = await client_for(make_settings(servers, redis={"url": sentinels.url,
                                                       "ack_replicas": 1}))
    tid = f"rep-{uuid.uuid4().hex[:8]}"
    resp = await c.put(f"/v1/state/{tid}", json={"value": 1})
    await body(resp, 201)
    assert resp.headers["X-Durability"] == "replicated"
    opted_out = await c.put(f"/v1/state/{tid}", json={"value": 2},
                            headers={"X-Durability": "acknowledged"})
    await body(opted_out, 200)
    assert opted_out.headers["X-Durability"] == "acknowledged"


async def test_too_few_replicas_in_time_is_202_acknowledged(
        client_for: AppClient, servers: Servers, sentinels: SentinelSet) -> None:
    """Two replicas asked of a set that has one: stored in the primary, answered 202 as
    acknowledged after redis.ack_timeout_ms, and counted; never a plain 2xx."""
    c = await client_for(make_settings(servers, redis={
        "url": sentinels.url, "ack_replicas": 2, "ack_timeout_ms": 50}))
    before = _waits("short")
    tid = f"rep-{uuid.uuid4().hex[:8]}"
    resp = await c.put(f"/v1/threads/{tid}", json={"title": "t"}, headers=REPLICATED)
    stored = await body(resp, 202)
    assert resp.headers["X-Durability"] == "acknowledged" and stored["title"] == "t"
    got = await c.get(f"/v1/threads/{tid}")
    assert (await body(got, 200))["title"] == "t"
    assert _waits("short") == before + 1


async def test_replicated_without_replicas_is_202(client: Client) -> None:
    """The suite's Redis has no replica: WAIT times out, the write stays acknowledged."""
    resp = await client.post("/v1/threads/solo/messages", headers=REPLICATED,
                             json={"role": "user", "content": "x"})
    await body(resp, 404)  # no thread: the error answers, no WAIT is claimed
    await body(await client.put("/v1/threads/solo", json={}), 201)
    resp = await client.post("/v1/threads/solo/messages", headers=REPLICATED,
                             json={"role": "user", "content": "x"})
    assert (await body(resp, 202))["seq"] == 1
    assert resp.headers["X-Durability"] == "acknowledged"


@pytest.mark.parametrize("value", ["", "fsynced", "replica"])
async def test_unknown_levels_are_400(client: Client, value: str) -> None:
    resp = await client.put("/v1/threads/lv", json={}, headers={"X-Durability": value})
    assert (await body(resp, 400))["error"]["code"] == "malformed"
    assert (await client.get("/v1/threads/lv")).status == 404


def _waits(result: str) -> float:
    return REGISTRY.get_sample_value("tierproxy_replication_waits_total",
                                     {"result": result}) or 0.0


async def test_a_persisted_write_whose_postgres_hangs_is_202_before_the_request_timeout(
        client_for: AppClient, servers: Servers) -> None:
    """PostgreSQL black-holed (no answer, no error): the write is in Redis, so the answer is
    202 acknowledged within the request timeout — never the timeout's 503, after which a
    client retrying an append without message_id would duplicate it."""
    pg = urlsplit(servers.postgres_url)
    assert pg.hostname and pg.port
    with FaultProxy(pg.hostname, pg.port) as proxy:
        url = pg._replace(netloc=f"{pg.netloc.rpartition('@')[0]}@127.0.0.1:{proxy.port}")
        s = make_settings(servers, postgres={"url": urlunsplit(url)},
                          api={"request_timeout_s": 2.0}, shutdown={"deadline_s": 0.1})
        c = await client_for(s)
        await body(await c.put("/v1/threads/d9", json={}), 201)
        proxy.set_mode("blackhole")
        resp = await c.post("/v1/threads/d9/messages", headers=PERSISTED,
                            json={"role": "user", "content": "no message_id"})
        stored = await body(resp, 202)
        assert resp.headers["X-Durability"] == "acknowledged" and stored["seq"] == 1
        proxy.set_mode("pass")
