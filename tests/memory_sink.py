"""An in-memory Sink (test code): the flusher's own logic — backoff, poison isolation,
coalescing — tested without a database, and the reference the sink conformance suite holds
the real backends to.

It stores like an upsert (`coalesce=True`, as PostgreSQL: the newest version of each entity
wins, an older one never replaces it) or like an event log (`coalesce=False`, as ClickHouse:
every version once). Switches: `fail_next(n)` makes the next n writes fail as an unreachable
database would (transient), `reject(entity_id)` makes every write holding that entity fail
with PoisonError, and `hold` (an Event, set by default) parks writes while cleared. Every
call is recorded in `calls`, with its outcome."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.backends import PoisonError, SinkInfo
from proxy.model import Change

Identity = tuple[str, str, str]
_ID_FIELD = {"t": "thread_id", "m": "message_id", "s": "key", "r": "user_id"}


class TransientError(ConnectionError):
    """What `fail_next` raises: the database looks unreachable."""


@dataclass
class Call:
    changes: list[Change]
    outcome: str = "pending"  # then "ok", "transient" or "poison"

    @property
    def entry_ids(self) -> list[str]:
        return [c.entry_id for c in self.changes]


class MemorySink:
    """A proxy.backends.Sink held in a dict (see the module docstring)."""

    def __init__(self, name: str = "mem", coalesce: bool = True) -> None:
        self.info = SinkInfo(name, "memory", coalesce=coalesce,
                             after_write=f"after-{name}-write-before-xack")
        self.calls: list[Call] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self._stored: dict[Identity, dict[int, Change]] = {}
        self._failures = 0
        self._rejected: set[str] = set()

    def fail_next(self, n: int) -> None:
        """The next n writes fail as if the database were down (0: stop failing)."""
        self._failures = n

    def reject(self, *entity_ids: str) -> None:
        """Writes holding one of these entities raise PoisonError (none: accept everything)."""
        self._rejected = set(entity_ids)

    async def write(self, changes: list[Change]) -> None:
        call = Call(list(changes))
        self.calls.append(call)
        await self.hold.wait()
        if self._failures > 0:
            self._failures -= 1
            call.outcome = "transient"
            raise TransientError(f"memory sink {self.info.name}: unreachable (injected)")
        try:
            for c in changes:
                self._check(c)
        except PoisonError:
            call.outcome = "poison"
            raise
        for c in changes:  # all or nothing, like one transaction
            self._store(c)
        call.outcome = "ok"

    def _check(self, c: Change) -> None:
        if c.entity_id in self._rejected:
            raise PoisonError(f"memory sink {self.info.name}: rejected {c.kind}:{c.entity_id}")
        try:
            doc: Any = orjson.loads(c.doc)
        except orjson.JSONDecodeError as e:
            raise PoisonError(f"memory sink {self.info.name}: undecodable doc: {e}") from e
        id_field = _ID_FIELD.get(c.kind)
        if id_field is None or not isinstance(doc, dict) or id_field not in doc:
            raise PoisonError(f"memory sink {self.info.name}: not a {c.kind!r} doc: {c.doc[:80]!r}")

    def _store(self, c: Change) -> None:
        written = self._stored.setdefault(c.identity, {})
        if not self.info.coalesce:
            written[c.version] = c
        elif not written or c.version > max(written):  # an upsert never regresses
            written.clear()
            written[c.version] = c

    def versions(self, identity: Identity) -> list[int]:
        """What a reader sees of an entity: its newest version (upsert), or every version
        written, each once (events)."""
        return sorted(self._stored.get(identity, {}))

    def latest(self, identity: Identity) -> Change | None:
        written = self._stored.get(identity, {})
        return written[max(written)] if written else None

    def ok_calls(self) -> list[Call]:
        return [c for c in self.calls if c.outcome == "ok"]
