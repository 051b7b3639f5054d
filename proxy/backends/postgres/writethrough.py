"""Write-through while Redis is down: each write is one PostgreSQL transaction under a row lock
on its entity (a thread's lock also orders its appends: seq = the thread's highest + 1), with
the hot tier's rules — If-Match, idempotent appends by message_id and fingerprint, tombstones,
expiry, versions counting up — so an answer means committed. The rows it returns are the ones
read-through would load."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from proxy import model
from proxy.backends import MessageRow, StateRow, ThreadRow, message_row, state_row, thread_row
from proxy.backends.postgres import DOWN, SCHEMA_PENDING
from proxy.backends.postgres.sql import ERASE
from proxy.backends.postgres.store import DATA_ERRORS, PostgresStore
from proxy.errors import Conflict, Invalid, NotFound, PreconditionFailed, Unavailable

Change = Callable[[dict[str, Any], int], dict[str, Any]]

_THREAD = ("thread_id, title, owner_id, metadata::text AS metadata, created_at, updated_at,"
           " version, last_seq, deleted, last_activity_at, cseq, last_cseq")
_MESSAGE = ("message_id, thread_id, seq, role, content, metadata::text AS metadata,"
            " created_at, updated_at, version, deleted, fingerprint, cseq")
_STATE = "key, value::text AS value, version, expires_at, updated_at, deleted"
_THREAD_EVENTS = {"del": "thread.deleted", "erase": "thread.erased"}

PUT_THREAD = f"""
INSERT INTO threads AS t (thread_id, title, owner_id, metadata, created_at, updated_at,
                          version, deleted, last_activity_at, cseq, last_cseq)
VALUES ($1, $2, $3, $4::jsonb, $5, $5, $6, $7, $5, $8, $8)
ON CONFLICT (thread_id) DO UPDATE SET title = excluded.title, owner_id = excluded.owner_id,
    metadata = excluded.metadata, updated_at = excluded.updated_at, version = excluded.version,
    deleted = excluded.deleted,
    last_activity_at = greatest(t.last_activity_at, excluded.last_activity_at),
    cseq = excluded.cseq, last_cseq = excluded.last_cseq,
    created_at = CASE WHEN t.version = 0 THEN excluded.created_at ELSE t.created_at END
RETURNING {_THREAD}"""
APPEND = f"""
INSERT INTO messages (message_id, thread_id, seq, role, content, metadata, created_at,
                      updated_at, version, deleted, fingerprint, cseq)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $7, 1, false, $8, $9)
RETURNING {_MESSAGE}"""
UPDATE_MESSAGE = f"""
UPDATE messages SET role = $3, content = $4, metadata = $5::jsonb, updated_at = $6,
    version = $7, deleted = $8, cseq = $9
WHERE thread_id = $1 AND message_id = $2
RETURNING {_MESSAGE}"""
PUT_STATE = f"""
INSERT INTO state_entries (key, value, version, expires_at, updated_at, deleted)
VALUES ($1, $2::jsonb, $3, $4, $5, $6)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,
    expires_at = excluded.expires_at, updated_at = excluded.updated_at,
    deleted = excluded.deleted
RETURNING {_STATE}"""
# A read marker moves forward only: one statement checks the thread, upserts, logs the move
# and answers the marker now (moved, else the one before, else 0) with the thread's state.
PUT_MARKER = """
WITH t AS (SELECT version, deleted, last_seq FROM threads WHERE thread_id = $1 FOR SHARE),
moved AS (
    INSERT INTO read_markers AS r (thread_id, user_id, seq, updated_at)
    SELECT $1, $2, $3, $4 FROM t WHERE t.version > 0 AND NOT t.deleted AND $3 <= t.last_seq
    ON CONFLICT (thread_id, user_id) DO UPDATE SET seq = excluded.seq,
        updated_at = excluded.updated_at
    WHERE excluded.seq > r.seq
    RETURNING seq),
logged AS (INSERT INTO write_through_events (routing_id, fields)
           SELECT $1, $5::jsonb FROM moved)
SELECT t.version, t.deleted, t.last_seq,
       coalesce((SELECT seq FROM moved), (SELECT seq FROM read_markers
                WHERE thread_id = $1 AND user_id = $2), 0) AS seq
FROM t"""


class WriteThrough:
    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction whose driver errors are the client's: data PostgreSQL refuses (a
        constraint) 422, PostgreSQL unreachable 503 — nothing was committed either way."""
        try:
            async with self._store.transaction() as conn:
                yield conn
        except DATA_ERRORS as e:
            raise Invalid(f"postgres refused the write: {e}", {"tier": "postgres"}) from e
        except DOWN as e:
            raise Unavailable(f"postgres: {e or type(e).__name__}") from e
        except SCHEMA_PENDING as e:
            raise Unavailable(f"postgres schema not applied yet: {e}") from e

    async def put_thread(self, tid: str, t: model.ThreadInput, if_match: str,
                         op: str) -> tuple[ThreadRow, bool]:
        """Create, replace ('put'), tombstone ('del') or erase ('erase': a deleted thread
        too) a thread; True if it is new."""
        async with self._transaction() as conn:
            cur = await conn.fetchrow("SELECT version, deleted FROM threads"
                                      " WHERE thread_id = $1 FOR UPDATE", tid)
            v = cur["version"] if cur else 0
            if v and cur["deleted"] and op != "erase":
                raise (NotFound if op == "del" else Conflict)(f"thread {tid} was deleted")
            if not v and op != "put":
                raise NotFound(f"thread {tid} not found")
            if if_match and if_match != str(v):
                raise PreconditionFailed(f"thread {tid} is at version {v}", {"version": str(v)})
            row = _thread(await conn.fetchrow(PUT_THREAD, tid, t.title, t.owner_id,
                                              orjson.dumps(t.metadata).decode(), _now(),
                                              v + 1, op != "put", await _next_cseq(conn, tid)))
            await _logged(conn, tid, "t", tid, row.version, _THREAD_EVENTS.get(op) or (
                "thread.created" if v == 0 else "thread.updated"), row.doc,
                erased=op == "erase")
        return row, v == 0

    async def append(self, tid: str, mid: str, m: model.MessageInput,
                     generated: bool) -> tuple[MessageRow, bool]:
        """Append at the thread's next seq; a message_id seen before answers the original
        (same body) or Conflict. True if it is new."""
        async with self._transaction() as conn:
            await _live_thread(conn, tid)
            fingerprint = m.fingerprint()
            if not generated:
                old = await conn.fetchrow(f"SELECT {_MESSAGE} FROM messages"
                                          " WHERE thread_id = $1 AND message_id = $2", tid, mid)
                if old is not None:
                    row = _message(old)
                    if row.fingerprint != fingerprint:
                        raise Conflict(f"message {mid} exists with a different body")
                    return row, False
            seq = 1 + await conn.fetchval(
                "SELECT greatest((SELECT last_seq FROM threads WHERE thread_id = $1),"
                " (SELECT coalesce(max(seq), 0) FROM messages WHERE thread_id = $1))", tid)
            now = _now()
            cseq = await _next_cseq(conn, tid)
            row = _message(await conn.fetchrow(APPEND, mid, tid, seq, m.role, m.content,
                                               orjson.dumps(m.metadata).decode(), now,
                                               fingerprint, cseq))
            await conn.execute("UPDATE threads SET last_seq = $2, last_activity_at ="
                               " greatest(last_activity_at, $3), last_cseq = $4"
                               " WHERE thread_id = $1", tid, seq, now, cseq)
            await _logged(conn, tid, "m", mid, 1, "message.created", row.doc, fingerprint)
        return row, True

    async def update_message(self, tid: str, mid: str, if_match: str,
                             change: Change, erase: bool = False) -> MessageRow:
        """Edit or tombstone a live message at If-Match; `erase` tombstones a deleted one
        too (its earlier versions held its content)."""
        async with self._transaction() as conn:
            await _live_thread(conn, tid)
            old = await conn.fetchrow(f"SELECT {_MESSAGE} FROM messages WHERE thread_id = $1"
                                      " AND message_id = $2 FOR UPDATE", tid, mid)
            if old is None:
                raise NotFound(f"message {mid} not found in thread {tid}")
            if old["deleted"] and not erase:
                raise NotFound(f"message {mid} was deleted")
            version = str(old["version"])
            if if_match and if_match != version:
                raise PreconditionFailed(f"message {mid} is at version {version}",
                                         {"version": version})
            new = change(orjson.loads(_message(old).doc), model.now_ms())
            cseq = await _next_cseq(conn, tid)
            row = _message(await conn.fetchrow(
                UPDATE_MESSAGE, tid, mid, new["role"], new["content"],
                orjson.dumps(new["metadata"]).decode(), _now(), new["version"], new["deleted"],
                cseq))
            await conn.execute("UPDATE threads SET last_cseq = $2 WHERE thread_id = $1",
                               tid, cseq)
            event = "message.erased" if erase else (
                "message.deleted" if new["deleted"] else "message.updated")
            await _logged(conn, tid, "m", mid, row.version, event, row.doc, row.fingerprint,
                          erased=erase)
        return row

    async def put_state(self, key: str, value: Any, expires_at_ms: int | None, if_match: str,
                        op: str) -> tuple[StateRow, bool]:
        """Write ('put') or tombstone ('del') an entry; an expired one counts as absent but
        its version keeps counting. True if it was absent."""
        async with self._transaction() as conn:
            cur = await conn.fetchrow("SELECT version, deleted, expires_at FROM state_entries"
                                      " WHERE key = $1 FOR UPDATE", key)
            v = cur["version"] if cur else 0
            live = cur is not None and not cur["deleted"] and not (
                cur["expires_at"] and cur["expires_at"] <= datetime.now(UTC))
            if if_match and (not live or if_match != str(v)):
                what = f"is at version {v}" if live else "does not exist"
                raise PreconditionFailed(f"state {key} {what}", {"version": str(v) if live
                                                                 else None})
            if op == "del" and not live:
                raise NotFound(f"state {key} not found")
            expires = _at(expires_at_ms) if expires_at_ms is not None else None
            row = _state(await conn.fetchrow(PUT_STATE, key, None if op == "del" else
                                             orjson.dumps(value).decode(), v + 1, expires,
                                             _now(), op == "del"))
            event = "state.deleted" if op == "del" else "state.updated"
            await _logged(conn, key, "s", key, row.version, event, row.doc)
        return row, not live

    async def put_marker(self, tid: str, uid: str, seq: int) -> int:
        """Move a user's marker forward to `seq`; the marker now."""
        ms = model.now_ms()
        fields = {"k": "r", "id": uid, "tid": tid, "v": str(seq), "e": "read.updated",
                  "ts": str(ms), "d": model.marker_doc(tid, uid, seq, ms).decode(), "f": ""}
        async with self._transaction() as conn:
            r = await conn.fetchrow(PUT_MARKER, tid, uid, seq, _at(ms),
                                    orjson.dumps(fields).decode())
        if r is None or r["version"] == 0:
            raise NotFound(f"thread {tid} not found")
        if r["deleted"]:
            raise NotFound(f"thread {tid} was deleted")
        if seq > r["last_seq"]:
            raise Invalid(f"seq {seq} is past the last seq of thread {tid} ({r['last_seq']})",
                          {"field": "seq", "last_seq": r["last_seq"]})
        return int(r["seq"])

    async def erase_again(self, scopes: list[tuple[str, str]]) -> None:
        """Blank again what was erased through PostgreSQL, (thread id, message id or ''):
        a change Redis held unflushed of a message of an erased thread (not a tombstone, so
        the flush takes it: sql.py CONFLICTS) may have been flushed in the moment Redis was
        back, before recovery erased it from the log."""
        if scopes:
            async with self._transaction() as conn:
                await conn.execute(ERASE, [t for t, _ in scopes], [m for _, m in scopes])

    async def take_events(self, publish: Callable[[list[tuple[str, dict[str, str]]]],
                                                  Awaitable[None]]) -> int:
        """Hand the logged changes to `publish` as (routing id, log-entry fields), a batch at
        a time, deleting each batch once published; rows another process is publishing are
        skipped. How many were published."""
        done = 0
        while True:
            async with self._transaction() as conn:
                rows = await conn.fetch("SELECT id, routing_id, fields::text AS fields FROM"
                                        " write_through_events ORDER BY id LIMIT 500"
                                        " FOR UPDATE SKIP LOCKED")
                if not rows:
                    return done
                await publish([(r["routing_id"], orjson.loads(r["fields"])) for r in rows])
                await conn.execute("DELETE FROM write_through_events WHERE id = ANY($1)",
                                   [r["id"] for r in rows])
            done += len(rows)


async def _logged(conn: asyncpg.Connection, routing_id: str, kind: str, entity_id: str,
                  version: int, event: str, doc: bytes, fingerprint: str = "",
                  erased: bool = False) -> None:
    """The change as the log entry a Redis script would have written (keys.py). `erased`:
    first blank what the flush's erasure blanks (a thread's messages too) and drop the
    logged changes that still hold the content (sql.py ERASE); the erase event then tells
    ClickHouse, once published, to blank every version it stores."""
    if erased:
        await conn.execute(ERASE, [routing_id], [entity_id if kind == "m" else ""])
    fields = {"k": kind, "id": entity_id, "tid": routing_id, "v": str(version), "e": event,
              "ts": str(model.now_ms()), "d": doc.decode(), "f": fingerprint}
    await conn.execute("INSERT INTO write_through_events (routing_id, fields)"
                       " VALUES ($1, $2::jsonb)", routing_id, orjson.dumps(fields).decode())


async def _next_cseq(conn: asyncpg.Connection, tid: str) -> int:
    """The thread's next change number (under its row lock, so changes take turns)."""
    return 1 + int(await conn.fetchval(
        "SELECT greatest((SELECT last_cseq FROM threads WHERE thread_id = $1),"
        " (SELECT coalesce(max(cseq), 0) FROM messages WHERE thread_id = $1), 0)", tid))


async def _live_thread(conn: asyncpg.Connection, tid: str) -> None:
    """Lock the thread (its appends take turns); NotFound unless it exists and is live."""
    t = await conn.fetchrow("SELECT version, deleted FROM threads WHERE thread_id = $1"
                            " FOR UPDATE", tid)
    if t is None or t["version"] == 0:
        raise NotFound(f"thread {tid} not found")
    if t["deleted"]:
        raise NotFound(f"thread {tid} was deleted")


def _now() -> datetime:
    return _at(model.now_ms())


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _thread(r: Any) -> ThreadRow:
    return thread_row(**{**dict(r), "metadata": orjson.loads(r["metadata"])})


def _message(r: Any) -> MessageRow:
    return message_row(**{**dict(r), "metadata": orjson.loads(r["metadata"])})


def _state(r: Any) -> StateRow:
    value = orjson.loads(r["value"]) if r["value"] is not None else None
    return state_row(**{**dict(r), "value": value})


class Leases:
    """The write-through leases of API processes (proxy.failover), in PostgreSQL: the one tier
    they all reach while Redis is down. A lease runs out `lease_s` after its last renewal (a
    process killed or paused stops counting)."""

    def __init__(self, store: PostgresStore, holder: str, lease_s: float) -> None:
        self._store = store
        self._holder = holder
        self._lease_s = lease_s

    async def hold(self, state: str) -> None:
        async with self._store.transaction() as conn:
            await conn.execute(
                "INSERT INTO write_through_leases (holder, state, until)"
                " VALUES ($1, $2, now() + make_interval(secs => $3))"
                " ON CONFLICT (holder) DO UPDATE SET state = excluded.state,"
                " until = excluded.until", self._holder, state, self._lease_s)

    async def release(self) -> None:
        """This process's lease, and any that ran out."""
        async with self._store.transaction() as conn:
            await conn.execute("DELETE FROM write_through_leases WHERE holder = $1"
                               " OR until < now()", self._holder)

    async def others(self, states: tuple[str, ...]) -> bool:
        """Whether another process's lease, not run out, is in one of these states."""
        async with self._store.transaction() as conn:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM write_through_leases WHERE state = ANY($1)"
                " AND until > now() AND holder <> $2)", list(states), self._holder))
