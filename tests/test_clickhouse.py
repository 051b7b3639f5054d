"""ClickHouse, the analytics tier, on real chDB through clickhouse-connect: every acknowledged
change is exactly one visible row (despite retries, redeliveries, crashes and restarts), an
outage of ClickHouse leaves the pg group alone and keeps the ch backlog until it drains,
degraded reads with PostgreSQL stopped, and /stats after edits and deletes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from proxy import keys
from proxy.app import FAILPOINTS
from proxy.backends.ch_backing import ClickHouseBacking
from proxy.backends.clickhouse import ClickHouseSink, ClickHouseStore
from proxy.client import NO_RETRY, TransportError, Written
from proxy.client import Client as APIClient
from proxy.embedded import clickhouse_url
from proxy.errors import Unavailable
from proxy.failpoints import Failpoints
from proxy.model import Change
from proxy.settings import Settings
from tests.conftest import Servers
from tests.helpers import append, body, error, settled, wait_for
from tests.sidecar import Sidecar, clickhouse_query
from tests.test_openapi import Exchange

Client = TestClient[Any, Any]
FINAL_IDS = "SELECT event_id FROM events FINAL ORDER BY event_id"
STATS = "/v1/threads/{tid}/stats"
ENTITY_FIELD = {"t": "thread_id", "m": "message_id", "s": "key"}  # a change's id in its doc


# ---- helpers


class Acked(set[str]):
    """The event ids (kind:entity:version, as the ch sink makes them) of the changes the
    API acknowledged: what ClickHouse must show, each exactly once."""

    def note(self, kind: str, doc: dict[str, Any]) -> dict[str, Any]:
        """Records the change `doc` (an answer's JSON) stands for; returns `doc`."""
        self.add(f"{kind}:{doc[ENTITY_FIELD[kind]]}:{doc['version']}")
        return doc


async def call(c: Client, method: str, path: str, status: int, doc: Any = None) -> Any:
    resp = await c.request(method, path, json=doc)
    return await body(resp, status)


async def put_thread(c: Client, tid: str, acked: Acked, status: int = 201) -> Any:
    return acked.note("t", await call(c, "PUT", f"/v1/threads/{tid}", status,
                                      {"title": f"title {tid}"}))


async def edit(c: Client, tid: str, mid: str, acked: Acked, **fields: Any) -> Any:
    return acked.note("m", await call(c, "PATCH", f"/v1/threads/{tid}/messages/{mid}", 200,
                                      fields))


async def delete(c: Client, tid: str, mid: str, acked: Acked) -> Any:
    return acked.note("m", await call(c, "DELETE", f"/v1/threads/{tid}/messages/{mid}", 200))


async def final_ids(ch: ClickHouseStore) -> set[str]:
    return {r["event_id"] for r in await ch.query(FINAL_IDS, {})}


async def counts(ch: ClickHouseStore) -> tuple[int, int]:
    """Rows as stored, and rows visible with FINAL."""
    raw = await ch.query("SELECT count() AS n FROM events", {})
    final = await ch.query("SELECT count() AS n FROM events FINAL", {})
    return raw[0]["n"], final[0]["n"]


async def has_rows(ch: ClickHouseStore, expected: set[str]) -> bool:
    return await final_ids(ch) == expected


def sample(name: str, sink: str) -> float:
    return REGISTRY.get_sample_value(name, {"sink": sink}) or 0.0


# ---- in process


async def test_every_acknowledged_change_is_one_row(client: Client, ch: ClickHouseStore,
                                                    pg: asyncpg.Connection) -> None:
    """Quick successive versions of one message land in one batch: each is its own event
    (the ch flusher does not coalesce), once."""
    acked = Acked()
    rows_before = sample("tierproxy_flushed_rows_total", "ch")
    for t in range(3):
        await put_thread(client, f"t{t}", acked)
    for i in range(30):
        tid = f"t{i % 3}"
        msg = acked.note("m", await append(client, tid, f"m{i}"))
        if i % 4 == 0:
            await edit(client, tid, msg["message_id"], acked, content=f"edited {i}")
        if i % 7 == 0:
            await delete(client, tid, msg["message_id"], acked)
        acked.note("s", await call(client, "PUT", f"/v1/state/k{i % 5}",
                                   200 if i >= 5 else 201, {"value": i}))
    await call(client, "PUT", "/v1/threads/t0", 200, {"title": "renamed"})
    acked.add("t:t0:2")
    await wait_for(lambda: has_rows(ch, acked), timeout_s=30)
    assert (await counts(ch))[1] == len(acked)
    assert sample("tierproxy_flushed_rows_total", "ch") - rows_before >= len(acked)
    assert sample("tierproxy_flush_batch_entries_count", "ch") > 0


async def test_a_batch_inserted_twice_or_redelivered_differently_shows_once(
        ch: ClickHouseStore) -> None:
    """The two layers of exactly-once: the same batch again is dropped at insert (same
    token), a redelivery in another composition is a duplicate row that FINAL hides."""
    sink = ClickHouseSink(ch, "test", True, Failpoints(""))
    entries = [message_entry("dedup", f"m{i}", i + 1, 1, "hello") for i in range(20)]
    await sink.write(entries)
    await sink.write(list(reversed(entries)))  # same set, other order: same token
    assert await counts(ch) == (20, 20)
    await sink.write(entries[5:12])  # a partial redelivery: another token
    raw, final = await counts(ch)
    assert (raw, final) == (27, 20)
    stats = await ch.thread_stats("dedup")
    assert stats is not None and stats["messages"] == 20
    assert stats["content_bytes"] == 20 * len(b"hello")


def message_entry(tid: str, mid: str, seq: int, version: int, content: str,
                  deleted: bool = False) -> Change:
    stamp = "2026-01-02T03:04:05.678Z"
    doc = {"seq": seq, "version": version, "message_id": mid, "thread_id": tid, "role": "user",
           "content": content, "metadata": {}, "created_at": stamp, "updated_at": stamp,
           "deleted": deleted}
    event = "message.deleted" if deleted else "message.created"
    return Change(0, f"1-{seq}", "m", mid, tid, version, event, 0, orjson.dumps(doc))


async def test_clickhouse_outage_leaves_pg_alone_and_the_backlog_drains(
        client: Client, ch: ClickHouseStore, pg: asyncpg.Connection, redis: aioredis.Redis,
        settings: Settings) -> None:
    failpoints = client.app[FAILPOINTS]
    acked = Acked()
    retries = sample("tierproxy_flush_retries_total", "ch")
    failpoints.set("ch-insert:raise")
    try:
        await put_thread(client, "out", acked)
        for i in range(40):
            acked.note("m", await append(client, "out", f"during outage {i}"))

        async def pg_has_all() -> bool:
            n = await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = 'out'")
            return bool(n == 40)

        await wait_for(pg_has_all, timeout_s=20)
        # PostgreSQL keeps flushing: its backlog drains while ClickHouse's holds everything.
        status = await wait_for(lambda: ch_backlog_at_least(client, len(acked)))
        assert status["tiers"]["clickhouse"]["state"] == "down"
        assert sample("tierproxy_flush_retries_total", "ch") > retries
        assert await final_ids(ch) == set()
        stream = keys.log(keys.shard_of("out", settings.redis.shards))
        assert await redis.xlen(stream) >= len(acked)  # never trimmed past the ch group
    finally:
        failpoints.set("")
    await wait_for(lambda: has_rows(ch, acked), timeout_s=30)
    assert (await counts(ch))[1] == len(acked)
    await wait_for(lambda: settled(redis), timeout_s=10)


async def ch_backlog_at_least(client: Client, n: int) -> Any:
    status = await call(client, "GET", "/v1/status", 200)
    ch, pg = status["sinks"]["ch"], status["sinks"]["pg"]
    return status if (ch["backlog"] >= n and ch["circuit"] != "closed"
                      and pg["backlog"] == 0) else None


async def test_status_and_metrics_include_the_clickhouse_sink(
        client: Client, ch: ClickHouseStore, redis: aioredis.Redis) -> None:
    acked = Acked()
    await put_thread(client, "st", acked)
    acked.note("m", await append(client, "st"))
    await wait_for(lambda: has_rows(ch, acked))

    async def drained() -> Any:
        status = await call(client, "GET", "/v1/status", 200)
        return status if status["sinks"]["ch"]["backlog"] == 0 else None

    status = await wait_for(drained)
    assert status["sinks"]["ch"] == {"circuit": "closed", "backlog": 0, "lag_s": 0.0,
                                     "dead_letters": 0}
    assert status["tiers"]["clickhouse"] == {"state": "up"}
    assert sample("tierproxy_flush_seconds_count", "ch") > 0
    assert REGISTRY.get_sample_value("tierproxy_backlog_entries", {"sink": "ch"}) == 0


async def test_a_poison_entry_is_dead_lettered_and_the_rest_flows(
        client: Client, ch: ClickHouseStore, redis: aioredis.Redis,
        settings: Settings) -> None:
    acked = Acked()
    await put_thread(client, "px", acked)
    stream = keys.log(keys.shard_of("px", settings.redis.shards))
    bad = message_entry("px", "bad", -1, 1, "x")  # PostgreSQL takes it, UInt64 does not
    await redis.xadd(stream, {"k": "m", "id": "bad", "tid": "px", "v": "1",
                              "e": "message.created", "ts": "0", "d": bad.doc})
    acked.note("m", await append(client, "px"))
    await wait_for(lambda: has_rows(ch, acked), timeout_s=20)

    async def dead_lettered() -> Any:
        status = await call(client, "GET", "/v1/status", 200)
        return status if status["sinks"]["ch"]["dead_letters"] == 1 else None

    status = await wait_for(dead_lettered, timeout_s=20)
    assert any(d["group"] == "ch" and d["source_id"] for d in status["dead_letters"])


# ---- /stats


async def test_stats_match_what_was_written_after_edits_and_deletes(
        client: Client, ch: ClickHouseStore) -> None:
    acked = Acked()
    await put_thread(client, "s1", acked)
    live: dict[str, dict[str, Any]] = {}
    for i, (role, text) in enumerate([("user", "hello"), ("assistant", "héllo wörld"),
                                      ("user", "🙂 emoji"), ("system", "be brief"),
                                      ("assistant", "x" * 300), ("user", "bye")]):
        msg = acked.note("m", await append(client, "s1", text, role=role))
        live[msg["message_id"]] = msg
        if i == 1:  # an edit changes the text
            live[msg["message_id"]] = await edit(client, "s1", msg["message_id"], acked,
                                                 content="short")
        if i == 3:  # an edit changes the role
            live[msg["message_id"]] = await edit(client, "s1", msg["message_id"], acked,
                                                 role="user")
        if i == 4:
            await delete(client, "s1", msg["message_id"], acked)
            del live[msg["message_id"]]
    await wait_for(lambda: has_rows(ch, acked), timeout_s=20)
    resp = await client.get("/v1/threads/s1/stats")
    stats = await body(resp, 200)
    assert resp.headers["X-Tier"] == "clickhouse" and "X-Staleness-S" in resp.headers
    assert stats == expected_stats("s1", list(live.values()))
    documented = Exchange(client)  # status, headers and body as proxy/openapi.py says
    assert await documented("GET", STATS, "/v1/threads/s1/stats", 200) == stats
    await documented("GET", STATS, "/v1/threads/nope/stats", 404)
    await documented("GET", STATS, "/v1/threads/bad%20id/stats", 422)
    first = min(live.values(), key=lambda m: m["seq"])
    await delete(client, "s1", first["message_id"], acked)
    del live[first["message_id"]]
    await wait_for(lambda: has_rows(ch, acked), timeout_s=20)
    assert await body(await client.get("/v1/threads/s1/stats"), 200) == \
        expected_stats("s1", list(live.values()))
    await call(client, "DELETE", "/v1/threads/s1", 200)

    async def gone() -> bool:
        return (await client.get("/v1/threads/s1/stats")).status == 404

    await wait_for(gone, timeout_s=20)


def expected_stats(tid: str, live: list[dict[str, Any]]) -> dict[str, Any]:
    by_role: dict[str, int] = {}
    for m in live:
        by_role[m["role"]] = by_role.get(m["role"], 0) + 1
    created = [m["created_at"] for m in live]
    return {"thread_id": tid, "messages": len(live), "by_role": by_role,
            "content_bytes": sum(len(m["content"].encode()) for m in live),
            "first_at": min(created, default=None), "last_at": max(created, default=None)}


async def test_stats_of_a_thread_without_messages(client: Client, ch: ClickHouseStore) -> None:
    acked = Acked()
    await put_thread(client, "empty", acked)
    await wait_for(lambda: has_rows(ch, acked))
    assert await body(await client.get("/v1/threads/empty/stats"), 200) == {
        "thread_id": "empty", "messages": 0, "by_role": {}, "content_bytes": 0,
        "first_at": None, "last_at": None}


# ---- degraded reads


async def evict(r: aioredis.Redis, settings: Settings, tid: str) -> None:
    s = keys.shard_of(tid, settings.redis.shards)
    await r.delete(keys.thread(s, tid), keys.messages(s, tid), keys.window(s, tid),
                   keys.cold(s, tid))


async def test_degraded_reads_come_from_clickhouse_with_postgres_stopped(
        client: Client, ch: ClickHouseStore, redis: aioredis.Redis, servers: Servers,
        settings: Settings) -> None:
    if servers.postgres is None:
        pytest.skip("needs the embedded PostgreSQL (an external one cannot be stopped)")
    acked = Acked()
    await put_thread(client, "dg", acked)
    mids = [acked.note("m", await append(client, "dg", f"m{i} ✓", metadata={"n": i}))[
        "message_id"] for i in range(25)]
    await edit(client, "dg", mids[3], acked, content="edited", metadata={"b": [1, 2]})
    await delete(client, "dg", mids[4], acked)
    await wait_for(lambda: has_rows(ch, acked), timeout_s=20)
    await wait_for(lambda: settled(redis), timeout_s=10)
    queries = ["", "?limit=10", "?before=11&limit=7", "?after=20", "?after=25"]
    expected = {q: await call(client, "GET", f"/v1/threads/dg/messages{q}", 200)
                for q in queries}
    thread = await call(client, "GET", "/v1/threads/dg", 200)
    message = await call(client, "GET", f"/v1/threads/dg/messages/{mids[3]}", 200)
    await evict(redis, settings, "dg")
    servers.postgres.stop()
    try:
        await assert_degraded(client, "/v1/threads/dg", thread)
        for q, page in expected.items():
            await assert_degraded(client, f"/v1/threads/dg/messages{q}", page)
        await assert_degraded(client, f"/v1/threads/dg/messages/{mids[3]}", message)
        await error(await client.get(f"/v1/threads/dg/messages/{mids[4]}"), 404, "not_found")
        await error(await client.get("/v1/threads/nope"), 404, "not_found")
        # read-only: nothing read from ClickHouse is cached, and writes that need
        # PostgreSQL fail instead of building on it
        resp = await client.post("/v1/threads/dg/messages", json={"role": "u", "content": "c"})
        await error(resp, 503, "unavailable")
        assert await redis.exists(keys.thread(keys.shard_of("dg", settings.redis.shards),
                                              "dg")) == 0
    finally:
        servers.postgres.start()


async def assert_degraded(client: Client, path: str, expected: Any) -> None:
    """The doc Redis served, but for `cseq`: ClickHouse's events carry no change number, so a
    degraded read says 0 (the changes feed itself is not served from ClickHouse)."""
    resp = await client.get(path)
    got = await body(resp, 200)
    assert _cseqs(got) <= {0}, path
    assert _without_cseq(got) == _without_cseq(expected), path
    assert resp.headers["X-Tier"] == "clickhouse", path
    assert float(resp.headers["X-Staleness-S"]) >= 0


async def test_degraded_message_reads_need_stored_content(ch: ClickHouseStore) -> None:
    await ClickHouseSink(ch, "test", False, Failpoints("")).write(
        [message_entry("nc", "m1", 1, 1, "secret")])
    assert await ClickHouseBacking(ch, True).load_message("nc", "m1") is not None
    with pytest.raises(Unavailable):
        await ClickHouseBacking(ch, False).load_message("nc", "m1")
    assert (await ch.thread_stats("nc") or {}).get("content_bytes") == len("secret")


# ---- sidecar subprocesses (each with its own chDB directory)


def sidecar(servers: Servers, data: Path, **env: str) -> Sidecar:
    return Sidecar(data, servers.redis_url, servers.postgres_url, clickhouse_url(data), **env)


async def stored_in(data: Path) -> tuple[set[str], int, int]:
    """Event ids visible with FINAL, raw and FINAL counts, read by another process (one
    chDB engine per process and directory; the sidecar must be stopped)."""
    url = clickhouse_url(data)
    ids = await asyncio.to_thread(clickhouse_query, url, FINAL_IDS)
    raw = await asyncio.to_thread(clickhouse_query, url, "SELECT count() FROM events")
    final = await asyncio.to_thread(clickhouse_query, url, "SELECT count() FROM events FINAL")
    return {r[0] for r in ids}, raw[0][0], final[0][0]


def api(sidecar: Sidecar) -> APIClient:
    """A client of the sidecar that sends each write once, so each outcome recorded is one
    send's (a repeated PUT would be a second version of the thread)."""
    return APIClient(sidecar.url, retry=NO_RETRY, timeout_s=5)


class Writer:
    """Records each write's outcome: ok (acknowledged), or unknown (no answer: the change
    may or may not have been made). An error answer is raised: none is expected."""

    def __init__(self) -> None:
        self.ok: set[str] = set()
        self.unknown: set[str] = set()

    async def write(self, kind: str, entity: str, write: Awaitable[Written]) -> None:
        try:
            written = await write
        except TransportError:
            self.unknown.add(f"{kind}:{entity}:1")  # only first versions are written here
        else:
            self.ok.add(f"{kind}:{entity}:{written.doc['version']}")


async def test_crash_after_insert_before_xack_then_restart_shows_each_change_once(
        servers: Servers, redis: aioredis.Redis, pg: asyncpg.Connection,
        tmp_path: Path) -> None:
    """The sidecar's worker dies (kill -9) right after its first ClickHouse insert, before XACK; the
    restarted one gets those entries back (XAUTOCLAIM of the dead consumer's PEL) and inserts
    them again. Whether the repeat is dropped at insert (same token: the claims came back as
    the same merged batch) or lands as duplicate rows (another composition), every change
    shows exactly once."""
    data = tmp_path / "crash"
    doomed = sidecar(servers, data, TIERPROXY_DEBUG_FAILPOINT="after-ch-insert-before-xack:crash",
                     TIERPROXY_CLICKHOUSE_INTERVAL_MS="2000")
    await asyncio.to_thread(doomed.start)
    writer = Writer()
    try:
        async with api(doomed) as c:
            for t in range(4):
                await writer.write("t", f"c{t}", c.put_thread(f"c{t}", title="x"))
            await asyncio.gather(*(
                writer.write("m", f"cm{i}", c.append(f"c{i % 4}", f"{i}", message_id=f"cm{i}"))
                for i in range(120)))
        assert not writer.unknown, "the writes must all be acknowledged before the crash"
        await wait_for(doomed.worker_killed, timeout_s=30, interval_s=0.05)
        await asyncio.to_thread(doomed.kill)
        again = sidecar(servers, data)
        await asyncio.to_thread(again.start)
        try:
            await wait_for(lambda: settled(redis), timeout_s=30)
        finally:
            await asyncio.to_thread(again.stop)
        ids, raw, final = await stored_in(data)
        assert ids == writer.ok, again.logs()
        assert final == len(writer.ok) and raw >= final
    finally:
        await asyncio.to_thread(doomed.kill)


async def test_kill_9_mid_stream_then_restart_shows_each_change_once(
        servers: Servers, redis: aioredis.Redis, pg: asyncpg.Connection,
        tmp_path: Path) -> None:
    data = tmp_path / "kill"
    first = sidecar(servers, data)
    await asyncio.to_thread(first.start)
    writer = Writer()
    try:
        async with api(first) as c:
            for t in range(8):
                await writer.write("t", f"k{t}", c.put_thread(f"k{t}", title="x"))
            load = asyncio.create_task(steady_load(writer, c, "a"))
            await wait_for(lambda: mid_stream(writer, redis), timeout_s=20)
            await asyncio.to_thread(first.kill)  # the load keeps going while it dies
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
        again = sidecar(servers, data)
        await asyncio.to_thread(again.start)
        try:
            async with api(again) as c:
                await steady_load(writer, c, "b", count=100)
            await wait_for(lambda: settled(redis), timeout_s=30)
        finally:
            await asyncio.to_thread(again.stop)
    finally:
        await asyncio.to_thread(first.kill)
    ids, raw, final = await stored_in(data)
    assert writer.ok <= ids, sorted(writer.ok - ids)[:10]
    assert ids - writer.ok <= writer.unknown, sorted(ids - writer.ok - writer.unknown)[:10]
    assert final == len(ids) and raw >= final
    assert len(writer.ok) >= 400


async def steady_load(writer: Writer, c: APIClient, tag: str, count: int = 100_000,
                      concurrency: int = 8) -> None:
    """Appends with our own ids (so an unanswered one is still known), 8 at a time."""
    async def worker(w: int) -> None:
        for i in range(w, count, concurrency):
            mid = f"{tag}{i}"
            await writer.write("m", mid, c.append(f"k{random.randrange(8)}", mid,
                                                  message_id=mid))

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


async def mid_stream(writer: Writer, r: aioredis.Redis) -> bool:
    """Some hundreds of changes acknowledged, and the ch group holds delivered entries it
    has not acknowledged yet (batches in flight)."""
    if len(writer.ok) < 300:
        return False
    pending = 0
    for s in range(4):
        pending += sum(g["pending"] for g in await r.xinfo_groups(keys.log(s))
                       if g["name"] == b"ch")
    return pending > 20


def test_the_latency_script_runs_end_to_end() -> None:
    """loadtests/clickhouse_latency.py, briefly (its own servers, sidecar and chDB)."""
    script = Path(__file__).resolve().parent.parent / "loadtests" / "clickhouse_latency.py"
    done = subprocess.run([sys.executable, str(script), "--rate", "100", "--duration", "2",
                           "--warmup", "0.5", "--batches", "1"], capture_output=True,
                          timeout=300)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()[-3000:]
    assert "ack→visible, every row" in out and "insert capacity" in out, out


def _without_cseq(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _without_cseq(v) for k, v in doc.items() if k != "cseq"}
    return [_without_cseq(v) for v in doc] if isinstance(doc, list) else doc


def _cseqs(doc: Any) -> set[Any]:
    if isinstance(doc, dict):
        own = {doc["cseq"]} if "cseq" in doc else set()
        return own.union(*(_cseqs(v) for v in doc.values()))
    return set().union(*(_cseqs(v) for v in doc)) if isinstance(doc, list) else set()
