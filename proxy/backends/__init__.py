"""What the stores below Redis offer, one module per backend (postgres.py, clickhouse.py):

- `Sink`: where a flusher writes batches of changes from the log (idempotently);
- `Backing`: where reads find what Redis no longer holds (and write-through for
  `X-Durability: persisted`);
- the rows they hand to the hot tier, built from column values by `thread_row`, `message_row`
  and `state_row` so every backend produces the same docs Redis holds;
- `SINKS`, the registry: every sink, its consumer group and how it is flushed. Adding a sink is
  a module here, a line in `SINKS`, and its construction in app.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson

from proxy import model


class PoisonError(Exception):
    """The batch failed because of its data, not the sink's health: retrying the same changes
    unchanged will fail again, so the flusher isolates and dead-letters them."""


@dataclass(frozen=True)
class SinkInfo:
    """A sink as the rest of the sidecar sees it: `name` is its consumer group and metrics
    label; `tier` its name in /v1/status and X-Tier; `coalesce`: write only the newest version
    of each entity in a batch (state), or every version (events); `after_write`: the failpoint
    between its commit and the acknowledgement."""

    name: str
    tier: str
    coalesce: bool
    after_write: str


PG = SinkInfo("pg", "postgres", coalesce=True, after_write="after-pg-commit-before-xack")
CH = SinkInfo("ch", "clickhouse", coalesce=False, after_write="after-ch-insert-before-xack")
SINKS = (PG, CH)
GROUPS = tuple(s.name for s in SINKS)


class Sink(Protocol):
    info: SinkInfo

    async def write(self, changes: list[model.Change]) -> None:
        """Write the changes idempotently (a replay must neither duplicate nor regress) and
        return only once they are committed. Raise PoisonError for bad data."""
        ...


@dataclass(frozen=True)
class ThreadRow:
    doc: bytes  # complete thread doc without last_seq
    version: int
    created_at: str  # JSON string, as the thread script stores it
    last_seq: int
    deleted: bool
    thread_id: str = ""
    owner_id: str = ""
    last_activity_ms: int = 0  # the later of its last change and last message (inbox)
    last_cseq: int = 0  # the thread's last change number (of it or one of its messages)


@dataclass(frozen=True)
class ChangeRow:
    """An entity of a thread at its latest change: `member` '' is the thread, else the id of
    one of its messages (as in the changes set, keys.changes)."""

    member: str
    cseq: int
    doc: bytes


@dataclass(frozen=True)
class MessageRow:
    mid: str
    seq: int
    version: int
    fingerprint: str
    doc: bytes
    cseq: int = 0  # of its latest change


@dataclass(frozen=True)
class StateRow:
    doc: bytes
    version: int
    expires_at_ms: int | None
    deleted: bool


class Backing(Protocol):
    """Where data that Redis no longer holds lives; `tier` names it in `X-Tier`."""

    tier: str

    async def load_thread(self, tid: str) -> ThreadRow | None: ...
    async def load_messages(self, tid: str, lo: int, hi: int) -> list[MessageRow]: ...
    async def load_message(self, tid: str, mid: str) -> MessageRow | None: ...
    async def load_state(self, key: str) -> StateRow | None: ...
    # Read markers (issue 12.2): a user's marker (None: none), and how many live messages
    # of lo..hi there are, leaving out `exclude` (deleted in Redis, not flushed yet).
    async def load_marker(self, tid: str, uid: str) -> int | None: ...
    async def count_live(self, tid: str, lo: int, hi: int, exclude: list[str]) -> int: ...
    async def load_inbox(self, owner: str, before: tuple[int, str] | None,
                         limit: int) -> list[ThreadRow]:
        """An owner's live threads strictly below `before` (activity ms, tid; None: from
        the top), newest activity first, at most `limit`."""
        ...
    async def load_changes(self, tid: str, after: int, limit: int) -> list[ChangeRow]:
        """The thread and its messages whose latest change has a cseq after `after`, by
        cseq, at most `limit`."""
        ...
    async def persist(self, kind: str, doc: bytes, fingerprint: str = "",
                      erased: bool = False) -> None: ...


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else model.iso_dt(dt)


def _ms(dt: datetime | None) -> int | None:
    return None if dt is None else int(dt.timestamp() * 1000 + 0.5)


def thread_row(*, thread_id: str, title: str, owner_id: str, metadata: Any,
               created_at: datetime, updated_at: datetime, version: int, last_seq: int,
               deleted: bool, last_activity_at: datetime | None = None, cseq: int = 0,
               last_cseq: int = 0) -> ThreadRow:
    """A thread as the thread script stores it (fields in its order; metadata a JSON object)."""
    created = _iso(created_at)
    doc = orjson.dumps({"version": version, "cseq": cseq, "created_at": created,
                        "thread_id": thread_id, "title": title, "owner_id": owner_id,
                        "metadata": metadata, "updated_at": _iso(updated_at),
                        "deleted": deleted})
    return ThreadRow(doc, version, orjson.dumps(created).decode(), last_seq, deleted,
                     thread_id, owner_id, _ms(last_activity_at) or 0, max(cseq, last_cseq))


def message_row(*, message_id: str, thread_id: str, seq: int, role: str, content: str,
                metadata: Any, created_at: datetime, updated_at: datetime, version: int,
                deleted: bool, fingerprint: str | None = None, cseq: int = 0) -> MessageRow:
    """A message as the append script stores it, with the fingerprint of the body it was
    appended with (rows without one: of their current body)."""
    doc = orjson.dumps({"seq": seq, "cseq": cseq, "version": version, "message_id": message_id,
                        "thread_id": thread_id, "role": role, "content": content,
                        "metadata": metadata, "created_at": _iso(created_at),
                        "updated_at": _iso(updated_at), "deleted": deleted})
    fingerprint = fingerprint or model.MessageInput(None, role, content, metadata).fingerprint()
    return MessageRow(message_id, seq, version, fingerprint, doc, cseq)


def state_row(*, key: str, value: Any, version: int, expires_at: datetime | None,
              updated_at: datetime, deleted: bool) -> StateRow:
    doc = orjson.dumps({"version": version, "key": key, "value": value,
                        "expires_at": _iso(expires_at), "updated_at": _iso(updated_at),
                        "deleted": deleted})
    return StateRow(doc, version, _ms(expires_at), deleted)
