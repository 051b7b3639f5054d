"""Read-through to PostgreSQL for what Redis no longer holds, and write-through for
`X-Durability: persisted`. Concurrent identical misses share one query (single-flight); an
open circuit answers at once instead of waiting on a dead database."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson

from proxy import metrics, model
from proxy.circuit import Circuit
from proxy.errors import Unavailable
from proxy.hot import MessageRow, StateRow, ThreadRow
from proxy.sinks.postgres import PostgresStore
from proxy.writelog import Entry

logger = logging.getLogger(__name__)
T = TypeVar("T")
_KINDS = {"thread": "t", "message": "m", "state": "s"}


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else model.iso_dt(dt)


def _ms(dt: datetime | None) -> int | None:
    return None if dt is None else int(dt.timestamp() * 1000 + 0.5)


def thread_row(r: dict[str, Any]) -> ThreadRow:
    doc = orjson.dumps({"version": r["version"], "created_at": _iso(r["created_at"]),
                        "thread_id": r["thread_id"], "title": r["title"],
                        "owner_id": r["owner_id"], "metadata": orjson.loads(r["metadata"]),
                        "updated_at": _iso(r["updated_at"]), "deleted": r["deleted"]})
    return ThreadRow(doc, r["version"], orjson.dumps(_iso(r["created_at"])).decode(),
                     r["last_seq"], r["deleted"])


def message_row(r: dict[str, Any]) -> MessageRow:
    metadata = orjson.loads(r["metadata"])
    doc = orjson.dumps({"seq": r["seq"], "version": r["version"], "message_id": r["message_id"],
                        "thread_id": r["thread_id"], "role": r["role"], "content": r["content"],
                        "metadata": metadata, "created_at": _iso(r["created_at"]),
                        "updated_at": _iso(r["updated_at"]), "deleted": r["deleted"]})
    fingerprint = model.MessageInput(None, r["role"], r["content"], metadata).fingerprint()
    return MessageRow(r["message_id"], r["seq"], r["version"], fingerprint, doc)


def state_row(r: dict[str, Any]) -> StateRow:
    value = orjson.loads(r["value"]) if r["value"] is not None else None
    doc = orjson.dumps({"version": r["version"], "key": r["key"], "value": value,
                        "expires_at": _iso(r["expires_at"]),
                        "updated_at": _iso(r["updated_at"]), "deleted": r["deleted"]})
    return StateRow(doc, r["version"], _ms(r["expires_at"]), r["deleted"])


class PostgresBacking:
    """hot.Backing on PostgreSQL."""

    tier = "postgres"

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
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError, asyncpg.CannotConnectNowError) as e:
            self._circuit.failure()
            raise Unavailable(f"postgres: {e or type(e).__name__}") from e
        self._circuit.success()
        return result

    async def load_thread(self, tid: str) -> ThreadRow | None:
        r = await self._query(lambda: self._store.fetch_thread(tid))
        return thread_row(r) if r else None

    async def load_messages(self, tid: str, lo: int, hi: int) -> list[MessageRow]:
        rows = await self._query(lambda: self._store.fetch_messages(tid, lo, hi))
        return [message_row(r) for r in rows]

    async def load_message(self, tid: str, mid: str) -> MessageRow | None:
        r = await self._query(lambda: self._store.fetch_message(tid, mid))
        return message_row(r) if r else None

    async def load_state(self, key: str) -> StateRow | None:
        r = await self._query(lambda: self._store.fetch_state(key))
        return state_row(r) if r else None

    async def persist(self, kind: str, doc: bytes) -> None:
        """Write-through of one change, idempotent with its later flush (same version)."""
        d = orjson.loads(doc)
        entity = {"thread": d.get("thread_id"), "message": d.get("message_id"),
                  "state": d.get("key")}[kind]
        entry = Entry(0, "", _KINDS[kind], entity, d.get("thread_id", entity), d["version"],
                      f"{kind}.persisted", model.now_ms(), doc)
        await self._query(lambda: self._store.upsert([entry]))
