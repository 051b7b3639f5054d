"""PostgresStore: the pool, the batch upserts (the flush transaction) and the point reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

import asyncpg

from proxy import metrics
from proxy.backends import PoisonError
from proxy.backends.postgres.rows import Rows
from proxy.backends.postgres.schema import apply_migrations
from proxy.backends.postgres.sql import (
    CONFLICTS,
    CREATE_STAGE,
    ERASE,
    MOVE_TAKEN_CSEQ,
    RESEQUENCE,
    STAGE,
    UPSERT_MARKERS,
    UPSERT_MESSAGES,
    UPSERT_STATE,
    UPSERT_THREADS,
)
from proxy.failpoints import Failpoints

logger = logging.getLogger(__name__)

# What keeps the schema from being applied while PostgreSQL is down or starting (retried).
SCHEMA_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# What PostgreSQL answers to data it will not take (the row, not the database, is wrong).
DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
               asyncpg.ProgramLimitExceededError, asyncpg.UntranslatableCharacterError,
               asyncpg.CharacterNotInRepertoireError)


class PostgresStore:
    """The pool, the batch upserts and the point reads."""

    def __init__(self, pool: asyncpg.Pool, failpoints: Failpoints) -> None:
        self._pool = pool
        self._failpoints = failpoints

    @classmethod
    async def open(cls, url: str, pool_max: int, timeout_s: float,
                   failpoints: Failpoints) -> PostgresStore:
        """The pool is lazy (no connection at start), so a sidecar starts while PostgreSQL
        is down. Every connection gets its flush staging table once, when it opens."""
        pool = await asyncpg.create_pool(url, min_size=0, max_size=pool_max,
                                         command_timeout=timeout_s, timeout=timeout_s,
                                         init=_create_stage)
        return cls(pool, failpoints)

    async def close(self) -> None:
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction (write-through: its row locks last until the end)."""
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    async def ping(self, timeout_s: float) -> None:
        """One round trip (the monitor's probe: an idle flusher's circuit says nothing)."""
        await asyncio.wait_for(self._pool.fetchval("SELECT 1"), timeout_s)

    async def migrate(self) -> None:
        async with self._pool.acquire() as conn:
            await apply_migrations(conn)

    async def upsert(self, docs: Iterable[tuple[str, bytes, str]],
                     erased: list[tuple[str, str]] | None = None) -> None:
        """One transaction for the whole batch of (kind, doc, fingerprint), unique per
        entity: staged by one binary COPY, then one statement per table (sql.py); then the
        batch's erasures, (thread id, message id or '' for the whole thread)."""
        rows = Rows.of(docs)
        if not rows.records:
            return
        try:
            await self._transaction(rows, erased or [], resequence=False)
        except asyncpg.UniqueViolationError as e:
            if e.constraint_name != "messages_thread_seq":
                raise PoisonError(f"postgres rejected the data: {e}") from e
            try:  # a seq PostgreSQL gave another message: this one moves to the end
                await self._transaction(rows, erased or [], resequence=True)
            except DATA_ERRORS as again:
                raise PoisonError(f"postgres rejected the data: {again}") from again
            finally:  # after the commit: the monitor then raises Redis's counters past it
                metrics.REDIS_DATA_LOSS.labels("seq_taken").inc()
        except DATA_ERRORS as e:
            raise PoisonError(f"postgres rejected the data: {e}") from e

    async def _transaction(self, rows: Rows, erased: list[tuple[str, str]],
                           resequence: bool) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.copy_records_to_table(STAGE, records=rows.records)
            if resequence:
                moved = await conn.fetch(RESEQUENCE)
                logger.error("postgres already holds the seq of %d acknowledged messages (written "
                             "through while redis was down, or handed out again by a redis that "
                             "lost data): moved to the end of their threads: %s", len(moved),
                             [f"{r['tid']}/{r['mid']} -> seq {r['seq']}" for r in moved[:20]])
            if renumbered := await conn.fetch(MOVE_TAKEN_CSEQ):
                metrics.REDIS_DATA_LOSS.labels("cseq_taken").inc()
                logger.error("postgres already holds the change numbers of %d acknowledged "
                             "changes (written through while redis was down, or handed out "
                             "again by a redis that lost data): renumbered after their "
                             "threads' last: %s", len(renumbered),
                             [f"{r[0]}/{r[1]} -> cseq {r[2]}" for r in renumbered[:20]])
            await self._write(conn, rows)
            if erased:
                await conn.execute(ERASE, [t for t, _ in erased], [m for _, m in erased])
            await self._failpoints.hit("before-pg-commit")

    @classmethod
    async def _write(cls, conn: asyncpg.Connection, rows: Rows) -> None:
        """Upsert the staged rows of each kind (statements prepared once per connection: the
        driver's statement cache)."""
        for kind, table, sql in (("t", "threads", UPSERT_THREADS),
                                 ("m", "messages", UPSERT_MESSAGES),
                                 ("s", "state_entries", UPSERT_STATE),
                                 ("r", "read_markers", UPSERT_MARKERS)):
            staged = rows.counts[kind]
            # Fewer written: replays, or conflicts (a marker at an equal seq is a replay).
            if staged and await conn.fetchval(sql) < staged and table in CONFLICTS:
                await cls._count_conflicts(conn, table)

    @staticmethod
    async def _count_conflicts(conn: asyncpg.Connection, table: str) -> None:
        ids = [r[0] for r in await conn.fetch(CONFLICTS[table])]
        if ids:
            metrics.VERSION_CONFLICTS.labels(table).inc(len(ids))
            metrics.REDIS_DATA_LOSS.labels("version_taken").inc()
            logger.error("postgres %s: %d rows arrived at a version already stored with other "
                         "content, or above a tombstone (kept what was stored): %s", table,
                         len(ids), ids[:20])

    async def fetch_thread(self, tid: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(
            "SELECT thread_id, title, owner_id, metadata::text AS metadata, created_at,"
            " updated_at, version, last_seq, deleted, last_activity_at, cseq, last_cseq"
            " FROM threads"
            " WHERE thread_id = $1 AND version > 0", tid)
        return dict(row) if row else None

    async def fetch_inbox(self, owner: str, before: tuple[datetime, str] | None,
                          limit: int) -> list[dict[str, Any]]:
        """An owner's live threads below `before` (last activity, tid), newest first: one
        range of the threads_inbox index."""
        where = "" if before is None else " AND (last_activity_at, thread_id) < ($3, $4)"
        rows = await self._pool.fetch(
            "SELECT thread_id, title, owner_id, metadata::text AS metadata, created_at,"
            " updated_at, version, last_seq, deleted, last_activity_at FROM threads"
            " WHERE owner_id = $1 AND NOT deleted AND version > 0" + where +
            " ORDER BY last_activity_at DESC, thread_id DESC LIMIT $2",
            owner, limit, *(before or ()))
        return [dict(r) for r in rows]

    async def fetch_messages(self, tid: str, lo: int, hi: int) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(
            "SELECT message_id, thread_id, seq, role, content, metadata::text AS metadata,"
            " created_at, updated_at, version, deleted, fingerprint, cseq FROM messages"
            " WHERE thread_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq", tid, lo, hi)
        return [dict(r) for r in rows]

    async def fetch_message(self, tid: str, mid: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(
            "SELECT message_id, thread_id, seq, role, content, metadata::text AS metadata,"
            " created_at, updated_at, version, deleted, fingerprint, cseq FROM messages"
            " WHERE thread_id = $1 AND message_id = $2", tid, mid)
        return dict(row) if row else None

    async def fetch_changes(self, tid: str, after: int, limit: int
                            ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The thread if its own cseq is after `after`, and its messages whose cseq is, by
        cseq, at most `limit` (the index on (thread_id, cseq)), read in one snapshot."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                  readonly=True):
            thread = await conn.fetchrow(
                "SELECT thread_id, title, owner_id, metadata::text AS metadata, created_at,"
                " updated_at, version, last_seq, deleted, cseq, last_cseq FROM threads"
                " WHERE thread_id = $1 AND version > 0 AND cseq > $2", tid, after)
            rows = await conn.fetch(
                "SELECT message_id, thread_id, seq, role, content, metadata::text AS metadata,"
                " created_at, updated_at, version, deleted, fingerprint, cseq FROM messages"
                " WHERE thread_id = $1 AND cseq > $2 ORDER BY cseq LIMIT $3", tid, after, limit)
        return (dict(thread) if thread else None), [dict(r) for r in rows]

    async def fetch_state(self, key: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(
            "SELECT key, value::text AS value, version, expires_at, updated_at, deleted"
            " FROM state_entries WHERE key = $1", key)
        return dict(row) if row else None

    async def fetch_marker(self, tid: str, uid: str) -> int | None:
        seq: int | None = await self._pool.fetchval(
            "SELECT seq FROM read_markers WHERE thread_id = $1 AND user_id = $2", tid, uid)
        return seq

    async def count_live(self, tid: str, lo: int, hi: int, exclude: list[str]) -> int:
        """Live messages of seqs lo..hi, but those in `exclude` (by the unique index on
        thread_id, seq)."""
        n: int = await self._pool.fetchval(
            "SELECT count(*) FROM messages WHERE thread_id = $1 AND seq BETWEEN $2 AND $3"
            " AND NOT deleted AND message_id <> ALL($4::text[])", tid, lo, hi, exclude)
        return n

    async def fetch_counters(self, tids: list[str], keys_: list[str],
                             mids: list[tuple[str, str]]) -> dict[str, Any]:
        """Versions and last seqs, for raising Redis's counters after it lost data: threads
        {tid: (version, last_seq, last_cseq)}, state {key: version}, messages
        {tid: [(mid, version)]}."""
        async with self._pool.acquire() as conn:
            threads = await conn.fetch("SELECT thread_id, version, last_seq, last_cseq"
                                       " FROM threads WHERE thread_id = ANY($1)", tids)
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
        return {"threads": {r["thread_id"]: (r["version"], r["last_seq"], r["last_cseq"])
                            for r in threads},
                "state": {r["key"]: r["version"] for r in state}, "messages": by_thread}

    async def fetch_markers(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The seqs of these (thread, user) read markers that PostgreSQL holds."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT r.thread_id, r.user_id, r.seq FROM read_markers r JOIN"
                " unnest($1::text[], $2::text[]) AS x(tid, uid)"
                " ON r.thread_id = x.tid AND r.user_id = x.uid",
                [t for t, _ in pairs], [u for _, u in pairs])
        return {(r["thread_id"], r["user_id"]): r["seq"] for r in rows}


async def _create_stage(conn: asyncpg.Connection) -> None:
    await conn.execute(CREATE_STAGE)
