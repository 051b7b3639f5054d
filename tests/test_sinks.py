"""One contract for every sink (proxy.backends.Sink), run against PostgresSink on the session's
PostgreSQL, ClickHouseSink on the session's chDB, and the in-memory sink the flusher tests use:

- a batch of thread, message and state changes is visible once; the same batch again adds
  nothing; an older version written after a newer one never becomes the latest;
- text round-trips exactly (emoji, quotes, backslashes, separators, look-alike syntax);
- a doc that is not one raises PoisonError and leaves nothing of its batch; an empty batch is
  fine.

What is "visible" depends on the sink's `info.coalesce`: an upsert sink (PostgreSQL) shows one
row per entity at its newest version; an event sink (ClickHouse) keeps one row per version, and
its latest is the highest version (argMax). Read back: the latest through each backend's own
read path (PostgresBacking.load_*, ClickHouseBacking.load_*; ClickHouse serves no state, so
state is read with argMax in SQL) and the visible versions with plain SQL (ClickHouse without
FINAL: a repeated batch must be dropped at insert by its token, not merely hidden)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import asyncpg
import orjson
import pytest

from proxy.backends import PoisonError, Sink
from proxy.backends.ch_backing import ClickHouseBacking
from proxy.backends.clickhouse import TABLE, ClickHouseSink, ClickHouseStore
from proxy.backends.postgres import PostgresBacking, PostgresSink, PostgresStore
from proxy.circuit import Circuit
from proxy.errors import BackingDown
from proxy.failpoints import Failpoints
from proxy.model import Change, new_id
from tests.conftest import Servers
from tests.memory_sink import MemorySink

STAMP = "2026-03-04T05:06:07.890Z"
FIELDS = {"t": ("title", "owner_id", "metadata", "version", "deleted"),
          "m": ("seq", "role", "content", "metadata", "version", "deleted"),
          "s": ("value", "version", "deleted"),
          "r": ("seq",)}  # a read marker (issue 12.2): its version is its seq
TRICKY = [
    'emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👋🏽 and "double" \'single\' `back` quotes',
    "back\\slash \\n is not a newline, \\u0000 is not a NUL, \\\\ two, trailing \\",
    "a real newline\nand\ttab\r\nand \x7f \x1b[31m escape",
    "separators \u2028 \u2029 \u0085 and a BOM \ufeff, zero width \u200b\u200d",
    "RTL עברית العربية \u202e reversed, combining e\u0301 vs \u00e9, Å vs A\u030a",
    "CJK 中文 日本語 한국어, astral 𝕏 𝄞 \U0010fffd",
    "syntax {\"a\": [1, 2]} '); DROP TABLE messages; -- {tid:String} %s %(x)s $1 ?",
]


class Backend(Protocol):
    sink: Sink

    async def versions(self, kind: str, tid: str, entity: str) -> list[int]:
        """Every visible stored version of the entity (a row per version)."""
        ...

    async def latest(self, kind: str, tid: str, entity: str) -> dict[str, Any] | None:
        """The entity's newest stored version, as the FIELDS of its doc."""
        ...


def fields(kind: str, doc: bytes) -> dict[str, Any]:
    d = orjson.loads(doc)
    return {k: d[k] for k in FIELDS[kind]}


class PostgresBackend:
    def __init__(self, store: PostgresStore, conn: asyncpg.Connection) -> None:
        self.sink = PostgresSink(store)
        self._backing = PostgresBacking(store, Circuit(3, 1.0))
        self._conn = conn

    async def versions(self, kind: str, tid: str, entity: str) -> list[int]:
        sql = {"t": "SELECT version FROM threads WHERE thread_id = $1 AND version > 0",
               "m": "SELECT version FROM messages WHERE thread_id = $2 AND message_id = $1",
               "s": "SELECT version FROM state_entries WHERE key = $1",
               "r": "SELECT seq FROM read_markers WHERE user_id = $1 AND thread_id = $2"}[kind]
        args = (entity, tid) if kind in "mr" else (entity,)
        return sorted(r[0] for r in await self._conn.fetch(sql, *args))

    async def latest(self, kind: str, tid: str, entity: str) -> dict[str, Any] | None:
        if kind == "r":
            seq = await self._backing.load_marker(tid, entity)
            return None if seq is None else {"seq": seq}
        if kind == "t":
            row: Any = await self._backing.load_thread(entity)
        elif kind == "m":
            row = await self._backing.load_message(tid, entity)
        else:
            row = await self._backing.load_state(entity)
        return fields(kind, row.doc) if row else None


_EVENT_PREFIX = {"t": "thread.", "m": "message.", "s": "state.", "r": "read."}
_CH_STATE = f"""
SELECT count() AS n, max(version) AS v, argMax(content, version) AS value,
       argMax(deleted, version) AS gone
FROM {TABLE} WHERE entity_id = {{key:String}} AND startsWith(event, 'state.')
"""


class ClickHouseBackend:
    def __init__(self, store: ClickHouseStore) -> None:
        self.sink = ClickHouseSink(store, "conformance", True, Failpoints(""))
        self._backing = ClickHouseBacking(store, store_content=True)
        self._store = store

    async def versions(self, kind: str, tid: str, entity: str) -> list[int]:
        rows = await self._store.query(
            f"SELECT version FROM {TABLE} WHERE entity_id = {{e:String}}"
            " AND thread_id = {t:String} AND startsWith(event, {p:String}) ORDER BY version",
            {"e": entity, "t": "" if kind == "s" else tid, "p": _EVENT_PREFIX[kind]})
        return [int(r["version"]) for r in rows]

    async def latest(self, kind: str, tid: str, entity: str) -> dict[str, Any] | None:
        if kind == "r":
            seqs = await self.versions(kind, tid, entity)
            return {"seq": max(seqs)} if seqs else None
        if kind == "s":
            r = (await self._store.query(_CH_STATE, {"key": entity}))[0]
            if not r["n"]:
                return None
            value = None if r["gone"] else orjson.loads(r["value"])
            return {"value": value, "version": int(r["v"]), "deleted": bool(r["gone"])}
        row: Any = (await self._backing.load_thread(entity) if kind == "t"
                    else await self._backing.load_message(tid, entity))
        return fields(kind, row.doc) if row else None


class MemoryBackend:
    def __init__(self) -> None:
        self.sink = self._memory = MemorySink("conformance")

    async def versions(self, kind: str, tid: str, entity: str) -> list[int]:
        return self._memory.versions((kind, tid, entity))

    async def latest(self, kind: str, tid: str, entity: str) -> dict[str, Any] | None:
        change = self._memory.latest((kind, tid, entity))
        return fields(kind, change.doc) if change else None


@pytest.fixture
async def postgres_backend(servers: Servers, pg: asyncpg.Connection,
                           ) -> AsyncIterator[PostgresBackend]:
    store = await PostgresStore.open(servers.postgres_url, 2, 10, Failpoints(""))
    try:
        yield PostgresBackend(store, pg)
    finally:
        await store.close()


@pytest.fixture
def clickhouse_backend(ch: ClickHouseStore) -> ClickHouseBackend:
    return ClickHouseBackend(ch)


@pytest.fixture
def memory_backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture(params=["postgres", "clickhouse", "memory"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test once per sink (only the servers a sink needs are started)."""
    found: Backend = request.getfixturevalue(f"{request.param}_backend")
    return found


@pytest.fixture
def uid() -> str:
    """Ids unique in the session: ClickHouse remembers the tokens of past inserts."""
    return new_id()


# ---- changes as the write scripts log them


def _change(kind: str, entity: str, tid: str, version: int, event: str,
            doc: dict[str, Any]) -> Change:
    return Change(0, f"1-{version}", kind, entity, tid, version, event, 1, orjson.dumps(doc))


def thread(tid: str, version: int, title: str = "T", metadata: Any = None,
           deleted: bool = False) -> Change:
    event = "thread.deleted" if deleted else "thread.created" if version == 1 else "thread.updated"
    return _change("t", tid, tid, version, event, {
        "version": version, "created_at": STAMP, "thread_id": tid, "title": title,
        "owner_id": "owner-1", "metadata": metadata or {}, "updated_at": STAMP,
        "deleted": deleted})


def message(tid: str, mid: str, seq: int, version: int, content: str = "hello",
            metadata: Any = None, deleted: bool = False) -> Change:
    event = "message.deleted" if deleted else (
        "message.created" if version == 1 else "message.updated")
    return _change("m", mid, tid, version, event, {
        "seq": seq, "version": version, "message_id": mid, "thread_id": tid, "role": "user",
        "content": content, "metadata": metadata or {}, "created_at": STAMP,
        "updated_at": STAMP, "deleted": deleted})


def state(key: str, version: int, value: Any, deleted: bool = False) -> Change:
    # A state entry is logged without `tid`: the log reader makes its thread id the key.
    return _change("s", key, key, version, "state.deleted" if deleted else "state.updated", {
        "version": version, "key": key, "value": None if deleted else value,
        "expires_at": None, "updated_at": STAMP, "deleted": deleted})


def marker(tid: str, uid: str, seq: int) -> Change:
    return _change("r", uid, tid, seq, "read.updated",
                   {"thread_id": tid, "user_id": uid, "seq": seq, "updated_at": STAMP})


def batch(uid: str, version: int = 1) -> list[Change]:
    tid = f"t-{uid}"
    return [thread(tid, version, title=f"title v{version}"),
            message(tid, f"m1-{uid}", 1, version, f"first v{version}", {"n": 1}),
            message(tid, f"m2-{uid}", 2, version, f"second v{version}"),
            state(f"k-{uid}", version, {"v": version, "list": [1, "two"]})]


async def latest_of(b: Backend, changes: list[Change]) -> list[dict[str, Any] | None]:
    return [await b.latest(c.kind, c.thread_id, c.entity_id) for c in changes]


async def versions_of(b: Backend, changes: list[Change]) -> list[list[int]]:
    return [await b.versions(c.kind, c.thread_id, c.entity_id) for c in changes]


# ---- the contract


async def test_a_batch_is_visible_once(backend: Backend, uid: str) -> None:
    changes = batch(uid)
    assert await latest_of(backend, changes) == [None] * 4
    await backend.sink.write(changes)
    assert await versions_of(backend, changes) == [[1]] * 4
    assert await latest_of(backend, changes) == [fields(c.kind, c.doc) for c in changes]


async def test_the_same_batch_again_adds_nothing(backend: Backend, uid: str) -> None:
    changes = batch(uid)
    await backend.sink.write(changes)
    await backend.sink.write(changes)  # a retry after a commit whose answer was lost
    await backend.sink.write(list(reversed(changes)))  # a redelivery in another order
    assert await versions_of(backend, changes) == [[1]] * 4
    assert await latest_of(backend, changes) == [fields(c.kind, c.doc) for c in changes]


async def test_an_older_version_after_a_newer_one_does_not_regress(backend: Backend,
                                                                   uid: str) -> None:
    newer, older = batch(uid, version=2), batch(uid, version=1)
    await backend.sink.write(newer)
    await backend.sink.write(older)  # a stale redelivery, claimed after the newer flush
    expected = [2] if backend.sink.info.coalesce else [1, 2]
    assert await versions_of(backend, newer) == [expected] * 4
    assert await latest_of(backend, newer) == [fields(c.kind, c.doc) for c in newer]


async def test_tombstones_are_the_latest_version(backend: Backend, uid: str) -> None:
    tid, key = f"t-{uid}", f"k-{uid}"
    live = [thread(tid, 1), message(tid, "m", 1, 1, "text"), state(key, 1, "value")]
    gone = [thread(tid, 2, deleted=True), message(tid, "m", 1, 2, "", deleted=True),
            state(key, 2, None, deleted=True)]
    await backend.sink.write(live)
    await backend.sink.write(gone)
    got = await latest_of(backend, gone)
    assert [g and (g["version"], g["deleted"]) for g in got] == [(2, True)] * 3
    assert got[1] and got[1]["content"] == ""
    assert got[2] and got[2]["value"] is None


async def test_message_ids_are_scoped_by_thread(backend: Backend, uid: str) -> None:
    """The API addresses /threads/{tid}/messages/{mid}: one mid in two threads is two
    messages (clients choose mids as idempotency keys, so "1" in many threads is common), and
    a state key named like a thread is not that thread. One change per batch, as a quiet
    sidecar flushes them."""
    a, b, mid = f"a-{uid}", f"b-{uid}", f"m-{uid}"
    changes = [message(a, mid, 1, 1, "in a"), message(b, mid, 1, 1, "in b"),
               thread(a, 1, title="thread a"), state(a, 1, "state a")]
    for c in changes:
        await backend.sink.write([c])
    assert await versions_of(backend, changes) == [[1]] * 4
    got = await latest_of(backend, changes)
    assert [g and g.get("content", g.get("title", g.get("value"))) for g in got] == [
        "in a", "in b", "thread a", "state a"]


async def test_text_round_trips_exactly(backend: Backend, uid: str) -> None:
    tid = f"t-{uid}"
    meta = {text: [text, {"nested " + text: text}] for text in TRICKY}
    changes = [thread(tid, 1, title=TRICKY[0] + TRICKY[1], metadata=meta),
               *(message(tid, f"m{i}-{uid}", i + 1, 1, text, {"text": text})
                 for i, text in enumerate(TRICKY)),
               state(f"k-{uid}", 1, {"texts": TRICKY, "keyed": meta})]
    await backend.sink.write(changes)
    got = await latest_of(backend, changes)
    want = [fields(c.kind, c.doc) for c in changes]
    for g, w in zip(got, want, strict=True):
        assert g == w
    contents = [g["content"].encode() for g in got[1:-1] if g]
    assert contents == [text.encode() for text in TRICKY]  # byte for byte, in UTF-8


def _not_a_doc(kind: str, doc: bytes, uid: str) -> Change:
    return Change(0, "1-1", kind, f"bad-{uid}", f"t-{uid}", 1, "message.created", 1, doc)


@pytest.mark.parametrize("kind,doc", [
    ("m", b"not json"),
    ("m", b'{"seq": 1, "version": 1, "message_id": "m"'),  # cut short
    ("m", b"[]"),
    ("t", b'"a string"'),
    ("s", b"null"),
    ("m", b"{}"),
    ("t", b'{"version": 1}'),
    ("x", orjson.dumps({"version": 1, "thread_id": "t", "key": "k", "message_id": "m"})),
])
async def test_a_doc_that_is_not_one_is_poison(backend: Backend, uid: str, kind: str,
                                               doc: bytes) -> None:
    bad = _not_a_doc(kind, doc, uid)
    with pytest.raises(PoisonError):
        await backend.sink.write([bad])
    good = batch(uid)
    with pytest.raises(PoisonError):  # a poison change fails its whole batch ...
        await backend.sink.write([*good[:2], bad, *good[2:]])
    assert await latest_of(backend, good) == [None] * 4  # ... and leaves nothing of it
    await backend.sink.write(good)  # the sink itself is fine
    assert await versions_of(backend, good) == [[1]] * 4


async def test_an_empty_batch_is_fine(backend: Backend, uid: str) -> None:
    await backend.sink.write([])
    changes = batch(uid)
    await backend.sink.write(changes)
    await backend.sink.write([])
    assert await versions_of(backend, changes) == [[1]] * 4


async def test_a_read_marker_keeps_its_highest_seq(backend: Backend, uid: str) -> None:
    """A marker's version is its seq: an upsert keeps the highest (a stale redelivery never
    moves it back), an event sink keeps every move once; markers are per thread and user."""
    tid = f"t-{uid}"
    for seq in (2, 5, 3, 5):  # 3: stale, claimed after the newer flush; then 5 replayed
        await backend.sink.write([marker(tid, "u1", seq)])
    await backend.sink.write([marker(f"o-{uid}", "u1", 1), marker(tid, "u2", 1)])
    expected = [5] if backend.sink.info.coalesce else [2, 3, 5]
    assert await backend.versions("r", tid, "u1") == expected
    assert await backend.latest("r", tid, "u1") == {"seq": 5}
    assert await backend.latest("r", tid, "u2") == {"seq": 1}
    assert await backend.latest("r", tid, "u3") is None


async def test_a_read_through_before_the_schema_exists_is_unavailable(servers: Servers) -> None:
    """The worker applies the migrations in the background, so an API process can be asked
    for a row before the tables exist (a fresh database): that is PostgreSQL not serving yet,
    a 503 the client retries, not a 500."""
    name = f"pending_{new_id()[-12:].lower()}"
    admin = await asyncpg.connect(servers.postgres_url)
    await admin.execute(f"CREATE DATABASE {name}")
    store = await PostgresStore.open(servers.postgres_url.rsplit("/", 1)[0] + f"/{name}", 2,
                                     5.0, Failpoints(""))
    backing = PostgresBacking(store, Circuit(3, 1.0))
    try:
        with pytest.raises(BackingDown, match="schema"):
            await backing.load_thread("t-1")
    finally:
        await store.close()
        await admin.execute(f"DROP DATABASE {name}")
        await admin.close()
