"""The PostgreSQL flush stages each batch (binary COPY of the docs into a temporary table of the
connection, then one INSERT ... SELECT per table). What that path must keep:

- equal versions with other content in a large mixed batch are counted per table and logged,
  the stored content kept, everything else of the batch written;
- the staging table holds one transaction's batch only: after a commit, a failed COPY, a
  refused row or a failure before the commit, the next batch on the same connection writes
  its own rows and nothing else;
- a poison row in a batch read from the log goes alone to dead letters; the rest lands."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from proxy import keys, metrics
from proxy.backends import PoisonError
from proxy.backends.postgres import PostgresSink, PostgresStore
from proxy.failpoints import FailpointHit, Failpoints
from proxy.model import Change, new_id
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import body, wait_for

STAMP = "2026-05-06T07:08:09.010Z"


def thread(tid: str, version: int, title: str = "t", deleted: bool = False,
           cseq: int = 0) -> Change:
    doc = {"version": version, "created_at": STAMP, "thread_id": tid, "title": title,
           "owner_id": "o", "metadata": {"a": 1}, "updated_at": STAMP, "deleted": deleted,
           "cseq": cseq}
    return Change(0, "0-1", "t", tid, tid, version, "thread.test", 0, orjson.dumps(doc))


def message(tid: str, mid: str, seq: int, version: int = 1, content: str = "",
            deleted: bool = False, cseq: int = 0) -> Change:
    doc = {"seq": seq, "version": version, "message_id": mid, "thread_id": tid, "role": "user",
           "content": content or f"{mid} v{version}", "metadata": {"n": seq},
           "created_at": STAMP, "updated_at": STAMP, "deleted": deleted, "cseq": cseq}
    return Change(0, "0-1", "m", mid, tid, version, "message.test", 0, orjson.dumps(doc),
                  fingerprint=f"fp-{mid}")


def state(key: str, version: int, value: Any) -> Change:
    doc = {"version": version, "key": key, "value": value, "expires_at": None,
           "updated_at": STAMP, "deleted": False}
    return Change(0, "0-1", "s", key, key, version, "state.test", 0, orjson.dumps(doc))


def conflicts(table: str) -> float:
    return metrics.VERSION_CONFLICTS.labels(table)._value.get()  # type: ignore[no-any-return]


@pytest.fixture
async def sink(servers: Servers, pg: asyncpg.Connection) -> AsyncIterator[PostgresSink]:
    """A sink on a pool of one connection: every batch reuses the same staging table."""
    store = await PostgresStore.open(servers.postgres_url, 1, 30, Failpoints(""))
    yield PostgresSink(store)
    await store.close()


async def test_equal_versions_with_other_content_are_counted_in_a_large_batch(
        sink: PostgresSink, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    tid, key = f"c-{new_id()}", f"k-{new_id()}"
    first = [thread(tid, 1), *(message(tid, f"m{i}", i + 1) for i in range(2000)),
             state(key, 1, {"v": 1})]
    await sink.write(first)
    before = {t: conflicts(t) for t in ("threads", "messages", "state_entries")}
    replay = [thread(tid, 1, title="other"), *first[1:],  # all the same, but two
              message(tid, "m2000", 2001)]
    replay[6] = message(tid, "m5", 6, content="other")
    with caplog.at_level(logging.ERROR, "proxy.backends.postgres.store"):
        await sink.write(replay)
    assert {t: conflicts(t) - before[t] for t in before} == {
        "threads": 1, "messages": 1, "state_entries": 0}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"[{tid!r}]" in logged and f"{tid}/m5" in logged
    assert await pg.fetchval("SELECT title FROM threads WHERE thread_id = $1", tid) == "t"
    assert await pg.fetchval("SELECT content FROM messages WHERE thread_id = $1"
                             " AND message_id = 'm5'", tid) == "m5 v1"
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", tid) == 2001
    assert await pg.fetchval("SELECT last_seq FROM threads WHERE thread_id = $1", tid) == 2001


async def test_a_live_version_above_a_tombstone_is_counted_and_not_written(
        sink: PostgresSink, pg: asyncpg.Connection) -> None:
    """A tombstone is final (the API never revives one): an edit Redis acknowledged before
    an erase written through PostgreSQL while it was down, flushed after it at a higher
    version, must not bring the content back (tests/test_failover_erase.py)."""
    tid = f"d-{new_id()}"
    await sink.write([thread(tid, 2, title="", deleted=True),
                      message(tid, "m1", 1, 2, content="-", deleted=True)])
    before = {t: conflicts(t) for t in ("threads", "messages")}
    await sink.write([thread(tid, 3, title="secret"), message(tid, "m1", 1, 3, "secret")])
    assert {t: conflicts(t) - before[t] for t in before} == {"threads": 1, "messages": 1}
    assert await pg.fetchval("SELECT count(*) FROM messages m JOIN threads t USING (thread_id)"
                             " WHERE thread_id = $1 AND m.version = 2 AND m.deleted"
                             " AND t.version = 2 AND t.deleted", tid) == 1
    await sink.write([message(tid, "m1", 1, 4, content="-", deleted=True)])  # an erase again
    assert await pg.fetchval("SELECT version FROM messages WHERE thread_id = $1", tid) == 4


async def test_a_change_number_postgres_gave_another_change_moves_to_the_end(
        sink: PostgresSink, pg: asyncpg.Connection) -> None:
    """While Redis was down, write-through gave the next change numbers (cseq) of a thread to
    its changes in PostgreSQL; changes Redis had acknowledged and not flushed hold the same
    numbers. The changes feed reads one entry per number: each such change gets the next
    number after the thread's highest (the nemesis in write-through mode found duplicates)."""
    tid = f"q-{new_id()}"
    await sink.write([thread(tid, 1, cseq=1), message(tid, "m1", 1, cseq=2),
                      message(tid, "m2", 2, cseq=3)])
    await sink.write([thread(tid, 2, title="through", cseq=4),  # written through
                      message(tid, "m3", 3, cseq=5)])
    # Redis's unflushed: m1's edit at 4 (the thread's), the thread's change at 5 (m3's), and
    # m2's edit at 6 (nobody's), plus a replay of m3 (its own number: stays).
    await sink.write([message(tid, "m1", 1, 2, cseq=4), thread(tid, 3, title="r", cseq=5),
                      message(tid, "m2", 2, 2, cseq=6), message(tid, "m3", 3, cseq=5)])
    rows = await pg.fetch("SELECT message_id, cseq FROM messages WHERE thread_id = $1"
                          " ORDER BY message_id", tid)
    assert {r["message_id"]: r["cseq"] for r in rows} == {"m1": 7, "m2": 6, "m3": 5}
    assert tuple(await pg.fetchrow("SELECT cseq, last_cseq, version FROM threads"
                                   " WHERE thread_id = $1", tid)) == (8, 8, 3)


async def test_the_staging_table_holds_one_transaction_only(
        servers: Servers, pg: asyncpg.Connection) -> None:
    tid = f"s-{new_id()}"
    store = await PostgresStore.open(servers.postgres_url, 1, 30, Failpoints(""))
    failing = await PostgresStore.open(servers.postgres_url, 1, 30,
                                       Failpoints("before-pg-commit:raise"))
    try:
        sink = PostgresSink(store)
        await sink.write([message(tid, "a", 1)])
        await pg.execute("DELETE FROM messages WHERE thread_id = $1", tid)  # gone for good
        with pytest.raises(PoisonError):  # refused by COPY (not JSON)
            await sink.write([message(tid, "b", 2), _raw("m", b"not json")])
        with pytest.raises(PoisonError):  # refused by the upsert (seq 3 twice)
            await sink.write([message(tid, "c", 3), message(tid, "d", 3)])
        with pytest.raises(FailpointHit):  # fails before the commit
            await PostgresSink(failing).write([message(tid, "e", 5)])
        await sink.write([message(tid, "f", 6)])
    finally:
        await store.close()
        await failing.close()
    rows = await pg.fetch("SELECT message_id FROM messages WHERE thread_id = $1", tid)
    assert [r["message_id"] for r in rows] == ["f"]


def _raw(kind: str, doc: bytes) -> Change:
    return Change(0, "0-1", kind, "raw", "raw", 1, "test", 0, doc)


async def test_a_poison_row_goes_alone_to_dead_letters(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis,
        pg: asyncpg.Connection, poison: None) -> None:
    """Entries already in the log when the flusher starts: it reads them as one batch."""
    s = make_settings(servers, flush={"sinks": "pg"})
    tid = f"p-{new_id()}"
    log = keys.log(keys.shard_of(tid, s.redis.shards))
    for i in range(300):
        m = message(tid, f"m{i}", i + 1, content="poison" if i == 123 else "")
        await redis.xadd(log, {"k": "m", "id": m.entity_id, "tid": tid, "v": "1",
                               "e": "message.created", "ts": "0", "d": m.doc})
    client = await client_for(s)

    async def flushed() -> bool:
        n = await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", tid)
        status = await body(await client.get("/v1/status"), 200)
        return bool(n == 299 and status["sinks"]["pg"]["dead_letters"] == 1)

    await wait_for(flushed, timeout_s=20)
    dead = await redis.xrange(keys.dead_letters(keys.shard_of(tid, s.redis.shards)))
    assert len(dead) == 1 and b"poison" in dead[0][1][b"error"]
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1"
                             " AND message_id = 'm123'", tid) == 0
    assert await pg.fetchval("SELECT last_seq FROM threads WHERE thread_id = $1", tid) == 300
