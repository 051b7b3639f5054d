"""Write-through while Redis is down (redis.write_through, issue 11.1): a sidecar whose Redis
is killed answers from PostgreSQL alone — writes committed there (X-Tier postgres,
X-Durability persisted, seq assigned under the thread's row lock, idempotency and If-Match
checked there), reads from it, ready, and saying so in /v1/status — and once Redis is back,
Redis is reconciled with PostgreSQL before write-behind resumes, so seqs stay unique and
gapless. The switch-over times are printed (never asserted: machines differ)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import keys, metrics
from proxy.app import FAILPOINTS
from proxy.backends.clickhouse import ClickHouseStore
from proxy.embedded import RedisServer
from tests.conftest import AppClient, Servers, make_settings
from tests.faults.results import Outcome, recording
from tests.faults.tcpproxy import FaultProxy
from tests.helpers import body, past_503, until_mode, wait_for, write_behind_again

Client = TestClient[Any, Any]


@pytest.fixture
def outcome(request: pytest.FixtureRequest) -> Iterator[Outcome]:
    """The figures, recorded for RELIABILITY.md's matrix when TIERPROXY_FAULTS_RESULTS asks
    for them (tests/faults/results.py)."""
    yield from recording(request)


@pytest.fixture
async def sidecar(client_for: AppClient, servers: Servers, own_redis: RedisServer) -> Client:
    s = make_settings(servers, redis={"url": own_redis.url, "write_through": True,
                                      "socket_timeout_s": 1.0})
    return await client_for(s)


async def append(c: Client, tid: str, mid: str, content: str = "hi") -> Any:
    return await c.post(f"/v1/threads/{tid}/messages",
                        json={"message_id": mid, "role": "user", "content": content})


async def flushed(pg: asyncpg.Connection, tid: str, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", tid) == n


async def test_writes_go_through_postgres_while_redis_is_down(
        sidecar: Client, own_redis: RedisServer, pg: asyncpg.Connection,
        ch: ClickHouseStore, outcome: Outcome) -> None:
    outcome.describe("Redis kill -9 with redis.write_through: writes through PostgreSQL, "
                     "then back", faults_md=7, recovery="Redis back -> first write-behind answer")
    await body(await sidecar.put("/v1/threads/f1", json={"title": "t"}), 201)
    for i in (1, 2):
        await body(await append(sidecar, "f1", f"m{i}"), 201)
    await body(await sidecar.put("/v1/state/k1", json={"value": 1}), 201)
    await wait_for(lambda: flushed(pg, "f1", 2))
    await wait_for(lambda: pg.fetchval("SELECT count(*) FROM state_entries WHERE key = 'k1'"))

    own_redis.kill()
    killed = time.monotonic()

    resp = await past_503(lambda: append(sidecar, "f1", "m3"))
    switched = time.monotonic() - killed
    doc = await body(resp, 201)
    assert doc["seq"] == 3
    assert (resp.headers["X-Tier"], resp.headers["X-Durability"]) == ("postgres", "persisted")
    assert await pg.fetchval("SELECT seq FROM messages WHERE message_id = 'm3'") == 3
    assert await pg.fetchval("SELECT last_seq FROM threads WHERE thread_id = 'f1'") == 3

    # Idempotency and If-Match are PostgreSQL's now.
    again = await append(sidecar, "f1", "m3")
    assert (await body(again, 200))["seq"] == 3
    await body(await append(sidecar, "f1", "m3", "other"), 409)
    stale = await sidecar.put("/v1/state/k1", json={"value": 2}, headers={"If-Match": '"7"'})
    await body(stale, 412)
    put = await sidecar.put("/v1/state/k1", json={"value": 2}, headers={"If-Match": '"1"'})
    assert (await body(put, 200))["version"] == 2
    edited = await sidecar.patch("/v1/threads/f1/messages/m1", json={"content": "edited"})
    assert (await body(edited, 200))["version"] == 2

    # Reads from PostgreSQL; ready; status says how it serves.
    page = await sidecar.get("/v1/threads/f1/messages")
    items = (await body(page, 200))["items"]
    assert page.headers["X-Tier"] == "postgres"
    assert [(m["seq"], m["content"]) for m in items] == [(1, "edited"), (2, "hi"), (3, "hi")]
    assert (await body(await sidecar.get("/v1/state/k1"), 200))["value"] == 2
    assert (await sidecar.get("/readyz")).status == 200
    status = await body(await sidecar.get("/v1/status"), 200)
    assert (status["tiers"]["redis"]["state"], status["mode"]) == ("down", "write-through")

    own_redis.start()
    back = time.monotonic()

    async def behind() -> Any:
        resp = await append(sidecar, "f1", f"r{time.monotonic_ns()}")
        doc = await body(resp, 201)
        return doc if resp.headers["X-Tier"] == "redis" else None

    doc = await wait_for(behind, timeout_s=20, interval_s=0.05)
    resumed = time.monotonic() - back
    outcome.recovered(back, back + resumed)
    outcome.notes = f"Redis killed -> first write-through answer {switched:.2f} s"
    print(f"\nredis killed -> first write-through write {switched:.2f} s; "
          f"redis back -> write-behind {resumed:.2f} s")
    status = await body(await sidecar.get("/v1/status"), 200)
    assert status["mode"] == "write-behind"
    # Reconciled: Redis carries on after PostgreSQL's seq, and every seq is used once.
    n = doc["seq"]
    assert n >= 4
    await wait_for(lambda: flushed(pg, "f1", n))
    seqs = [r["seq"] for r in await pg.fetch(
        "SELECT seq FROM messages WHERE thread_id = 'f1' ORDER BY seq")]
    assert seqs == list(range(1, n + 1))
    page = await body(await sidecar.get("/v1/threads/f1/messages"), 200)
    assert [m["seq"] for m in page["items"]] == seqs
    assert page["items"][0]["content"] == "edited"
    outcome.acknowledged, outcome.lost, outcome.duplicated = n + 4, 0, 0
    # What went through PostgreSQL reaches ClickHouse too, once: published on recovery.
    through = {"m:m3:1", "m:m1:2", "s:k1:2"}

    async def in_clickhouse() -> bool:
        rows = await ch.query("SELECT event_id FROM events", {})
        ids = [r["event_id"] for r in rows]
        assert all(ids.count(i) <= 1 for i in through), ids
        return through <= set(ids)

    await wait_for(in_clickhouse, timeout_s=20)
    assert await pg.fetchval("SELECT count(*) FROM write_through_events") == 0


async def test_an_unflushed_append_lands_after_the_ones_written_through(
        sidecar: Client, own_redis: RedisServer, pg: asyncpg.Connection,
        outcome: Outcome) -> None:
    """FAULTS.md 7 to the letter: an append Redis acknowledged and had not flushed when it
    died (its batch keeps failing) and one written through meanwhile get the same seq; once
    Redis is back, the unflushed one lands after it, and write-behind resumes past both."""
    outcome.describe("Redis kill -9 with an acknowledged append unflushed, write-through "
                     "takes its seq", faults_md=7, recovery="Redis back -> write-behind")
    await body(await sidecar.put("/v1/threads/f7", json={}), 201)
    await body(await append(sidecar, "f7", "m1"), 201)
    await wait_for(lambda: flushed(pg, "f7", 1))
    sidecar.app[FAILPOINTS].set("after-read:raise")  # the next batch stays pending
    unflushed = await body(await append(sidecar, "f7", "m2"), 201)
    earlier = await sidecar.patch("/v1/threads/f7/messages/m1", json={"content": "in redis"})
    assert (await body(earlier, 200))["version"] == 2
    own_redis.kill()

    resp = await past_503(lambda: append(sidecar, "f7", "m3"))
    assert (await body(resp, 201))["seq"] == unflushed["seq"] == 2
    assert resp.headers["X-Tier"] == "postgres"
    later = await sidecar.patch("/v1/threads/f7/messages/m1", json={"content": "through"})
    assert (await body(later, 200))["version"] == 2  # PostgreSQL had v1
    sidecar.app[FAILPOINTS].set("")
    own_redis.start()
    back = time.monotonic()

    await write_behind_again(sidecar)  # after m2's flush (reconciled)
    outcome.recovered(back, time.monotonic())
    resp = await append(sidecar, "f7", "m4")
    assert ((await body(resp, 201))["seq"], resp.headers["X-Tier"]) == (4, "redis")
    await wait_for(lambda: flushed(pg, "f7", 4))
    rows = await pg.fetch("SELECT seq, message_id FROM messages WHERE thread_id = 'f7'"
                          " ORDER BY seq")
    assert [(r["seq"], r["message_id"]) for r in rows] == [(1, "m1"), (2, "m3"), (3, "m2"),
                                                           (4, "m4")]
    page = await body(await sidecar.get("/v1/threads/f7/messages"), 200)
    assert [(m["seq"], m["message_id"]) for m in page["items"]] == [
        (r["seq"], r["message_id"]) for r in rows]
    # The later edit wins everywhere: PostgreSQL kept it, Redis's copy was dropped.
    assert page["items"][0]["content"] == "through"
    assert await pg.fetchval("SELECT content FROM messages WHERE message_id = 'm1'") == "through"
    outcome.acknowledged, outcome.lost, outcome.duplicated = 6, 0, 0
    outcome.notes = ("the unflushed m2 moved from seq 2 to 3 (write-through took 2); the "
                     "unflushed edit lost to the later one written through")


async def test_without_write_through_redis_down_is_503(
        client_for: AppClient, servers: Servers, own_redis: RedisServer) -> None:
    c = await client_for(make_settings(servers, redis={"url": own_redis.url,
                                                       "socket_timeout_s": 1.0}))
    await body(await c.put("/v1/threads/f2", json={}), 201)
    own_redis.kill()
    for _ in range(5):
        resp = await append(c, "f2", "m1")
        assert (await body(resp, 503))["error"]["code"] == "unavailable"
        assert "Retry-After" in resp.headers


async def test_a_sidecar_cut_off_from_redis_keeps_both_appends(
        client_for: AppClient, servers: Servers, own_redis: RedisServer,
        pg: asyncpg.Connection, outcome: Outcome) -> None:
    """FAULTS.md 30, the guarantee kept when only some sidecars lose Redis: sidecar A still
    has it and acknowledges an append its flusher has not flushed yet (it holds the batch
    3 s); sidecar B, cut off, writes an append through PostgreSQL at the same seq. PostgreSQL
    keeps B's at that seq (answered persisted: true), and A's, acknowledged too, moves to the
    end of the thread: never a seq given twice in PostgreSQL, never a write dropped."""
    outcome.describe("split path: B cut from Redis writes through, A's unflushed append at "
                     "the same seq", faults_md=30, recovery="")
    a = await client_for(make_settings(servers, redis={"url": own_redis.url},
                                       debug={"failpoint": "after-read:sleep:3"}))
    await body(await a.put("/v1/threads/p1", json={}), 201)
    await body(await append(a, "p1", "m1"), 201)
    await wait_for(lambda: flushed(pg, "p1", 1), timeout_s=20)
    seen = metrics.REDIS_DATA_LOSS.labels("seq_taken")._value.get()
    with FaultProxy("127.0.0.1", own_redis.port) as proxy:
        b = await client_for(make_settings(servers, redis={
            "url": f"redis://127.0.0.1:{proxy.port}/0", "write_through": True,
            "socket_timeout_s": 1.0}))
        proxy.set_mode("down")
        acked = await body(await append(a, "p1", "m2"), 201)  # seq 2, in Redis only

        resp = await past_503(lambda: append(b, "p1", "m3"), timeout_s=10)
        assert (await body(resp, 201))["seq"] == acked["seq"] == 2
        assert resp.headers["X-Durability"] == "persisted"
        await wait_for(lambda: flushed(pg, "p1", 3), timeout_s=30)
    rows = await pg.fetch("SELECT seq, cseq, message_id FROM messages WHERE thread_id = 'p1'"
                          " ORDER BY seq")
    assert [(r["seq"], r["message_id"]) for r in rows] == [(1, "m1"), (2, "m3"), (3, "m2")]
    assert len({r["cseq"] for r in rows}) == 3  # the feed's numbers stay unique too
    assert await pg.fetchval("SELECT last_seq FROM threads WHERE thread_id = 'p1'") == 3
    assert metrics.REDIS_DATA_LOSS.labels("seq_taken")._value.get() > seen  # alarmed
    assert (await body(await a.get("/v1/status"), 200))["dead_letters"] == []
    outcome.acknowledged, outcome.lost, outcome.duplicated = 3, 0, 0
    outcome.notes = ("A's acknowledged m2 moved to seq 3 (B's write-through took 2): counted "
                     "as seq_taken and logged, never a seq twice, nothing lost")


async def test_while_one_sidecar_writes_through_the_others_do_too(
        client_for: AppClient, servers: Servers, own_redis: RedisServer,
        pg: asyncpg.Connection) -> None:
    """Sidecar B, cut off from Redis, writes through PostgreSQL; sidecar A still reaches Redis.
    Were A to go on in write-behind, its next write of an entry B just wrote through would be
    answered at the version B's got (Redis never saw B's). A follows B into write-through
    (B's lease in PostgreSQL) and both resume write-behind once B's Redis answers: every
    version is acknowledged once, and the next write after recovery counts on from the last."""
    a = await client_for(make_settings(servers, redis={"url": own_redis.url,
                                                       "write_through": True}))
    url = "/v1/state/lease-k"
    assert (await body(await a.put(url, json={"value": 1}), 201))["version"] == 1
    await wait_for(lambda: pg.fetchval("SELECT version = 1 FROM state_entries"
                                       " WHERE key = 'lease-k'"))
    with FaultProxy("127.0.0.1", own_redis.port) as proxy:
        b = await client_for(make_settings(servers, redis={
            "url": f"redis://127.0.0.1:{proxy.port}/0", "write_through": True,
            "socket_timeout_s": 1.0}))
        proxy.set_mode("down")
        resp = await past_503(lambda: b.put(url, json={"value": 2}))
        assert ((await body(resp, 200))["version"], resp.headers["X-Tier"]) == (2, "postgres")
        await until_mode(a, "write-through", timeout_s=10)
        resp = await a.put(url, json={"value": 3})
        assert ((await body(resp, 200))["version"], resp.headers["X-Tier"]) == (3, "postgres")
        proxy.set_mode("pass")
        await write_behind_again(b)
        await write_behind_again(a)
    resp = await a.put(url, json={"value": 4})
    assert ((await body(resp, 200))["version"], resp.headers["X-Tier"]) == (4, "redis")
    await wait_for(lambda: pg.fetchval("SELECT version = 4 FROM state_entries"
                                       " WHERE key = 'lease-k'"), timeout_s=20)
    assert await pg.fetchval("SELECT count(*) FROM write_through_leases") == 0


async def test_a_starting_sidecar_follows_a_live_lease_until_it_runs_out(
        client_for: AppClient, servers: Servers, own_redis: RedisServer,
        pg: asyncpg.Connection) -> None:
    """A sidecar started while another writes through (its lease in PostgreSQL) serves from
    PostgreSQL too; a lease whose holder stopped renewing it (killed, paused) runs out and
    does not hold anyone back; one that ran out already is not followed at all."""
    await pg.execute("INSERT INTO write_through_leases VALUES ('old', 'down', now() - "
                     "interval '1 second'), ('gone', 'down', now() + interval '4 seconds')")
    a = await client_for(make_settings(servers, redis={"url": own_redis.url,
                                                       "write_through": True}))
    await until_mode(a, "write-through", timeout_s=3)
    resp = await a.put("/v1/state/follow-k", json={"value": 1})
    assert (await body(resp, 201))["version"] == 1
    assert resp.headers["X-Tier"] == "postgres"
    await write_behind_again(a, timeout_s=15)
    resp = await a.put("/v1/state/follow-k", json={"value": 2})
    assert ((await body(resp, 200))["version"], resp.headers["X-Tier"]) == (2, "redis")
    assert await pg.fetchval("SELECT count(*) FROM write_through_leases") == 0


async def test_a_starting_sidecar_follows_a_recovering_mark_in_redis(
        client_for: AppClient, servers: Servers, own_redis: RedisServer) -> None:
    """Another sidecar's Redis answers again while it still serves from PostgreSQL (Redis is
    behind PostgreSQL until it reconciles): it marks Redis so. A sidecar started then — which
    may not reach PostgreSQL to read the leases (the write-through soak, seed 7, started one
    during a PostgreSQL stop) — follows the mark, and resumes once it runs out."""
    r = aioredis.Redis.from_url(own_redis.url)
    try:
        await r.hset(keys.RECOVERING, "other", int((time.time() + 3) * 1000))
    finally:
        await r.aclose()
    a = await client_for(make_settings(servers, redis={"url": own_redis.url,
                                                       "write_through": True}))
    assert (await body(await a.get("/v1/status"), 200))["mode"] == "write-through"
    resp = await a.put("/v1/state/mark-k", json={"value": 1})
    assert ((await body(resp, 201))["version"], resp.headers["X-Tier"]) == (1, "postgres")
    await write_behind_again(a, timeout_s=15)
    resp = await a.put("/v1/state/mark-k", json={"value": 2})
    assert ((await body(resp, 200))["version"], resp.headers["X-Tier"]) == (2, "redis")


async def test_read_markers_go_through_postgres_while_redis_is_down(
        sidecar: Client, own_redis: RedisServer, pg: asyncpg.Connection,
        ch: ClickHouseStore) -> None:
    """A marker moved in PostgreSQL while Redis is down is the one Redis serves once back,
    though Redis still caches the older one: a lower PUT after recovery does not move it back."""
    url = "/v1/threads/f3/read-markers/u1"
    await body(await sidecar.put("/v1/threads/f3", json={"title": "t", "owner_id": "o3"}), 201)
    for i in (1, 2, 3):
        await body(await append(sidecar, "f3", f"n{i}"), 201)
    await body(await sidecar.put(url, json={"seq": 1}), 200)
    assert (await body(await sidecar.get(url), 200))["unread"] == 2
    await wait_for(lambda: pg.fetchval("SELECT seq = 1 FROM read_markers"
                                       " WHERE thread_id = 'f3' AND user_id = 'u1'"))
    own_redis.kill()

    resp = await past_503(lambda: sidecar.put(url, json={"seq": 3}))
    assert (await body(resp, 200))["seq"] == 3
    assert (resp.headers["X-Tier"], resp.headers["X-Durability"]) == ("postgres", "persisted")
    assert (await body(await sidecar.put(url, json={"seq": 2}), 200))["seq"] == 3
    await body(await sidecar.put(url, json={"seq": 9}), 422)
    await body(await sidecar.put("/v1/threads/nope/read-markers/u1", json={"seq": 1}), 404)
    got = await sidecar.get(url)
    assert ((await body(got, 200))["unread"], got.headers["X-Tier"]) == (0, "postgres")

    own_redis.start()  # its AOF still has the marker at 1

    async def behind() -> Any:
        resp = await append(sidecar, "f3", f"r{time.monotonic_ns()}")
        return resp if resp.headers["X-Tier"] == "redis" else None

    last = (await body(await wait_for(behind, timeout_s=20, interval_s=0.05), 201))["seq"]
    got = await sidecar.get(url)
    assert (await body(got, 200))["seq"] == 3
    assert (await body(await sidecar.put(url, json={"seq": 2}), 200))["seq"] == 3
    inbox = await body(await sidecar.get("/v1/threads?owner_id=o3&user_id=u1"), 200)
    assert [(t["thread_id"], t["unread"]) for t in inbox["items"]] == [("f3", last - 3)]

    async def in_clickhouse() -> bool:
        rows = await ch.query("SELECT event_id FROM events", {})
        return "r:u1:3" in {r["event_id"] for r in rows}

    await wait_for(in_clickhouse, timeout_s=20)
