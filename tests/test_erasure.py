"""Erasure (issue 12.4, ARCHITECTURE.md invariant 10): `?erase=true` on a message or thread
DELETE removes its content from every tier, every stored version included. Each test writes
unique marker strings, proves every tier holds them (so the search can fail), erases through
another sidecar than the one that wrote, and searches every tier for the marker bytes: every
Redis key (typed reads of every value, every stream entry, dead letters too, and DUMP), every
PostgreSQL table's rows as text, every ClickHouse table of the database."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys, routes
from proxy.backends.ch_erasure import scopes, ttl_clause
from proxy.backends.clickhouse import TABLE, ClickHouseStore
from proxy.model import Change
from proxy.redisconn import Scripts
from proxy.settings import ConfigError, load
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import PAUSED, append, body, error, key_value, settled, unchanged, wait_for

Client = TestClient[Any, Any]


def marker(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex}"


# ---- searching every tier


async def redis_holding(r: aioredis.Redis, text: str) -> list[str]:
    """The keys whose value holds `text` anywhere (streams: every entry's fields)."""
    needle, found = text.encode(), []
    async for key in r.scan_iter(count=1000):
        value = await key_value(r, key)
        if needle in repr(value).encode() or needle in (await r.dump(key) or b""):
            found.append(key.decode())
    return found


async def pg_holding(conn: asyncpg.Connection, text: str) -> list[str]:
    """The tables (every schema but the catalogs and other sessions' temp ones) with a row
    whose text holds `text`."""
    tables = await conn.fetch(
        "SELECT table_schema, table_name FROM information_schema.tables"
        " WHERE table_type = 'BASE TABLE' AND table_schema NOT IN"
        " ('pg_catalog', 'information_schema') AND table_schema NOT LIKE 'pg_temp%'"
        " AND table_schema NOT LIKE 'pg_toast%'")
    assert {r["table_name"] for r in tables} >= {"threads", "messages", "state_entries"}
    found = []
    for schema, name in tables:
        n = await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{name}" t'
                                " WHERE strpos(t::text, $1) > 0", text)
        if n:
            found.append(f"{schema}.{name}")
    return found


async def ch_holding(ch: ClickHouseStore, text: str) -> list[str]:
    """The tables of ClickHouse's database with a row that holds `text` in any column."""
    tables = [r["name"] for r in await ch.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase()", {})]
    assert TABLE in tables
    found = []
    for name in tables:
        rows = await ch.query(f"SELECT * FROM `{name}`", {})
        if any(text in repr(row) for row in rows):
            found.append(name)
    return found


async def holding(r: aioredis.Redis, conn: asyncpg.Connection, ch: ClickHouseStore,
                  text: str) -> dict[str, list[str]]:
    return {"redis": await redis_holding(r, text), "postgres": await pg_holding(conn, text),
            "clickhouse": await ch_holding(ch, text)}


def everywhere(found: dict[str, list[str]]) -> bool:
    return all(found.values())


def nowhere(found: dict[str, list[str]]) -> bool:
    return not any(found.values())


# ---- waiting for the sinks


async def pg_version(conn: asyncpg.Connection, tid: str, mid: str) -> int:
    return int(await conn.fetchval("SELECT version FROM messages WHERE thread_id = $1"
                                   " AND message_id = $2", tid, mid) or 0)


async def ch_events(ch: ClickHouseStore, tid: str, event: str) -> int:
    rows = await ch.query(f"SELECT count() AS n FROM {TABLE} WHERE thread_id = {{tid:String}}"
                          " AND event = {event:String}", {"tid": tid, "event": event})
    return int(rows[0]["n"])


async def flushed(r: aioredis.Redis, conn: asyncpg.Connection, ch: ClickHouseStore, tid: str,
                  mid: str, version: int, event: str) -> None:
    """Wait until PostgreSQL holds the message at `version`, ClickHouse has an `event` row
    of the thread, and every group acknowledged all of the log."""
    async def done() -> bool:
        return (await pg_version(conn, tid, mid) >= version
                and await ch_events(ch, tid, event) > 0 and await settled(r))

    await wait_for(done, timeout_s=30)


async def erase(c: Client, path: str, status: int = 200) -> Any:
    return await body(await c.delete(f"{path}?erase=true"), status)


def pend_key(settings: Any, tid: str) -> str:
    return keys.thread(keys.shard_of(tid, settings.redis.shards), tid)


# ---- tests


async def test_an_erased_message_leaves_no_byte_in_any_tier(
        client_for: AppClient, settings: Any, redis: aioredis.Redis, pg: asyncpg.Connection,
        ch: ClickHouseStore) -> None:
    a, b = await client_for(settings), await client_for(settings)
    secret, kept = marker("secret"), marker("kept")
    await body(await a.put("/v1/threads/er1", json={"title": "erasure"}), 201)
    mid = (await append(a, "er1", f"{secret} first", metadata={"n": secret}))["message_id"]
    other = (await append(a, "er1", kept))["message_id"]
    await body(await a.patch(f"/v1/threads/er1/messages/{mid}",
                             json={"content": f"{secret} second"}), 200)
    await flushed(redis, pg, ch, "er1", mid, 2, "message.updated")
    assert everywhere(await holding(redis, pg, ch, secret))  # the search finds it

    doc = await erase(b, f"/v1/threads/er1/messages/{mid}")
    assert (doc["deleted"], doc["content"], doc["metadata"], doc["version"]) == (
        True, "", {}, 3)
    assert not await redis_holding(redis, secret)  # at once, in Redis
    await flushed(redis, pg, ch, "er1", mid, 3, "message.erased")
    assert nowhere(await holding(redis, pg, ch, secret))
    assert everywhere(await holding(redis, pg, ch, kept))  # nothing else erased

    page = await body(await a.get("/v1/threads/er1/messages"), 200)
    assert [(m["seq"], m["deleted"], m["content"]) for m in page["items"]] == [
        (1, True, ""), (2, False, kept)]
    await error(await a.get(f"/v1/threads/er1/messages/{mid}"), 404, "not_found")
    assert await pg.fetchval("SELECT content FROM messages WHERE message_id = $1", other) == kept
    # ClickHouse keeps every version's row (seq, length), blanked.
    rows = await ch.query(f"SELECT version, content, metadata FROM {TABLE} WHERE message_id ="
                          " {mid:String} ORDER BY version", {"mid": mid})
    assert [(r["version"], r["content"], r["metadata"]) for r in rows] == [
        (1, "", "{}"), (2, "", "{}"), (3, "", "{}")]


async def test_a_deleted_message_can_still_be_erased(
        client_for: AppClient, settings: Any, redis: aioredis.Redis, pg: asyncpg.Connection,
        ch: ClickHouseStore) -> None:
    a, b = await client_for(settings), await client_for(settings)
    secret = marker("deleted")
    await body(await a.put("/v1/threads/er2", json={}), 201)
    mid = (await append(a, "er2", secret))["message_id"]
    await body(await a.delete(f"/v1/threads/er2/messages/{mid}"), 200)
    await flushed(redis, pg, ch, "er2", mid, 2, "message.deleted")
    assert await ch_holding(ch, secret)  # the tombstone left version 1 in ClickHouse

    assert (await erase(b, f"/v1/threads/er2/messages/{mid}"))["version"] == 3
    await flushed(redis, pg, ch, "er2", mid, 3, "message.erased")
    assert nowhere(await holding(redis, pg, ch, secret))


async def test_an_erase_while_postgres_is_down_waits_in_the_log_and_resurrects_nothing(
        client_for: AppClient, settings: Any, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection, ch: ClickHouseStore) -> None:
    if servers.postgres is None:
        pytest.skip("external PostgreSQL: the test cannot stop it")
    a, b = await client_for(settings), await client_for(settings)
    edited, fresh = marker("edited"), marker("fresh")
    await body(await a.put("/v1/threads/er3", json={}), 201)
    mid = (await append(a, "er3", "flushed first"))["message_id"]
    await flushed(redis, pg, ch, "er3", mid, 1, "message.created")
    await asyncio.to_thread(servers.postgres.stop)
    try:
        await body(await a.patch(f"/v1/threads/er3/messages/{mid}", json={"content": edited}),
                   200)
        new = (await append(a, "er3", fresh))["message_id"]
        log = keys.log(keys.shard_of("er3", settings.redis.shards))
        entries = repr(await redis.xrange(log))
        assert edited in entries and fresh in entries  # unflushed: only the log has them
        await erase(b, f"/v1/threads/er3/messages/{mid}")
        await erase(b, f"/v1/threads/er3/messages/{new}")
        assert not await redis_holding(redis, edited)
        assert not await redis_holding(redis, fresh)
        await asyncio.sleep(0.5)  # the flushers retry their batches against the dead server
    finally:
        await asyncio.to_thread(servers.postgres.start)
    conn = await asyncpg.connect(servers.postgres_url)  # the fixture's died with the server
    try:
        await flushed(redis, conn, ch, "er3", new, 2, "message.erased")
        assert await pg_version(conn, "er3", mid) == 3
        for text in (edited, fresh):
            assert nowhere(await holding(redis, conn, ch, text)), text
        # The unflushed counts the deleted entries held were given back: all flushed.
        t = pend_key(settings, "er3")
        assert await redis.hget(t, "pend") == b"0"
        await wait_for(lambda: _expiring(redis, t))
    finally:
        await conn.close()


async def test_a_thread_erase_while_postgres_is_down_resurrects_nothing(
        client_for: AppClient, settings: Any, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection, ch: ClickHouseStore) -> None:
    """The messages PostgreSQL never got are written by no flusher that held them through the
    outage (a thread erase leaves no later version of them that would win)."""
    if servers.postgres is None:
        pytest.skip("external PostgreSQL: the test cannot stop it")
    a, b = await client_for(settings), await client_for(settings)
    fresh = [marker(f"fresh{i}") for i in range(3)]
    await body(await a.put("/v1/threads/er8", json={}), 201)
    first = (await append(a, "er8", "flushed first"))["message_id"]
    await flushed(redis, pg, ch, "er8", first, 1, "message.created")
    await asyncio.to_thread(servers.postgres.stop)
    try:
        for text in fresh:
            await append(a, "er8", text)
        await asyncio.sleep(0.5)  # both sidecars' flushers hold them, retrying
        await erase(b, "/v1/threads/er8")
        for text in fresh:
            assert not await redis_holding(redis, text)
    finally:
        await asyncio.to_thread(servers.postgres.start)
    conn = await asyncpg.connect(servers.postgres_url)
    try:
        await wait_for(lambda: _thread_erased(conn, ch, "er8", 2), timeout_s=30)
        await wait_for(lambda: settled(redis), timeout_s=20)
        for text in fresh:
            assert nowhere(await holding(redis, conn, ch, text)), text
        assert await redis.hget(pend_key(settings, "er8"), "pend") == b"0"
    finally:
        await conn.close()


async def test_an_erase_removes_dead_letters_and_their_unflushed_counts(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection, ch: ClickHouseStore, poison: None) -> None:
    s = make_settings(servers, flush={"max_attempts": 2})
    a, b = await client_for(s), await client_for(s)
    secret = marker("dead")
    await body(await a.put("/v1/threads/er4", json={}), 201)
    mid = (await append(a, "er4", "poison", metadata={"why": secret}))["message_id"]
    dlq = keys.dead_letters(keys.shard_of("er4", s.redis.shards))

    async def dead_lettered() -> bool:
        return secret in repr(await redis.xrange(dlq))

    await wait_for(dead_lettered, timeout_s=20)
    await wait_for(lambda: settled(redis), timeout_s=20)
    t = pend_key(s, "er4")
    assert await redis.hget(t, "pend") == b"1"  # the dead letter's change is not in PostgreSQL

    await erase(b, f"/v1/threads/er4/messages/{mid}")
    assert not await redis.xrange(dlq)
    await flushed(redis, pg, ch, "er4", mid, 2, "message.erased")
    assert nowhere(await holding(redis, pg, ch, secret))
    assert await redis.hget(t, "pend") == b"0"
    status = await body(await a.get("/v1/status"), 200)
    assert not [d for d in status["dead_letters"] if d.get("tid") == "er4"]


async def test_a_thread_erase_reaches_what_only_postgres_and_clickhouse_hold(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection, ch: ClickHouseStore) -> None:
    s = make_settings(servers, redis={"window": 2}, cache={"recent_ids": 1})
    a, b = await client_for(s), await client_for(s)
    title, texts, kept = marker("title"), [marker(f"m{i}") for i in range(5)], marker("kept")
    await body(await a.put("/v1/threads/er5", json={"title": title, "metadata": {"t": title}}),
               201)
    await body(await a.put("/v1/threads/er6", json={}), 201)
    await append(a, "er6", kept)
    mids = [(await append(a, "er5", text, metadata={"x": text}))["message_id"]
            for text in texts]
    await body(await a.patch(f"/v1/threads/er5/messages/{mids[-1]}",
                             json={"content": f"{texts[-1]} edited"}), 200)
    await flushed(redis, pg, ch, "er5", mids[-1], 2, "message.updated")
    window = keys.window(keys.shard_of("er5", s.redis.shards), "er5")
    await wait_for(lambda: _smaller(redis, window, 3))  # older messages left Redis
    await wait_for(lambda: _absent(redis, texts[0]))  # (once the log is trimmed)
    for text in [title, *texts]:
        assert await pg_holding(pg, text) and await ch_holding(ch, text), text

    await body(await a.delete("/v1/threads/er5"), 200)  # deleted first: still erasable
    doc = await erase(b, "/v1/threads/er5")
    assert (doc["deleted"], doc["title"], doc["metadata"]) == (True, "", {})
    await wait_for(lambda: _thread_erased(pg, ch, "er5", 3), timeout_s=30)
    await wait_for(lambda: settled(redis), timeout_s=20)
    for text in [title, *texts]:
        assert nowhere(await holding(redis, pg, ch, text)), text
    assert everywhere(await holding(redis, pg, ch, kept))
    await error(await a.get("/v1/threads/er5"), 404, "not_found")
    await error(await b.get("/v1/threads/er5/messages"), 404, "not_found")
    # PostgreSQL keeps every seq (no gaps), without content.
    rows = await pg.fetch("SELECT seq, content, metadata::text AS m FROM messages"
                          " WHERE thread_id = 'er5' ORDER BY seq")
    assert [(r["seq"], r["content"], r["m"]) for r in rows] == [
        (i, "", "{}") for i in range(1, 6)]


async def test_a_persisted_thread_erase_blanks_postgres_before_it_answers(
        client_for: AppClient, servers: Servers, pg: asyncpg.Connection) -> None:
    """With flushing paused, only the answer's write-through can have blanked PostgreSQL."""
    c = await client_for(make_settings(servers, **PAUSED))
    persisted, secret = {"X-Durability": "persisted"}, marker("persisted")
    await body(await c.put("/v1/threads/er9", json={}, headers=persisted), 201)
    for i in range(3):
        resp = await c.post("/v1/threads/er9/messages", headers=persisted,
                            json={"role": "user", "content": f"{secret} {i}"})
        await body(resp, 201)
    assert await pg_holding(pg, secret) == ["public.messages"]
    resp = await c.delete("/v1/threads/er9?erase=true", headers=persisted)
    assert (await body(resp, 200))["deleted"] and resp.headers["X-Durability"] == "persisted"
    assert not await pg_holding(pg, secret)
    assert await pg.fetchval("SELECT deleted FROM threads WHERE thread_id = 'er9'")


async def test_an_erase_at_a_stale_version_is_412_and_changes_nothing(
        client: Client, redis: aioredis.Redis) -> None:
    secret = marker("stale")
    await body(await client.put("/v1/threads/er10", json={}), 201)
    mid = (await append(client, "er10", secret))["message_id"]
    async with unchanged(redis):
        await error(await client.delete(f"/v1/threads/er10/messages/{mid}?erase=true",
                                        headers={"If-Match": '"7"'}), 412, "precondition_failed")
        await error(await client.delete("/v1/threads/er10?erase=true",
                                        headers={"If-Match": '"7"'}), 412, "precondition_failed")
    assert await redis_holding(redis, secret)
    resp = await client.delete(f"/v1/threads/er10/messages/{mid}?erase=true",
                               headers={"If-Match": '"1"'})
    assert (await body(resp, 200))["version"] == 2


async def test_subscribers_see_an_erase_as_a_delete_without_content(
        client_for: AppClient, settings: Any) -> None:
    a, b = await client_for(settings), await client_for(settings)
    hub = a.app[routes.HUB]
    await wait_for(lambda: _true(len(hub.subscribed_shards) == settings.redis.shards))
    secret = marker("pushed")
    await body(await b.put("/v1/threads/er11", json={}), 201)
    mid = (await append(b, "er11", secret))["message_id"]
    async with a.ws_connect("/v1/ws") as ws:
        await ws.send_json({"op": "subscribe", "thread_id": "er11", "after_seq": 1})
        assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
        await erase(b, f"/v1/threads/er11/messages/{mid}")
        await erase(b, "/v1/threads/er11")
        events = [await ws.receive_json(timeout=5), await ws.receive_json(timeout=5)]
    assert [e["type"] for e in events] == ["message.deleted", "thread.deleted"]
    assert events[0]["message"]["content"] == "" and events[0]["seq"] == 1
    assert secret not in repr(events)


async def test_the_script_checks_the_read_ahead_and_scans_what_came_after_it(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis) -> None:
    """The erase script is given the entries a paged read found (one of them trimmed since)
    and scans the log only after the last one read: an entry appended after the read-ahead
    goes too, and the unflushed counts of both are given back."""
    s = make_settings(servers, **PAUSED)
    c = await client_for(s)
    secret = marker("late")
    await body(await c.put("/v1/threads/er12", json={}), 201)
    mid = (await append(c, "er12", f"{secret} 1"))["message_id"]
    await body(await c.patch(f"/v1/threads/er12/messages/{mid}", json={"content": secret}), 200)
    shard = keys.shard_of("er12", s.redis.shards)
    log, dlq, t = keys.log(shard), keys.dead_letters(shard), keys.thread(shard, "er12")
    entries = [i.decode() for i, _ in await redis.xrange(log)]
    assert len(entries) == 3 and await redis.hget(t, "pend") == b"3"
    tomb = (b'{"seq":1,"version":3,"message_id":"%s","thread_id":"er12","role":"user",'
            b'"content":"","metadata":{},"created_at":null,"updated_at":null,"deleted":true}'
            % mid.encode())
    out = await Scripts(redis).run("message_update", [
        t, keys.messages(shard, "er12"), keys.window(shard, "er12"), log,
        keys.cold(shard, "er12"), keys.recent(shard, "er12"), keys.overlay(shard, "er12"), dlq,
        keys.changes(shard, "er12")],
        ["er12", mid, 2, tomb, 3, "message.erased", keys.events(shard), 0, 1, "pg",
         entries[1], "0-0", 2, entries[1], "9-9"])  # entries[2] came "after"; 9-9 is gone
    assert out[0] == b"OK"
    assert not await redis_holding(redis, secret)
    assert await redis.hget(t, "pend") == b"2"  # the thread's entry and the erase
    assert len(await redis.xrange(log)) == 2


@pytest.mark.parametrize("query", ["erase=yes", "erase=", "erase=TRUE", "erase=1",
                                   "erase=true&erase=true"])
async def test_bad_erase_values_are_400_and_change_nothing(
        client: Client, redis: aioredis.Redis, query: str) -> None:
    await body(await client.put("/v1/threads/er7", json={}), 201)
    mid = (await append(client, "er7", "stays"))["message_id"]
    async with unchanged(redis):
        for path in ("/v1/threads/er7", f"/v1/threads/er7/messages/{mid}"):
            detail = await error(await client.delete(f"{path}?{query}"), 400, "malformed")
            assert detail == {"param": "erase"}
    assert (await body(await client.get(f"/v1/threads/er7/messages/{mid}"), 200))[
        "content"] == "stays"
    await body(await client.delete("/v1/threads/er7?erase=false"), 200)  # a plain tombstone


async def test_retention_days_sets_changes_and_removes_the_ttl(ch: ClickHouseStore) -> None:
    async def engine() -> str:
        rows = await ch.query("SELECT engine_full AS e FROM system.tables WHERE database ="
                              " currentDatabase() AND name = {t:String}", {"t": TABLE})
        return str(rows[0]["e"])

    try:
        await ch.create_schema(30)
        assert f"{ttl_clause(30)} " in await engine()
        await ch.create_schema(3)
        assert f"{ttl_clause(3)} " in await engine() and ttl_clause(30) not in await engine()
    finally:
        await ch.create_schema(0)
    assert " TTL " not in await engine()


def test_retention_days_is_a_validated_setting() -> None:
    assert load(env={"TIERPROXY_CLICKHOUSE_RETENTION_DAYS": "90"}).clickhouse.retention_days == 90
    assert load(env={}).clickhouse.retention_days == 0
    with pytest.raises(ConfigError, match="clickhouse.retention_days"):
        load(env={"TIERPROXY_CLICKHOUSE_RETENTION_DAYS": "-1"})
    with pytest.raises(ConfigError, match="clickhouse.retention_days"):
        load(env={"TIERPROXY_CLICKHOUSE_RETENTION_DAYS": "soon"})


def test_clickhouse_scopes_one_statement_per_thread() -> None:
    def change(kind: str, tid: str, eid: str, event: str) -> Change:
        return Change(0, "1-0", kind, eid, tid, 2, event, 0, b"{}")

    changes = [change("m", "t1", "a", "message.erased"), change("m", "t1", "b", "message.erased"),
               change("m", "t2", "c", "message.updated"), change("t", "t3", "t3", "thread.erased"),
               change("m", "t3", "d", "message.erased")]
    assert scopes(changes) == [("thread_id = {tid:String}", {"tid": "t3"}), (
        "thread_id = {tid:String} AND message_id IN {mids:Array(String)}",
        {"tid": "t1", "mids": ["a", "b"]})]


async def _true(value: bool) -> bool:
    return value


async def _expiring(r: aioredis.Redis, key: str) -> bool:
    return bool(await r.pttl(key) > 0)


async def _absent(r: aioredis.Redis, text: str) -> bool:
    return not await redis_holding(r, text)


async def _smaller(r: aioredis.Redis, key: str, size: int) -> bool:
    return bool(await r.zcard(key) < size)


async def _thread_erased(conn: asyncpg.Connection, ch: ClickHouseStore, tid: str,
                         version: int) -> bool:
    pg_done = await conn.fetchval("SELECT count(*) FROM threads WHERE thread_id = $1 AND"
                                  " version >= $2", tid, version)
    return bool(pg_done and await ch_events(ch, tid, "thread.erased"))
