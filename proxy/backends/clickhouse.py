"""ClickHouse, the analytics tier: the `events` table, bulk columnar inserts that are visible
exactly once despite retries (the streamer's sink), and the reads behind /stats and degraded
reads (served by ch_backing.py while PostgreSQL is down). The only module that knows
clickhouse-connect.

One client per store, over `http(s)://` (a ClickHouse server) or `chdb://DIR` (embedded). The
async client does not support chDB, so the sync client runs on the store's own single worker
thread for both transports: calls are serialized (chDB is one engine per process; a process-wide
lock also serializes the stores of in-process test sidecars) and never take threads from the
default executor.

Exactly once, in two layers (FAULTS.md: dedup is off by default on non-replicated tables, and a
Replacing engine only deduplicates on merge):

1. An insert deduplication token per batch, the SHA-256 of the batch's sorted event ids, with
   `non_replicated_deduplication_window = 1000` (the last 1000 insert blocks are remembered:
   with one insert per second per sidecar, minutes even for dozens of sidecars, while a retry
   comes within seconds and a claim after claim_idle_ms). A batch retried after an insert that
   failed or timed out but did commit (the flusher retries the very same batch), or redelivered
   in the same composition (the sidecar died after the insert and before XACK, and the claims
   of its PEL come back as one batch), carries the same token and ClickHouse drops the repeat.
   Rows are sorted before the insert so the same set always makes the same blocks, and the
   insert is synchronous (chDB defaults to async_insert, which would skip the token).
2. ReplacingMergeTree(version) whose sorting key ends with the event id (`kind:entity_id:version`,
   one row per entity version): a redelivery in another composition (the shards' claims merged
   differently, a partial claim, a per-entry retry after poison) gets another token and lands
   as a duplicate row, which merges away and never shows in reads: counts use FINAL, per-entity
   reads use argMax(..., version), which a duplicate cannot change. Duplicates always share a
   partition (event_time comes from the doc), so FINAL and merges see them together.

The token alone would miss redeliveries in other compositions; the engine alone would leave
duplicates visible to plain reads until some merge that nothing schedules.

ORDER BY (thread_id, event_id): a thread's events are one contiguous key range, so per-thread
stats and degraded reads read little. PARTITION BY toYYYYMM(event_time): time-range queries
skip whole months and old months drop cheaply; a minmax index on event_time prunes inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from proxy import model
from proxy.backends import CH, MessageRow, PoisonError, ThreadRow, message_row, thread_row
from proxy.backends.ch_erasure import erase, keep_retention
from proxy.errors import Unavailable
from proxy.failpoints import Failpoints
from proxy.model import Change

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

logger = logging.getLogger(__name__)
T = TypeVar("T")
TABLE = "events"
_CHDB_LOCK = threading.Lock()  # chDB: one engine per process, shared by every store in it
_HTTP_OPTIONS: dict[str, Any] = {"connect_timeout": 5, "send_receive_timeout": 30,
                 "autogenerate_session_id": False}

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    event_id String,               -- kind:entity_id:version, the deduplication key
    event LowCardinality(String),  -- message.created|updated|deleted, thread.*, state.*,
                                   -- read.updated (a read marker moved to seq)
    entity_id String,              -- the thread id, message id, state key or user id
    thread_id String,              -- '' for state entries
    message_id String,             -- '' unless a message event
    seq UInt64,
    role LowCardinality(String),
    title String,
    owner_id String,
    content_length UInt64,         -- bytes of UTF-8 text (state: of the value as JSON)
    content String,                -- '' unless clickhouse.store_content
    metadata String,               -- JSON object
    deleted Bool,
    version UInt64,
    created_at DateTime64(3, 'UTC'),
    event_time DateTime64(3, 'UTC'),  -- when the change was made (the doc's updated_at)
    instance LowCardinality(String),  -- the sidecar that inserted the row
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX event_time_idx event_time TYPE minmax GRANULARITY 4
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (thread_id, event_id)
SETTINGS non_replicated_deduplication_window = 1000
"""

COLUMNS = ("event_id", "event", "entity_id", "thread_id", "message_id", "seq", "role", "title",
           "owner_id", "content_length", "content", "metadata", "deleted", "version",
           "created_at", "event_time", "instance")

# Reads. Aliases never reuse a column name: ClickHouse resolves an alias before a column, so
# `max(version) AS version` would turn `argMax(role, version)` into a nested aggregate.
THREAD = f"""
WITH startsWith(event, 'thread.') AS t
SELECT maxIf(version, t) AS r_version, argMaxIf(title, version, t) AS r_title,
       argMaxIf(owner_id, version, t) AS r_owner, argMaxIf(metadata, version, t) AS r_meta,
       argMaxIf(deleted, version, t) AS r_deleted,
       toUnixTimestamp64Milli(argMaxIf(created_at, version, t)) AS r_created,
       toUnixTimestamp64Milli(argMaxIf(event_time, version, t)) AS r_updated,
       maxIf(seq, message_id != '') AS r_last_seq
FROM {TABLE} WHERE thread_id = {{tid:String}}
"""
MESSAGES = f"""
SELECT message_id AS r_mid, any(seq) AS r_seq, argMax(role, version) AS r_role,
       argMax(content, version) AS r_content, argMax(metadata, version) AS r_meta,
       toUnixTimestamp64Milli(min(created_at)) AS r_created,
       toUnixTimestamp64Milli(argMax(event_time, version)) AS r_updated,
       max(version) AS r_version, argMax(deleted, version) AS r_deleted
FROM {TABLE} WHERE thread_id = {{tid:String}} AND message_id != '' AND ({{where}})
GROUP BY message_id ORDER BY r_seq
"""
THREAD_EVENTS = f"""
SELECT count() AS r_events, argMaxIf(deleted, version, startsWith(event, 'thread.')) AS r_gone
FROM {TABLE} WHERE thread_id = {{tid:String}}
"""
STATS = f"""
SELECT r_role, count() AS r_messages, sum(r_length) AS r_bytes, min(r_created) AS r_first,
       max(r_created) AS r_last
FROM (SELECT argMax(role, version) AS r_role, argMax(deleted, version) AS r_deleted,
             argMax(content_length, version) AS r_length,
             toUnixTimestamp64Milli(min(created_at)) AS r_created
      FROM {TABLE} WHERE thread_id = {{tid:String}} AND message_id != '' GROUP BY message_id)
WHERE NOT r_deleted GROUP BY r_role ORDER BY r_role
"""

# Server error codes that mean the data, not the server, is wrong (retrying cannot help).
_DATA_CODES = {6, 27, 38, 41, 53, 69, 70, 72, 131}
_CODE_RE = re.compile(r"Code: (\d+)")


def _ts(text: str | None, default: datetime | int) -> datetime:
    """A doc's timestamp, else the default (a datetime, or ms since the epoch)."""
    if text:
        return datetime.fromisoformat(text)
    return default if isinstance(default, datetime) else _dt(default)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def event_id(e: Change) -> str:
    return f"{e.kind}:{e.entity_id}:{e.version}"


def event_row(e: Change, instance: str, store_content: bool) -> list[Any]:
    """One events row, in COLUMNS order. Raises KeyError/ValueError/TypeError on a bad doc."""
    d = orjson.loads(e.doc)
    if not isinstance(d, dict):
        raise TypeError(f"the doc is not a JSON object: {e.doc[:80]!r}")
    when = _ts(d.get("updated_at"), e.ts_ms)
    tid, mid, seq, role, title, owner, text, meta = "", "", 0, "", "", "", "", "{}"
    deleted = e.kind != "r" and bool(d["deleted"])  # a read marker is never deleted
    if e.kind == "m":
        tid, mid, seq, role = d["thread_id"], e.entity_id, int(d["seq"]), d["role"]
        text, meta = d["content"], _json(d["metadata"])
    elif e.kind == "t":
        tid, title, owner, meta = e.entity_id, d["title"], d["owner_id"], _json(d["metadata"])
    elif e.kind == "s":
        text = "" if d["deleted"] else _json(d["value"])
    elif e.kind == "r":  # read marker: entity_id is the user, version the marker's seq
        tid, seq = d["thread_id"], int(d["seq"])
    else:
        raise ValueError(f"unknown entity kind {e.kind!r}")
    if not isinstance(text, str):
        raise TypeError("content must be a string")
    length = len(text.encode())
    return [event_id(e), e.event, e.entity_id, tid, mid, seq, role, title, owner, length,
            text if store_content else "", meta, deleted, e.version,
            when if d.get("created_at") == d.get("updated_at") else _ts(d.get("created_at"), when),
            when, instance]


def batch_token(rows: Sequence[Sequence[Any]]) -> str:
    """Deterministic per set of events: a retried or redelivered batch repeats it."""
    ids = sorted(f"{r[3]}/{r[0]}" for r in rows)  # message ids are unique per thread only
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _driver() -> Any:
    """clickhouse-connect, imported on first use: an API process whose ClickHouse is the
    worker's chDB never needs it (some 20 MB of RSS)."""
    import clickhouse_connect

    return clickhouse_connect


def _errors() -> Any:
    from clickhouse_connect.driver import exceptions

    return exceptions


def is_data_error(e: BaseException) -> bool:
    """Client-side serialization errors, and server errors about the values themselves."""
    chexc = _errors()
    if isinstance(e, chexc.DataError | ValueError | TypeError | OverflowError):
        return True
    if isinstance(e, chexc.DatabaseError) and not isinstance(e, chexc.OperationalError):
        code = _CODE_RE.search(str(e))
        return code is not None and int(code.group(1)) in _DATA_CODES
    return False


class ClickHouseStore:
    """The client on its own worker thread, the schema, the insert and the reads."""

    def __init__(self, url: str) -> None:
        if not url:
            raise ValueError("clickhouse.url is empty")
        self._url = url
        self._client: Client | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="clickhouse")
        self._chdb = url.startswith("chdb://")

    async def _call(self, fn: Callable[[Client], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, fn)

    def _run(self, fn: Callable[[Client], T]) -> T:
        with _CHDB_LOCK if self._chdb else contextlib.nullcontext():
            if self._client is None:  # lazy: a sidecar starts while ClickHouse is down
                options = {} if self._chdb else _HTTP_OPTIONS
                self._client = _driver().get_client(dsn=self._url, **options)
            return fn(self._client)

    async def close(self, timeout_s: float = 5.0) -> None:
        def close(_: Client) -> None:
            if self._client is not None:
                self._client.close()
                self._client = None

        if self._client is not None:
            with contextlib.suppress(Exception):  # closing must not fail the shutdown
                await asyncio.wait_for(self._call(close), timeout_s)
        self._executor.shutdown(wait=False)

    async def _guarded(self, fn: Callable[[Client], T]) -> T:
        """For the read path and startup: any failure is Unavailable (503, or retried)."""
        try:
            return await self._call(fn)
        except (_errors().ClickHouseError, OSError) as e:
            raise Unavailable(f"clickhouse: {e}") from e

    async def create_schema(self, retention_days: int = 0) -> None:
        await self.command(SCHEMA)
        await keep_retention(self, TABLE, retention_days)
        logger.info("clickhouse table %s is ready", TABLE)

    async def command(self, sql: str, params: dict[str, Any] | None = None,
                      settings: dict[str, Any] | None = None) -> None:
        """A statement without rows (DDL, TRUNCATE, mutations), parameters server-side."""
        await self._guarded(lambda c: c.command(sql, parameters=params, settings=settings))

    async def insert(self, entries: Sequence[Change], instance: str,
                     store_content: bool) -> None:
        """The entries as event rows, in one columnar insert (Native format, no SQL text with
        values) deduplicated by the batch's token. The rows are built on the worker thread too:
        a 10k-row batch would hold the event loop for some 100 ms."""
        def run(c: Client) -> None:
            try:
                rows = [event_row(e, instance, store_content) for e in entries]
            except (KeyError, ValueError, TypeError) as err:
                raise PoisonError(f"undecodable log entry: {err!r}") from err
            rows.sort(key=lambda r: (r[3], r[0]))  # the sorting key: same set, same blocks
            settings = {"insert_deduplication_token": batch_token(rows),
                        "insert_deduplicate": 1, "async_insert": 0}
            c.insert(TABLE, list(zip(*rows, strict=True)), column_names=COLUMNS,
                     column_oriented=True, settings=settings)

        await self._call(run)

    async def query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows as dicts; values only ever travel as server-side parameters ({name:Type})."""
        def run(c: Client) -> list[dict[str, Any]]:
            result = c.query(sql, parameters=params)
            return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]

        return await self._guarded(run)

    async def fetch_thread(self, tid: str) -> ThreadRow | None:
        """The thread at its latest version."""
        r = (await self.query(THREAD, {"tid": tid}))[0]
        if not r["r_version"]:
            return None
        return thread_row(thread_id=tid, title=r["r_title"], owner_id=r["r_owner"],
                          metadata=orjson.loads(r["r_meta"]), created_at=_dt(r["r_created"]),
                          updated_at=_dt(r["r_updated"]), version=r["r_version"],
                          last_seq=r["r_last_seq"], deleted=bool(r["r_deleted"]))

    async def fetch_messages(self, tid: str, lo: int, hi: int) -> list[MessageRow]:
        """Messages lo..hi at their latest version."""
        sql = MESSAGES.replace("{where}", "seq BETWEEN {lo:UInt64} AND {hi:UInt64}")
        return [_message(tid, r) for r in await self.query(sql, {"tid": tid, "lo": lo, "hi": hi})]

    async def fetch_message(self, tid: str, mid: str) -> MessageRow | None:
        sql = MESSAGES.replace("{where}", "message_id = {mid:String}")
        rows = await self.query(sql, {"tid": tid, "mid": mid})
        return _message(tid, rows[0]) if rows else None

    async def thread_stats(self, tid: str) -> dict[str, Any] | None:
        """Live messages (latest version of each not deleted) per role, their content bytes
        and first/last creation time; None if the thread has no events or is deleted."""
        head = (await self.query(THREAD_EVENTS, {"tid": tid}))[0]
        if not head["r_events"] or head["r_gone"]:
            return None
        rows = await self.query(STATS, {"tid": tid})
        return {"thread_id": tid, "messages": sum(r["r_messages"] for r in rows),
                "by_role": {r["r_role"]: r["r_messages"] for r in rows},
                "content_bytes": sum(r["r_bytes"] for r in rows),
                "first_at": model.iso(min(r["r_first"] for r in rows)) if rows else None,
                "last_at": model.iso(max(r["r_last"] for r in rows)) if rows else None}


def _message(tid: str, r: dict[str, Any]) -> MessageRow:
    return message_row(message_id=r["r_mid"], thread_id=tid, seq=r["r_seq"], role=r["r_role"],
                       content=r["r_content"], metadata=orjson.loads(r["r_meta"]),
                       created_at=_dt(r["r_created"]), updated_at=_dt(r["r_updated"]),
                       version=r["r_version"], deleted=bool(r["r_deleted"]))


class ClickHouseSink:
    """The streamer's view of ClickHouse: every change, as one event row."""

    info = CH

    def __init__(self, store: ClickHouseStore, instance: str, store_content: bool,
                 failpoints: Failpoints) -> None:
        self._store = store
        self._instance = instance
        self._store_content = store_content
        self._failpoints = failpoints

    async def write(self, changes: list[Change]) -> None:
        await self._failpoints.hit("ch-insert")
        try:
            await self._store.insert(changes, self._instance, self._store_content)
            await erase(self._store, TABLE, changes)  # every stored version (issue 12.4)
        except PoisonError:
            raise
        except Exception as err:
            if is_data_error(err):
                raise PoisonError(f"clickhouse rejected the data: {err}") from err
            raise  # the server's health: the flusher backs off and retries the same batch
