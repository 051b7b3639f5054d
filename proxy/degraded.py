"""Degraded reads: when PostgreSQL cannot answer, what Redis does not hold is read from
ClickHouse, read-only and possibly stale (by the age of the `ch` backlog), marked
`X-Tier: clickhouse`.

Each thread and message is rebuilt from its latest event (argMax by version). The hot tier
never writes these rows back into Redis and never bases a write on them: ClickHouse may lag
PostgreSQL, and a stale last_seq or message version cached in Redis would let the next append
reuse a seq, or an edit lose to a newer version already in PostgreSQL.
"""

from __future__ import annotations

from proxy.errors import Unavailable
from proxy.fallback import message_row, thread_row
from proxy.hot import MessageRow, StateRow, ThreadRow
from proxy.sinks.clickhouse import ClickHouseStore


class ClickHouseBacking:
    """hot.Backing for reads only: threads and messages (state entries are not events the
    read path can rebuild, and nothing is persisted here)."""

    tier = "clickhouse"

    def __init__(self, store: ClickHouseStore, store_content: bool) -> None:
        self._store = store
        self._store_content = store_content

    def _need_content(self) -> None:
        if not self._store_content:
            raise Unavailable("postgres is unavailable and clickhouse does not store message "
                              "text (clickhouse.store_content = false)")

    async def load_thread(self, tid: str) -> ThreadRow | None:
        r = await self._store.fetch_thread(tid)
        return thread_row(r) if r else None

    async def load_messages(self, tid: str, lo: int, hi: int) -> list[MessageRow]:
        self._need_content()
        return [message_row(r) for r in await self._store.fetch_messages(tid, lo, hi)]

    async def load_message(self, tid: str, mid: str) -> MessageRow | None:
        self._need_content()
        r = await self._store.fetch_message(tid, mid)
        return message_row(r) if r else None

    async def load_state(self, key: str) -> StateRow | None:
        raise Unavailable("postgres is unavailable; state entries are not served from clickhouse")

    async def persist(self, kind: str, doc: bytes) -> None:
        raise Unavailable("postgres is unavailable; clickhouse is read-only")
