"""Degraded reads from ClickHouse's events (a read-only backing while PostgreSQL is down),
over ClickHouseStore or the worker answering for it (chDB is one process per directory)."""

from __future__ import annotations

from typing import Protocol

from proxy.backends import CH, ChangeRow, MessageRow, StateRow, ThreadRow
from proxy.errors import Unavailable


class EventReads(Protocol):
    """What degraded reads need: ClickHouseStore, or the worker answering for it (chDB)."""

    async def fetch_thread(self, tid: str) -> ThreadRow | None: ...
    async def fetch_messages(self, tid: str, lo: int, hi: int) -> list[MessageRow]: ...
    async def fetch_message(self, tid: str, mid: str) -> MessageRow | None: ...


class ClickHouseBacking:
    """Degraded reads (backends.Backing, read-only) when PostgreSQL cannot answer: what Redis
    does not hold is read from ClickHouse, possibly stale (by the age of the `ch` backlog),
    marked `X-Tier: clickhouse`. Each thread and message is rebuilt from its latest event
    (argMax by version).

    The hot tier never writes these rows back into Redis and never bases a write on them:
    ClickHouse may lag PostgreSQL, and a stale last_seq or message version cached in Redis
    would let the next append reuse a seq, or an edit lose to a newer version already in
    PostgreSQL. State entries are not served (they are not events the read path can rebuild),
    and nothing is persisted here."""

    tier = CH.tier

    def __init__(self, store: EventReads, store_content: bool) -> None:
        self._store = store
        self._store_content = store_content

    def _need_content(self) -> None:
        if not self._store_content:
            raise Unavailable("postgres is unavailable and clickhouse does not store message "
                              "text (clickhouse.store_content = false)")

    async def load_thread(self, tid: str) -> ThreadRow | None:
        return await self._store.fetch_thread(tid)

    async def load_messages(self, tid: str, lo: int, hi: int) -> list[MessageRow]:
        self._need_content()
        return await self._store.fetch_messages(tid, lo, hi)

    async def load_message(self, tid: str, mid: str) -> MessageRow | None:
        self._need_content()
        return await self._store.fetch_message(tid, mid)

    async def load_state(self, key: str) -> StateRow | None:
        raise Unavailable("postgres is unavailable; state entries are not served from clickhouse")

    async def load_inbox(self, owner: str, before: tuple[int, str] | None,
                         limit: int) -> list[ThreadRow]:
        raise Unavailable("postgres is unavailable; the inbox is not served from clickhouse")

    async def load_changes(self, tid: str, after: int, limit: int) -> list[ChangeRow]:
        raise Unavailable("postgres is unavailable; clickhouse keeps no change numbers")

    async def persist(self, kind: str, doc: bytes, fingerprint: str = "",
                      erased: bool = False) -> None:
        raise Unavailable("postgres is unavailable; clickhouse is read-only")

    async def load_marker(self, tid: str, uid: str) -> int | None:
        raise Unavailable("postgres is unavailable; read markers are not served from "
                          "clickhouse")

    async def count_live(self, tid: str, lo: int, hi: int, exclude: list[str]) -> int:
        raise Unavailable("postgres is unavailable; unread counts are not served from "
                          "clickhouse")
