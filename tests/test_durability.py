"""X-Durability: a write that is stored but did not reach the level asked for answers 202 with
the level it did reach — never a 503 after the write happened, never a 2xx that claims more
than happened — and a retry of it (same message_id) persists it once the level is reachable."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import Servers
from tests.helpers import body, wait_for

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
