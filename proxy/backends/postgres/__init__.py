"""PostgreSQL, the system of record: the schema, set-based idempotent upserts (the flusher's
sink), the point reads of read-through (the hot tier's backing) and write-through for
`X-Durability: persisted`. The only package that knows asyncpg:

    schema.py  the migrations        sql.py   the flush statements     rows.py  batches to stage
    store.py   the pool, the flush transaction (COPY, then upserts) and the point reads
    here       the sink (flusher) and the backing (read-through, write-through)

Concurrent identical misses share one query upstream (the hot tier's single-flight); here, an
open circuit answers at once instead of waiting on a dead database."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import orjson

from proxy import metrics
from proxy.backends import (
    PG,
    ChangeRow,
    MessageRow,
    StateRow,
    ThreadRow,
    message_row,
    state_row,
    thread_row,
)
from proxy.backends.postgres.schema import apply_migrations, migrate
from proxy.backends.postgres.store import SCHEMA_ERRORS, PostgresStore
from proxy.circuit import Circuit
from proxy.errors import BackingDown
from proxy.model import ERASED, Change

__all__ = ["SCHEMA_ERRORS", "PostgresBacking", "PostgresSink", "PostgresStore",
           "apply_migrations", "migrate"]
logger = logging.getLogger(__name__)
T = TypeVar("T")


class PostgresSink:
    """The flusher's view of PostgreSQL."""

    info = PG

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def write(self, changes: list[Change]) -> None:
        erased = [(c.thread_id, c.entity_id if c.kind == "m" else "") for c in changes
                  if c.event in ERASED]
        await self._store.upsert(((c.kind, c.doc, c.fingerprint) for c in changes), erased)


_KINDS = {"thread": "t", "message": "m", "state": "s", "marker": "r"}
# What means PostgreSQL cannot serve now: unreachable, starting or shutting down, a cancelled
# statement, out of connections, memory or disk.
DOWN = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
        asyncpg.OperatorInterventionError, asyncpg.InsufficientResourcesError)
# What a database answers before the worker's migrations have run (they run in the background,
# so an API process can be asked first): not serving yet either, but answering.
SCHEMA_PENDING = (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError)


class PostgresBacking:
    """backends.Backing on PostgreSQL: read-through and write-through."""

    tier = PG.tier

    def __init__(self, store: PostgresStore, circuit: Circuit) -> None:
        self._store = store
        self._circuit = circuit

    async def _query(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One query, unless the circuit is open (then 503 at once, no waiting on timeouts)."""
        if not self._circuit.allows():
            raise BackingDown("postgres is unavailable (circuit open)",
                              retry_after_s=max(1.0, self._circuit.wait_s()))
        metrics.READ_THROUGH.labels(self.tier).inc()
        try:
            result = await fn()
        except DOWN as e:
            self._circuit.failure()
            raise BackingDown(f"postgres: {e or type(e).__name__}") from e
        except SCHEMA_PENDING as e:
            raise BackingDown(f"postgres schema not applied yet: {e}") from e
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

    async def load_inbox(self, owner: str, before: tuple[int, str] | None,
                         limit: int) -> list[ThreadRow]:
        at = None if before is None else (_at(before[0]), before[1])
        rows = await self._query(lambda: self._store.fetch_inbox(owner, at, limit))
        return [thread_row(**{**r, "metadata": orjson.loads(r["metadata"])}) for r in rows]

    async def load_state(self, key: str) -> StateRow | None:
        r = await self._query(lambda: self._store.fetch_state(key))
        if r is None:
            return None
        value = orjson.loads(r["value"]) if r["value"] is not None else None
        return state_row(**{**r, "value": value})

    async def load_marker(self, tid: str, uid: str) -> int | None:
        return await self._query(lambda: self._store.fetch_marker(tid, uid))

    async def count_live(self, tid: str, lo: int, hi: int, exclude: list[str]) -> int:
        return await self._query(lambda: self._store.count_live(tid, lo, hi, exclude))

    async def persist(self, kind: str, doc: bytes, fingerprint: str = "",
                      erased: bool = False) -> None:
        """Write-through of one change, idempotent with its later flush (same version); an
        erasure's tombstone with its erasure, as the flush will do it."""
        d = orjson.loads(doc) if erased else {}
        scope = [(d["thread_id"], d.get("message_id", ""))] if erased else []
        await self._query(lambda: self._store.upsert([(_KINDS[kind], doc, fingerprint)], scope))

    async def load_changes(self, tid: str, after: int, limit: int) -> list[ChangeRow]:
        thread, rows = await self._query(lambda: self._store.fetch_changes(tid, after, limit))
        changes = [ChangeRow(m.mid, m.cseq, m.doc) for m in map(_message, rows)]
        if thread is not None:
            t = thread_row(**{**thread, "metadata": orjson.loads(thread["metadata"])})
            changes.append(ChangeRow("", thread["cseq"], t.doc))
        return sorted(changes, key=lambda c: c.cseq)[:limit]


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _message(r: dict[str, Any]) -> MessageRow:
    return message_row(**{**r, "metadata": orjson.loads(r["metadata"])})
