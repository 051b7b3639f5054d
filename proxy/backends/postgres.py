"""PostgreSQL, the system of record: the schema, set-based idempotent upserts (the flusher's
sink), the point reads of read-through (the hot tier's backing) and write-through for
`X-Durability: persisted`. The only module that knows asyncpg.

Concurrent identical misses share one query upstream (the hot tier's single-flight); here, an
open circuit answers at once instead of waiting on a dead database."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson

from proxy import metrics
from proxy.backends import (
    PG,
    MessageRow,
    PoisonError,
    StateRow,
    ThreadRow,
    message_row,
    state_row,
    thread_row,
)
from proxy.circuit import Circuit
from proxy.errors import Unavailable
from proxy.failpoints import Failpoints
from proxy.model import Change

logger = logging.getLogger(__name__)
T = TypeVar("T")
LOCK_ID = 0x7469_6572  # advisory lock serialising migrations across sidecars ("tier")

MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS threads (
        thread_id text PRIMARY KEY,
        title text NOT NULL DEFAULT '',
        owner_id text NOT NULL DEFAULT '',
        metadata jsonb NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        version bigint NOT NULL,
        last_seq bigint NOT NULL DEFAULT 0,
        deleted boolean NOT NULL DEFAULT false
    );
    CREATE TABLE IF NOT EXISTS messages (
        message_id text NOT NULL,
        thread_id text NOT NULL,
        seq bigint NOT NULL,
        role text NOT NULL,
        content text NOT NULL,
        metadata jsonb NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        version bigint NOT NULL,
        deleted boolean NOT NULL DEFAULT false,
        PRIMARY KEY (thread_id, message_id),
        CONSTRAINT messages_thread_seq UNIQUE (thread_id, seq)
    );
    CREATE TABLE IF NOT EXISTS state_entries (
        key text PRIMARY KEY,
        value jsonb,
        version bigint NOT NULL,
        expires_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now(),
        deleted boolean NOT NULL DEFAULT false
    );
    """,
    # The fingerprint of the body a message was appended with, kept across edits: a retry of
    # the original append is recognized even after an edit (NULL: appended before this).
    "ALTER TABLE messages ADD COLUMN IF NOT EXISTS fingerprint text",
]

UPSERT_THREADS = """
INSERT INTO threads AS t (thread_id, title, owner_id, metadata, created_at, updated_at,
                          version, deleted)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]::jsonb[],
                     $5::timestamptz[], $6::timestamptz[], $7::bigint[], $8::bool[])
ON CONFLICT (thread_id) DO UPDATE SET
    title = excluded.title, owner_id = excluded.owner_id, metadata = excluded.metadata,
    created_at = excluded.created_at, updated_at = excluded.updated_at,
    version = excluded.version, deleted = excluded.deleted
WHERE excluded.version > t.version
"""

# A message's thread row may not be flushed yet: a version-0 placeholder holds last_seq and
# loses to the thread's first real version.
BUMP_LAST_SEQ = """
INSERT INTO threads AS t (thread_id, version, last_seq)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
ON CONFLICT (thread_id) DO UPDATE SET last_seq = excluded.last_seq
WHERE excluded.last_seq > t.last_seq
"""

# Message ids are scoped by thread, as in the API (/v1/threads/{tid}/messages/{mid}).
UPSERT_MESSAGES = """
INSERT INTO messages AS m (message_id, thread_id, seq, role, content, metadata, created_at,
                           updated_at, version, deleted, fingerprint)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                     $6::text[]::jsonb[], $7::timestamptz[], $8::timestamptz[], $9::bigint[],
                     $10::bool[], $11::text[])
ON CONFLICT (thread_id, message_id) DO UPDATE SET
    role = excluded.role, content = excluded.content, metadata = excluded.metadata,
    updated_at = excluded.updated_at, version = excluded.version, deleted = excluded.deleted,
    fingerprint = coalesce(m.fingerprint, excluded.fingerprint)
WHERE excluded.version > m.version
"""

UPSERT_STATE = """
INSERT INTO state_entries AS s (key, value, version, expires_at, updated_at, deleted)
SELECT * FROM unnest($1::text[], $2::text[]::jsonb[], $3::bigint[], $4::timestamptz[],
                     $5::timestamptz[], $6::bool[])
ON CONFLICT (key) DO UPDATE SET
    value = excluded.value, version = excluded.version, expires_at = excluded.expires_at,
    updated_at = excluded.updated_at, deleted = excluded.deleted
WHERE excluded.version > s.version
"""

# Rows a batch skipped because PostgreSQL already holds their version — with other content.
# A replay skips the same content; other content at an equal version means a version was
# handed out twice (a bug or a Redis that lost data): never silently dropped, counted.
CONFLICTS = {
    "threads": """
SELECT x.id FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]::jsonb[], $5::bigint[],
                        $6::bool[]) AS x(id, title, owner_id, metadata, version, deleted)
JOIN threads t ON t.thread_id = x.id AND t.version = x.version
WHERE (t.title, t.owner_id, t.metadata, t.deleted)
      IS DISTINCT FROM (x.title, x.owner_id, x.metadata, x.deleted)
""",
    "messages": """
SELECT x.tid || '/' || x.id FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                        $5::text[]::jsonb[], $6::bigint[], $7::bool[])
    AS x(id, tid, role, content, metadata, version, deleted)
JOIN messages m ON m.thread_id = x.tid AND m.message_id = x.id AND m.version = x.version
WHERE (m.role, m.content, m.metadata, m.deleted)
      IS DISTINCT FROM (x.role, x.content, x.metadata, x.deleted)
""",
    "state_entries": """
SELECT x.id FROM unnest($1::text[], $2::text[]::jsonb[], $3::bigint[], $4::bool[])
    AS x(id, value, version, deleted)
JOIN state_entries s ON s.key = x.id AND s.version = x.version
WHERE (s.value, s.deleted) IS DISTINCT FROM (x.value, x.deleted)
""",
}

# What keeps the schema from being applied while PostgreSQL is down or starting (retried).
SCHEMA_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
                asyncpg.ProgramLimitExceededError, asyncpg.UntranslatableCharacterError,
                asyncpg.CharacterNotInRepertoireError)


async def apply_migrations(conn: asyncpg.Connection) -> None:
    """Apply the schema idempotently, one sidecar at a time (advisory lock)."""
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_ID)
    try:
        for statement in MIGRATIONS:
            await conn.execute(statement)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_ID)
    logger.info("postgres schema is up to date (%d migrations)", len(MIGRATIONS))


async def migrate(url: str) -> None:
    """`tierproxy migrate`."""
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass
class Rows:
    """A batch split by table, as column arrays (one parameter per column: no limit on rows)."""

    threads: list[list[Any]]
    messages: list[list[Any]]
    last_seq: dict[str, int]
    state: list[list[Any]]

    @classmethod
    def of(cls, docs: Iterable[tuple[str, bytes, str]]) -> Rows:
        """From (kind, doc, fingerprint): kind 't' thread, 'm' message, 's' state; the doc
        carries the version; the fingerprint (messages) that of the appended body. Raises
        PoisonError on a doc that is not one."""
        rows = cls([[] for _ in range(8)], [[] for _ in range(11)], {}, [[] for _ in range(6)])
        try:
            for kind, doc, fingerprint in docs:
                rows._add(kind, orjson.loads(doc), fingerprint or None)
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise PoisonError(f"undecodable log entry: {err!r}") from err
        return rows

    def conflict_args(self, table: str) -> list[list[Any]]:
        """The CONFLICTS query's arrays (the compared columns of each row)."""
        if table == "threads":
            t = self.threads
            return [t[0], t[1], t[2], t[3], t[6], t[7]]
        if table == "messages":
            m = self.messages
            return [m[0], m[1], m[3], m[4], m[5], m[8], m[9]]
        s = self.state
        return [s[0], s[1], s[2], s[5]]

    def _add(self, kind: str, d: dict[str, Any], fingerprint: str | None) -> None:
        if kind == "t":
            values = [d["thread_id"], d["title"], d["owner_id"],
                      orjson.dumps(d["metadata"]).decode(), _ts(d["created_at"]),
                      _ts(d["updated_at"]), int(d["version"]), d["deleted"]]
            _append(self.threads, values)
        elif kind == "m":
            values = [d["message_id"], d["thread_id"], d["seq"], d["role"], d["content"],
                      orjson.dumps(d["metadata"]).decode(), _ts(d["created_at"]),
                      _ts(d["updated_at"]), int(d["version"]), d["deleted"], fingerprint]
            _append(self.messages, values)
            tid = d["thread_id"]
            self.last_seq[tid] = max(self.last_seq.get(tid, 0), d["seq"])
        elif kind == "s":
            value = None if d["deleted"] else orjson.dumps(d["value"]).decode()
            _append(self.state, [d["key"], value, int(d["version"]), _ts(d["expires_at"]),
                                 _ts(d["updated_at"]), d["deleted"]])
        else:
            raise ValueError(f"unknown entity kind {kind!r}")


def _append(columns: list[list[Any]], values: list[Any]) -> None:
    for column, value in zip(columns, values, strict=True):
        column.append(value)


class PostgresStore:
    """The pool, the batch upserts and the point reads."""

    def __init__(self, pool: asyncpg.Pool, failpoints: Failpoints) -> None:
        self._pool = pool
        self._failpoints = failpoints

    @classmethod
    async def open(cls, url: str, pool_max: int, timeout_s: float,
                   failpoints: Failpoints) -> PostgresStore:
        """The pool is lazy (no connection at start), so a sidecar starts while PostgreSQL
        is down."""
        pool = await asyncpg.create_pool(url, min_size=0, max_size=pool_max,
                                         command_timeout=timeout_s, timeout=timeout_s)
        return cls(pool, failpoints)

    async def close(self) -> None:
        await self._pool.close()

    async def migrate(self) -> None:
        async with self._pool.acquire() as conn:
            await apply_migrations(conn)

    async def upsert(self, docs: Iterable[tuple[str, bytes, str]]) -> None:
        """One transaction for the whole batch of (kind, doc, fingerprint); unique per
        entity."""
        rows = Rows.of(docs)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await self._write(conn, rows)
                await self._failpoints.hit("before-pg-commit")
        except asyncpg.UniqueViolationError as e:
            if e.constraint_name != "messages_thread_seq":
                raise PoisonError(f"postgres rejected the data: {e}") from e
            # A seq handed out twice: Redis went back to an older state (lost data).
            metrics.REDIS_DATA_LOSS.labels("seq_taken").inc()
            raise PoisonError(f"seq already taken in postgres (redis lost data; its counters "
                              f"are reconciled): {e}") from e
        except _DATA_ERRORS as e:
            raise PoisonError(f"postgres rejected the data: {e}") from e

    @classmethod
    async def _write(cls, conn: asyncpg.Connection, rows: Rows) -> None:
        for table, sql, columns in (("threads", UPSERT_THREADS, rows.threads),
                                    ("messages", UPSERT_MESSAGES, rows.messages),
                                    ("state_entries", UPSERT_STATE, rows.state)):
            if not columns[0]:
                continue
            written = int((await conn.execute(sql, *columns)).rsplit(" ", 1)[1])
            if written < len(columns[0]):  # some were there already: replays, or conflicts
                await cls._count_conflicts(conn, table, rows)
        if rows.last_seq:
            tids = sorted(rows.last_seq)
            await conn.execute(BUMP_LAST_SEQ, tids, [0] * len(tids),
                               [rows.last_seq[t] for t in tids])

    @staticmethod
    async def _count_conflicts(conn: asyncpg.Connection, table: str, rows: Rows) -> None:
        ids = [r[0] for r in await conn.fetch(CONFLICTS[table], *rows.conflict_args(table))]
        if ids:
            metrics.VERSION_CONFLICTS.labels(table).inc(len(ids))
            metrics.REDIS_DATA_LOSS.labels("version_taken").inc()
            logger.error("postgres %s: %d rows arrived at a version already stored with other "
                         "content (kept what was stored): %s", table, len(ids), ids[:20])

    async def fetch_thread(self, tid: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(
            "SELECT thread_id, title, owner_id, metadata::text AS metadata, created_at,"
            " updated_at, version, last_seq, deleted FROM threads"
            " WHERE thread_id = $1 AND version > 0", tid)
        return dict(row) if row else None

    async def fetch_messages(self, tid: str, lo: int, hi: int) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(
            "SELECT message_id, thread_id, seq, role, content, metadata::text AS metadata,"
            " created_at, updated_at, version, deleted, fingerprint FROM messages"
            " WHERE thread_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq", tid, lo, hi)
        return [dict(r) for r in rows]

    async def fetch_message(self, tid: str, mid: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(
            "SELECT message_id, thread_id, seq, role, content, metadata::text AS metadata,"
            " created_at, updated_at, version, deleted, fingerprint FROM messages"
            " WHERE thread_id = $1 AND message_id = $2", tid, mid)
        return dict(row) if row else None

    async def fetch_state(self, key: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(
            "SELECT key, value::text AS value, version, expires_at, updated_at, deleted"
            " FROM state_entries WHERE key = $1", key)
        return dict(row) if row else None


    async def fetch_counters(self, tids: list[str], keys_: list[str],
                             mids: list[tuple[str, str]]) -> dict[str, Any]:
        """Versions and last seqs, for raising Redis's counters after it lost data: threads
        {tid: (version, last_seq)}, state {key: version}, messages {tid: [(mid, version)]}."""
        async with self._pool.acquire() as conn:
            threads = await conn.fetch("SELECT thread_id, version, last_seq FROM threads"
                                       " WHERE thread_id = ANY($1)", tids)
            state = await conn.fetch("SELECT key, version FROM state_entries"
                                     " WHERE key = ANY($1)", keys_)
            messages = await conn.fetch(
                "SELECT m.thread_id, m.message_id, m.version FROM messages m JOIN"
                " unnest($1::text[], $2::text[]) AS x(tid, mid)"
                " ON m.thread_id = x.tid AND m.message_id = x.mid",
                [t for t, _ in mids], [m for _, m in mids])
        by_thread: dict[str, list[tuple[str, int]]] = {}
        for r in messages:
            by_thread.setdefault(r["thread_id"], []).append((r["message_id"], r["version"]))
        return {"threads": {r["thread_id"]: (r["version"], r["last_seq"]) for r in threads},
                "state": {r["key"]: r["version"] for r in state}, "messages": by_thread}


class PostgresSink:
    """The flusher's view of PostgreSQL."""

    info = PG

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def write(self, changes: list[Change]) -> None:
        await self._store.upsert((c.kind, c.doc, c.fingerprint) for c in changes)


_KINDS = {"thread": "t", "message": "m", "state": "s"}
_DOWN = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
         asyncpg.CannotConnectNowError)


class PostgresBacking:
    """backends.Backing on PostgreSQL: read-through and write-through."""

    tier = PG.tier

    def __init__(self, store: PostgresStore, circuit: Circuit) -> None:
        self._store = store
        self._circuit = circuit

    async def _query(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One query, unless the circuit is open (then 503 at once, no waiting on timeouts)."""
        if not self._circuit.allows():
            raise Unavailable("postgres is unavailable (circuit open)",
                              retry_after_s=max(1.0, self._circuit.wait_s()))
        metrics.READ_THROUGH.labels(self.tier).inc()
        try:
            result = await fn()
        except _DOWN as e:
            self._circuit.failure()
            raise Unavailable(f"postgres: {e or type(e).__name__}") from e
        self._circuit.success()
        return result

    async def load_thread(self, tid: str) -> ThreadRow | None:
        r = await self._query(lambda: self._store.fetch_thread(tid))
        if r is None:
            return None
        return thread_row(**{**r, "metadata": orjson.loads(r["metadata"])})

    async def load_messages(self, tid: str, lo: int, hi: int) -> list[MessageRow]:
        rows = await self._query(lambda: self._store.fetch_messages(tid, lo, hi))
        return [_message(r) for r in rows]

    async def load_message(self, tid: str, mid: str) -> MessageRow | None:
        r = await self._query(lambda: self._store.fetch_message(tid, mid))
        return _message(r) if r else None

    async def load_state(self, key: str) -> StateRow | None:
        r = await self._query(lambda: self._store.fetch_state(key))
        if r is None:
            return None
        value = orjson.loads(r["value"]) if r["value"] is not None else None
        return state_row(**{**r, "value": value})

    async def persist(self, kind: str, doc: bytes, fingerprint: str = "") -> None:
        """Write-through of one change, idempotent with its later flush (same version)."""
        await self._query(lambda: self._store.upsert([(_KINDS[kind], doc, fingerprint)]))


def _message(r: dict[str, Any]) -> MessageRow:
    return message_row(**{**r, "metadata": orjson.loads(r["metadata"])})
