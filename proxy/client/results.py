"""What the client's calls return: small frozen records around the API's JSON docs."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Durability = Literal["acknowledged", "replicated", "persisted"]
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass(frozen=True, slots=True)
class Read:
    """A doc as read. `version` is its ETag (pass it as `if_match` to write it back only if
    nobody changed it); `tier` says which store served it (X-Tier); `staleness_s` how far
    behind a degraded (ClickHouse) answer may be."""

    doc: dict[str, Any]
    version: int | None
    tier: str | None = None
    staleness_s: float | None = None


@dataclass(frozen=True, slots=True)
class Written:
    """The outcome of a write. `created`: a new entity (201, or a 202 with `X-Created: true`;
    for an append whose id the client generated, also a 200 after a retry — the id is ours
    alone). `durability`: the
    level reached, from X-Durability on a 202, else the level asked for (a 200/201 means it
    was reached), else "acknowledged" (in Redis). `attempts`: how many sends it took."""

    doc: dict[str, Any]
    created: bool
    version: int | None
    durability: str
    status: int
    attempts: int = 1

    @property
    def accepted_only(self) -> bool:
        """202: stored, but the durability asked for was not reached (see `durability`)."""
        return self.status == 202


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a thread's messages, ordered by seq. `next_cursor` is `{"before": n}`,
    `{"after": n}` or None (no further page in this direction)."""

    thread_id: str
    last_seq: int
    items: list[dict[str, Any]]
    next_cursor: dict[str, int] | None
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class InboxPage:
    """One page of an owner's threads, newest activity first (each with `unread` when the
    page was asked for a `user_id`). `next_cursor` is the `before` of the next page (opaque),
    or None."""

    owner_id: str
    items: list[dict[str, Any]]
    next_cursor: str | None
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class ChangePage:
    """One page of a thread's changes feed: `items` are `{"kind": "thread"|"message", "doc"}`,
    each entity once at its latest change, by cseq. `next_cursor` is `{"after_cseq": n}`, or
    None once caught up with `last_cseq`."""

    thread_id: str
    last_cseq: int
    items: list[dict[str, Any]]
    next_cursor: dict[str, int] | None
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class Marker:
    """A user's read position in a thread. `unread`: its live messages after `seq` (None on
    the answer of a put, which carries the position only); `durability`: the level a put
    reached (None on a get)."""

    thread_id: str
    user_id: str
    seq: int
    unread: int | None = None
    tier: str | None = None
    durability: str | None = None


def new_message_id() -> str:
    """A sortable unique id, the server's layout (ULID: 48-bit ms time + 80 random bits,
    Crockford base32), so ids the client generates sort like the ones the server would."""
    n = (time.time_ns() // 1_000_000 << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(n >> shift) & 31] for shift in range(125, -1, -5))


def etag(version: int) -> str:
    """The If-Match value of a version."""
    return f'"{version}"'


def version_from(headers: Mapping[str, str]) -> int | None:
    """The version in an ETag header (`"3"`, or weak `W/"3"`); None if absent or not one."""
    raw = headers.get("ETag", "").removeprefix("W/").strip('"')
    return int(raw) if raw.isdigit() else None


def created_of(status: int, headers: Mapping[str, str]) -> bool:
    """201, or a 202 (stored below the durability asked) that says it created the entity."""
    return status == 201 or (status == 202 and headers.get("X-Created") == "true")


def durability_of(status: int, headers: Mapping[str, str], asked: str | None) -> str:
    reached = headers.get("X-Durability")
    if reached:
        return reached
    return asked if asked and status != 202 else "acknowledged"
