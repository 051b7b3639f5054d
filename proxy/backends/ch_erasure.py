"""What must leave ClickHouse's events table: the content of erased messages and threads in
every stored version (issue 12.4), and events older than clickhouse.retention_days (a TTL).
Statements only; the client stays in clickhouse.py.

An erasure is an ALTER ... UPDATE mutation blanking content, metadata and title of every row
of the message (or of the whole thread), waited for (mutations_sync = 2: on every replica),
then confirmed by a count of the rows that still hold any: a count above zero fails the batch,
and the streamer retries it. Rows stay (a version's seq, role, length and deletion remain for
the statistics); the old parts a mutation replaced are removed by ClickHouse itself once
old_parts_lifetime passes (8 minutes by default)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from proxy.errors import Unavailable
from proxy.model import ERASED, Change

logger = logging.getLogger(__name__)
BLANK = "content = '', metadata = '{}', title = ''"
HOLDING = "(content != '' OR metadata != '{}' OR title != '')"
THREAD = "thread_id = {tid:String}"
MESSAGES = "thread_id = {tid:String} AND message_id IN {mids:Array(String)}"
Scope = tuple[str, dict[str, Any]]  # a WHERE clause and its parameters


class ErasureIncomplete(RuntimeError):
    """ClickHouse still holds content of an erased entity (or could not be asked): the
    batch is retried."""


class Statements(Protocol):
    """What an erasure needs of the store (ClickHouseStore)."""

    async def command(self, sql: str, params: dict[str, Any] | None = None,
                      settings: dict[str, Any] | None = None) -> None: ...
    async def query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]: ...


def scopes(changes: Sequence[Change]) -> list[Scope]:
    """One scope per erased thread, and one per other thread with erased messages."""
    threads = sorted({c.thread_id for c in changes if c.event in ERASED and c.kind == "t"})
    messages: dict[str, set[str]] = {}
    for c in changes:
        if c.event in ERASED and c.kind == "m" and c.thread_id not in threads:
            messages.setdefault(c.thread_id, set()).add(c.entity_id)
    return [(THREAD, {"tid": t}) for t in threads] + [
        (MESSAGES, {"tid": t, "mids": sorted(m)}) for t, m in sorted(messages.items())]


async def erase(store: Statements, table: str, changes: Sequence[Change]) -> None:
    """Blank every stored version of what the batch erases, and confirm it is gone."""
    for where, params in scopes(changes):
        try:
            await store.command(f"ALTER TABLE {table} UPDATE {BLANK} WHERE {where}", params,
                                settings={"mutations_sync": 2})
            rows = await store.query(f"SELECT count() AS r_left FROM {table} "
                                     f"WHERE {where} AND {HOLDING}", params)
        except Unavailable as e:  # the sink's failure: the streamer backs off and retries
            raise ErasureIncomplete(f"clickhouse erasure of {params}: {e}") from e
        if rows[0]["r_left"]:
            raise ErasureIncomplete(f"clickhouse still holds content of {params} in "
                                    f"{rows[0]['r_left']} rows after the erasure")
        logger.info("clickhouse: erased %s", params)


def ttl_clause(days: int) -> str:
    """The table's TTL as ClickHouse shows it in engine_full."""
    return f"TTL toDateTime(event_time) + toIntervalDay({days})"


async def keep_retention(store: Statements, table: str, days: int) -> None:
    """Give the table the TTL of clickhouse.retention_days (0: none), altering it only when
    it differs (a changed TTL rewrites the table's parts)."""
    rows = await store.query("SELECT engine_full AS r_engine FROM system.tables WHERE "
                             "database = currentDatabase() AND name = {table:String}",
                             {"table": table})
    engine = rows[0]["r_engine"] if rows else ""
    has_ttl = " TTL " in f" {engine} "
    if days and f"{ttl_clause(days)} " not in f"{engine} ":
        await store.command(f"ALTER TABLE {table} MODIFY TTL toDateTime(event_time) "
                            f"+ INTERVAL {int(days)} DAY")
        logger.info("clickhouse table %s: events expire after %d days", table, days)
    elif not days and has_ttl:
        await store.command(f"ALTER TABLE {table} REMOVE TTL")
        logger.info("clickhouse table %s: events no longer expire", table)
