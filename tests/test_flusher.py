"""Write-behind to PostgreSQL, in-process against real Redis and PostgreSQL: everything
acknowledged lands once at its latest version; coalescing, big batches, poison entries, safe
trimming, TTL only after flush, read-through and write-through."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys, metrics
from proxy.app import FAILPOINTS
from proxy.backends.postgres import PostgresSink, PostgresStore
from proxy.failpoints import Failpoints
from proxy.flusher import coalesce
from proxy.model import Change
from proxy.settings import Settings
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import append, body, wait_for

JSON = {"Content-Type": "application/json"}


async def put(c: TestClient[Any, Any], path: str, doc: Any, **headers: str) -> Any:
    resp = await c.put(path, data=orjson.dumps(doc), headers={**JSON, **headers})
    return await body(resp, resp.status if resp.status < 300 else 200)


def shard(settings: Settings, entity: str) -> int:
    return keys.shard_of(entity, settings.redis.shards)


async def pg_backlog_empty(r: aioredis.Redis, settings: Settings) -> bool:
    for s in range(settings.redis.shards):
        groups = {g["name"]: g for g in await r.xinfo_groups(keys.log(s))}
        pending = groups[b"pg"]["pending"]
        last = groups[b"pg"]["last-delivered-id"]
        newest = await r.xrevrange(keys.log(s), count=1)
        if pending or (newest and newest[0][0] != last):
            return False
    return True


async def test_everything_acknowledged_lands_once_at_latest_version(
        client: TestClient[Any, Any], pg: asyncpg.Connection) -> None:
    acked: dict[tuple[str, str], int] = {}
    for t in range(5):
        acked[("t", f"t{t}")] = (await put(client, f"/v1/threads/t{t}", {"title": "x"}))["version"]

    async def writer(n: int) -> None:
        for i in range(40):
            tid = f"t{random.randrange(5)}"
            doc = await append(client, tid, f"w{n}-{i}")
            acked[("m", doc["message_id"])] = doc["version"]
            if i % 5 == 0:
                resp = await client.patch(f"/v1/threads/{tid}/messages/{doc['message_id']}",
                                          data=b'{"content": "edited"}', headers=JSON)
                acked[("m", doc["message_id"])] = (await body(resp, 200))["version"]
            state = await put(client, f"/v1/state/k{n}", {"value": [n, i]})
            acked[("s", f"k{n}")] = state["version"]

    await asyncio.gather(*(writer(n) for n in range(8)))

    async def stored() -> dict[tuple[str, str], int]:
        rows = await pg.fetch("SELECT 'm' AS k, message_id AS id, version FROM messages"
                              " UNION ALL SELECT 's', key, version FROM state_entries"
                              " UNION ALL SELECT 't', thread_id, version FROM threads")
        return {(r["k"], r["id"]): r["version"] for r in rows}

    await wait_for(lambda: _equal(stored, acked), timeout_s=30)
    seqs = await pg.fetch("SELECT thread_id, array_agg(seq ORDER BY seq) AS s, max(seq) AS m"
                          " FROM messages GROUP BY thread_id")
    for row in seqs:
        assert row["s"] == list(range(1, row["m"] + 1))
    last = {r["thread_id"]: r["last_seq"] for r in await pg.fetch("SELECT * FROM threads")}
    assert {r["thread_id"]: r["m"] for r in seqs} == {t: n for t, n in last.items() if n}


async def _equal(stored: Any, acked: dict[tuple[str, str], int]) -> bool:
    return bool(await stored() == acked)


async def test_cached_keys_get_a_ttl_only_once_flushed(
        client: TestClient[Any, Any], redis: aioredis.Redis, settings: Settings) -> None:
    await put(client, "/v1/threads/ttl", {"title": "t"})
    await append(client, "ttl", "hello")
    await put(client, "/v1/state/ttl-k", {"value": 1})
    s_t, s_k = shard(settings, "ttl"), shard(settings, "ttl-k")
    names = [keys.thread(s_t, "ttl"), keys.messages(s_t, "ttl"), keys.window(s_t, "ttl"),
             keys.state(s_k, "ttl-k")]

    async def all_expiring() -> bool:
        return all([await redis.pttl(k) > 0 for k in names])

    await wait_for(all_expiring)
    assert all([await redis.pttl(k) <= settings.cache.ttl_s * 1000 for k in names])
    await append(client, "ttl", "again")  # a new unflushed write removes the TTL at once
    assert await redis.pttl(names[0]) == -1 and await redis.pttl(names[1]) == -1


async def test_unflushed_keys_never_expire_while_postgres_lags(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection) -> None:
    # Every PostgreSQL transaction stalls before its commit: while the flusher holds the
    # batch, the thread's keys have no TTL; once it commits, they get one.
    s = make_settings(servers, debug={"failpoint": "before-pg-commit:sleep:2"})
    c = await client_for(s)
    await put(c, "/v1/threads/lag", {"title": "t"})
    for i in range(20):
        await append(c, "lag", f"m{i}")
    names = [f(shard(s, "lag"), "lag") for f in (keys.thread, keys.messages, keys.window)]

    async def held() -> bool:  # the flusher read the batch and has not committed it
        pending = (await redis.xpending(keys.log(shard(s, "lag")), "pg"))["pending"]
        return bool(pending) and not await pg.fetchval("SELECT count(*) FROM messages")

    await wait_for(held)
    assert [await redis.pttl(k) for k in names] == [-1, -1, -1]
    c.server.app[FAILPOINTS].set("")  # later transactions commit at once

    async def expiring() -> bool:
        return all([await redis.pttl(k) > 0 for k in names])

    await wait_for(expiring, timeout_s=15)
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = 'lag'") == 20


async def test_in_batch_versions_are_coalesced(
        client_for: AppClient, servers: Servers, pg: asyncpg.Connection) -> None:
    s = make_settings(servers, flush={"max_delay_ms": 1000})
    c = await client_for(s)
    before = metrics.COALESCED.labels("pg")._value.get()
    for v in range(1, 4):  # versions 1, 2, 3 of one key inside one batch window
        assert (await put(c, "/v1/state/co", {"value": v}))["version"] == v

    async def landed() -> Any:
        return await pg.fetchrow("SELECT value::text, version FROM state_entries"
                                 " WHERE key = 'co'")

    row = await wait_for(landed)
    assert row["version"] == 3 and orjson.loads(row["value"]) == 3
    assert metrics.COALESCED.labels("pg")._value.get() - before >= 2


def _entry(kind: str, entity: str, version: int, doc: dict[str, Any], tid: str = "") -> Change:
    return Change(0, "0-1", kind, entity, tid or entity, version, f"{kind}.test", 0,
                 orjson.dumps(doc))


def _message(mid: str, tid: str, seq: int, version: int) -> Change:
    stamp = "2026-01-01T00:00:00.000Z"
    return _entry("m", mid, version, {
        "seq": seq, "version": version, "message_id": mid, "thread_id": tid, "role": "user",
        "content": f"c{version}", "metadata": {"n": seq}, "created_at": stamp,
        "updated_at": stamp, "deleted": False}, tid)


def test_coalesce_keeps_the_highest_version() -> None:
    batch = [_message("a", "t", 1, 1), _message("a", "t", 1, 3), _message("a", "t", 1, 2),
             _message("b", "t", 2, 1)]
    kept = {(e.entity_id, e.version) for e in coalesce(batch)}
    assert kept == {("a", 3), ("b", 1)}


async def test_a_batch_larger_than_the_parameter_limit(servers: Servers,
                                                       pg: asyncpg.Connection) -> None:
    store = await PostgresStore.open(servers.postgres_url, 2, 30, Failpoints(""))
    try:
        entries = [_message(f"big{i}", "big", i + 1, 1) for i in range(5000)]  # 50,000 values
        sink = PostgresSink(store)
        await sink.write(entries)
        await sink.write(entries)  # a replay changes nothing
        await sink.write([_message("big0", "big", 1, 2), _message("big1", "big", 2, 1)])
    finally:
        await store.close()
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = 'big'") == 5000
    assert await pg.fetchval("SELECT version FROM messages WHERE message_id = 'big0'") == 2
    assert await pg.fetchval("SELECT last_seq FROM threads WHERE thread_id = 'big'") == 5000


async def test_poison_entries_go_to_dead_letters_and_replay_after_a_fix(
        client: TestClient[Any, Any], redis: aioredis.Redis, pg: asyncpg.Connection,
        settings: Settings, poison: None) -> None:
    await put(client, "/v1/threads/p", {"title": "t"})
    await append(client, "p", "one")
    await wait_for(lambda: pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = 'p'"))
    log = keys.log(shard(settings, "p"))
    refused = await append(client, "p", "poison")  # PostgreSQL's check constraint refuses it
    await redis.xadd(log, {"k": "m", "id": "broken"})  # malformed: no doc at all
    later = await append(client, "p", "after the poison")

    async def status() -> Any:
        doc = await body(await client.get("/v1/status"), 200)
        return doc if doc["sinks"]["pg"]["dead_letters"] == 2 else None

    doc = await wait_for(status, timeout_s=20)
    reasons = " ".join(d["error"] for d in doc["dead_letters"])
    assert "violates check constraint" in reasons and "malformed" in reasons
    await wait_for(lambda: pg.fetchval("SELECT count(*) FROM messages WHERE message_id = $1",
                                       later["message_id"]))
    # The fix: the constraint goes away; replay puts the entry back in the log.
    await pg.execute("ALTER TABLE messages DROP CONSTRAINT poison")
    # pg gave up on both; ch (which accepts the refused one) only on the malformed one.
    replayed = await body(await client.post("/v1/admin/dead-letters/replay"), 200)
    assert replayed == {"replayed": 3}
    await wait_for(lambda: pg.fetchval("SELECT count(*) FROM messages WHERE message_id = $1",
                                       refused["message_id"]))
    dlq = keys.dead_letters(shard(settings, "p"))

    async def only_malformed_left() -> bool:
        rows = await redis.xrange(dlq)
        return sorted(f[b"group"] for _, f in rows) == [b"ch", b"pg"] and all(
            b"malformed" in f[b"error"] for _, f in rows)

    await wait_for(only_malformed_left)


async def test_trim_never_passes_a_lagging_group(
        client: TestClient[Any, Any], redis: aioredis.Redis, settings: Settings) -> None:
    await put(client, "/v1/threads/lg", {"title": "t"})
    log = keys.log(shard(settings, "lg"))
    await redis.xgroup_create(log, "lagger", id="0")
    for i in range(30):
        await append(client, "lg", f"m{i}")
    await wait_for(lambda: pg_backlog_empty(redis, settings))
    await asyncio.sleep(settings.flush.trim_interval_s * 3)  # several trim rounds pass
    assert await redis.xlen(log) == 31
    entries = await redis.xreadgroup("lagger", "c", {log: ">"}, count=100)
    await redis.xack(log, "lagger", *[i for i, _ in entries[0][1][:20]])

    async def trimmed_to_lagger() -> bool:
        return bool(await redis.xlen(log) <= 11)

    try:
        await wait_for(trimmed_to_lagger)
    except AssertionError:
        raise AssertionError((await redis.xlen(log), await redis.xinfo_groups(log))) from None
    assert await redis.xlen(log) == 11  # exactly what the lagger has not acknowledged


async def test_read_through_refills_redis(client: TestClient[Any, Any],
                                          redis: aioredis.Redis, settings: Settings) -> None:
    await put(client, "/v1/threads/rt", {"title": "read me"})
    msg = await append(client, "rt", "hello")
    await put(client, "/v1/state/rt-k", {"value": {"a": 1}})
    await wait_for(lambda: pg_backlog_empty(redis, settings))
    for path in ("/v1/threads/rt", f"/v1/threads/rt/messages/{msg['message_id']}",
                 "/v1/threads/rt/messages", "/v1/state/rt-k"):
        await redis.flushall()  # Redis lost everything it cached
        first = await client.get(path)
        assert first.status == 200 and first.headers["X-Tier"] == "postgres", path
        second = await client.get(path)
        assert second.headers["X-Tier"] == "redis", path
        assert await first.read() == await second.read()
    thread = await body(await client.get("/v1/threads/rt"), 200)
    assert thread["last_seq"] == 1 and thread["title"] == "read me"
    again = await append(client, "rt", "next")  # seq continues from PostgreSQL's last_seq
    assert again["seq"] == 2


async def test_idempotent_append_survives_the_cache(client: TestClient[Any, Any],
                                                    redis: aioredis.Redis,
                                                    settings: Settings) -> None:
    await put(client, "/v1/threads/idem", {"title": "t"})
    first = await append(client, "idem", "hi", message_id="m-1")
    await wait_for(lambda: pg_backlog_empty(redis, settings))
    await redis.flushall()
    resp = await client.post("/v1/threads/idem/messages", headers=JSON,
                             data=orjson.dumps({"message_id": "m-1", "role": "user",
                                                "content": "hi"}))
    assert (await body(resp, 200))["seq"] == first["seq"]
    resp = await client.post("/v1/threads/idem/messages", headers=JSON,
                             data=orjson.dumps({"message_id": "m-1", "role": "user",
                                                "content": "other"}))
    assert resp.status == 409


async def test_concurrent_misses_share_one_query(client: TestClient[Any, Any],
                                                 redis: aioredis.Redis,
                                                 settings: Settings) -> None:
    await put(client, "/v1/state/hot-key", {"value": "v"})
    await wait_for(lambda: pg_backlog_empty(redis, settings))
    await redis.delete(keys.state(shard(settings, "hot-key"), "hot-key"))
    before = metrics.READ_THROUGH.labels("postgres")._value.get()
    responses = await asyncio.gather(*(client.get("/v1/state/hot-key") for _ in range(100)))
    assert all(r.status == 200 for r in responses)
    assert metrics.READ_THROUGH.labels("postgres")._value.get() - before == 1


async def test_expired_state_never_comes_back_from_postgres(
        client: TestClient[Any, Any], redis: aioredis.Redis, settings: Settings) -> None:
    await put(client, "/v1/state/brief", {"value": 1, "ttl": 0.5})
    await wait_for(lambda: pg_backlog_empty(redis, settings))
    await redis.delete(keys.state(shard(settings, "brief"), "brief"))

    async def gone() -> bool:
        return (await client.get("/v1/state/brief")).status == 404

    await wait_for(gone)
    # A new write continues the version sequence from PostgreSQL.
    assert (await put(client, "/v1/state/brief", {"value": 2}))["version"] == 2


@pytest.mark.parametrize("path,method,payload", [
    ("/v1/threads/dur", "PUT", {"title": "t"}),
    ("/v1/threads/dur/messages", "POST", {"role": "user", "content": "x"}),
    ("/v1/state/dur", "PUT", {"value": 1}),
])
async def test_persisted_durability_returns_after_the_commit(
        client_for: AppClient, servers: Servers, pg: asyncpg.Connection, path: str,
        method: str, payload: Any) -> None:
    # The flusher would hold its batch for 5 s; the row can only be there by write-through.
    c = await client_for(make_settings(servers, flush={"max_delay_ms": 5000}))
    if path.startswith("/v1/threads/dur/"):
        await put(c, "/v1/threads/dur", {"title": "t"})
    resp = await c.request(method, path, data=orjson.dumps(payload),
                           headers={**JSON, "X-Durability": "persisted"})
    assert resp.status == 201
    counts = await pg.fetchrow(
        "SELECT (SELECT count(*) FROM threads WHERE version > 0) AS t,"
        " (SELECT count(*) FROM messages) AS m, (SELECT count(*) FROM state_entries) AS s")
    assert counts[{"PUT": "s" if "state" in path else "t", "POST": "m"}[method]] == 1


async def test_a_page_across_the_window_floor_has_no_gap(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        settings: Settings) -> None:
    """Old flushed messages come from PostgreSQL, unflushed ones from the window: a page
    spanning both must hold every seq (read-your-writes while PostgreSQL lags)."""
    s = make_settings(servers, redis={"window": 5}, shutdown={"deadline_s": 0.2})
    c = await client_for(s)
    await put(c, "/v1/threads/span", {"title": "t"})
    for i in range(20):
        await append(c, "span", f"old {i}")
    window = keys.window(shard(s, "span"), "span")

    async def trimmed() -> bool:
        return bool(await redis.zcard(window) == 5)

    await wait_for(trimmed)
    c.server.app[FAILPOINTS].set("before-pg-commit:sleep")  # PostgreSQL stops taking batches
    for i in range(10):
        await append(c, "span", f"new {i}")
    page = await body(await c.get("/v1/threads/span/messages?after=10&limit=20"), 200)
    assert [m["seq"] for m in page["items"]] == list(range(11, 31))
    assert page["items"][-1]["content"] == "new 9"


async def test_an_equal_version_with_other_content_is_counted_not_dropped_silently(
        servers: Servers, pg: asyncpg.Connection) -> None:
    stamp = "2026-01-01T00:00:00.000Z"

    def state(value: str) -> Change:
        return _entry("s", "conflicted", 2, {"version": 2, "key": "conflicted", "value": value,
                                             "expires_at": None, "updated_at": stamp,
                                             "deleted": False})

    before = metrics.VERSION_CONFLICTS.labels("state_entries")._value.get()
    store = await PostgresStore.open(servers.postgres_url, 2, 30, Failpoints(""))
    try:
        sink = PostgresSink(store)
        await sink.write([state("a")])
        await sink.write([state("a")])  # a replay: the same content, not a conflict
        assert metrics.VERSION_CONFLICTS.labels("state_entries")._value.get() == before
        await sink.write([state("b")])  # version 2 handed out twice
    finally:
        await store.close()
    assert metrics.VERSION_CONFLICTS.labels("state_entries")._value.get() == before + 1
    assert await pg.fetchval("SELECT value::text FROM state_entries WHERE key = 'conflicted'") \
        == '"a"'
