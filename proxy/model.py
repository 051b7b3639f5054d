"""Entities on the wire: validation of request bodies, the JSON docs stored in Redis, the
changes the write-behind log carries, and the limits every layer shares.

Docs are built here as JSON objects; the Lua scripts prefix the fields only Redis can
assign (seq, version, created_at of a thread). Versions are integers that travel as strings.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.errors import Invalid, Malformed
from proxy.keys import ID_RE

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MAX_PAGE = 1000  # messages in one page
DEFAULT_PAGE = 50
MAX_CURSOR = 2**53  # the largest seq a cursor may name: exact in Lua, JSON and every tier
TTL_MAX_S = 10 * 365 * 86400  # the longest ttl of a state entry
# The log events of an erasure (?erase=true): the sinks also remove every stored version.
ERASED = ("message.erased", "thread.erased")


@dataclass(frozen=True, slots=True)
class Change:
    """One change read from the write-behind log: the entity's kind ('t' thread, 'm' message,
    's' state), its ids, its complete doc after the change, and when the write was
    acknowledged (ms). `entry_id` is its id in the shard's log."""

    shard: int
    entry_id: str
    kind: str
    entity_id: str
    thread_id: str
    version: int
    event: str
    ts_ms: int
    doc: bytes
    only: str = ""  # a replayed dead letter is meant for this consumer group alone
    fingerprint: str = ""  # messages: the fingerprint of the body it was appended with

    @property
    def identity(self) -> tuple[str, str, str]:
        """The entity: message ids are scoped by thread."""
        return (self.kind, self.thread_id, self.entity_id)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    """UTC timestamp with milliseconds, e.g. 2026-11-27T06:50:00.123Z."""
    return iso_dt(datetime.fromtimestamp(ms / 1000, UTC))


def iso_dt(dt: datetime) -> str:
    """The same format for a datetime (e.g. read from PostgreSQL)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_id() -> str:
    """A sortable unique id (ULID layout: 48-bit ms time + 80 random bits, Crockford base32)."""
    n = (now_ms() << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(n >> shift) & 31] for shift in range(125, -1, -5))


def seq_of(doc: bytes) -> int:
    """The seq of a stored message doc, which starts {"seq":N,... (the append script)."""
    return int(doc[7:doc.index(b",", 7)])


def ulid_ms(value: str) -> int:
    """The creation time (Unix ms) a ULID carries, 0 if `value` is not one (a ULID made in
    the future counts as not one)."""
    if len(value) != 26:
        return 0
    ms = 0
    for ch in value[:10]:
        digit = _CROCKFORD.find(ch)
        if digit < 0:
            return 0
        ms = ms * 32 + digit
    return ms if ms <= now_ms() + 86_400_000 else 0


def version_of(doc: bytes) -> int:
    """The version of a stored doc. Docs put it near the front ({"seq":…,"version":…} or
    {"version":…}), so the whole doc is parsed only when it is not there."""
    at = doc.find(b'"version":', 0, 48)
    if at >= 0:
        end = at + 10
        while end < len(doc) and doc[end:end + 1].isdigit():
            end += 1
        if end > at + 10:
            return int(doc[at + 10:end])
    return int(orjson.loads(doc)["version"])


def check_id(value: str, field: str) -> str:
    if not ID_RE.fullmatch(value):
        raise Invalid(f"{field} must match [A-Za-z0-9._:-]{{1,128}}", {"field": field})
    return value


@dataclass(frozen=True)
class Limits:
    max_content_chars: int
    max_metadata_bytes: int


@dataclass(frozen=True)
class ThreadInput:
    title: str
    owner_id: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class MessageInput:
    message_id: str | None
    role: str
    content: str
    metadata: dict[str, Any]

    def fingerprint(self) -> str:
        """Identifies the body of an append, to tell a retry from a different message."""
        raw = orjson.dumps([self.role, self.content, self.metadata], option=orjson.OPT_SORT_KEYS)
        return hashlib.sha1(raw).hexdigest()


@dataclass(frozen=True)
class MessagePatch:
    fields: dict[str, Any]


@dataclass(frozen=True)
class StateInput:
    value: Any
    ttl_s: float | None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object", {"field": "body"})
    return body


def _only(body: dict[str, Any], allowed: set[str],
          required: frozenset[str] | set[str] = frozenset()) -> None:
    for name in body:
        if name not in allowed:
            raise Invalid(f"unknown field {name!r}", {"field": name})
    for name in required:
        if name not in body:
            raise Invalid(f"missing field {name!r}", {"field": name})


def _str(body: dict[str, Any], name: str, default: str = "", max_len: int = 1024) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise Invalid(f"{name} must be a string", {"field": name})
    if len(value) > max_len:
        raise Invalid(f"{name} is longer than {max_len} characters", {"field": name})
    if "\x00" in value:
        raise Invalid(f"{name} must not contain NUL characters", {"field": name})
    return value


def _metadata(body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    value = body.get("metadata", {})
    if not isinstance(value, dict):
        raise Invalid("metadata must be a JSON object", {"field": "metadata"})
    try:
        size = len(orjson.dumps(value))
    except TypeError as e:  # integers beyond 64 bits cannot be stored exactly
        raise Invalid(f"metadata cannot be stored: {e}", {"field": "metadata"}) from e
    if size > limits.max_metadata_bytes:
        raise Invalid(f"metadata is larger than {limits.max_metadata_bytes} bytes",
                      {"field": "metadata"})
    if _has_nul(value):
        raise Invalid("metadata must not contain NUL characters", {"field": "metadata"})
    return value


def _has_nul(value: Any) -> bool:
    """PostgreSQL text and jsonb cannot hold NUL: reject it anywhere in keys or strings."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse_thread(body: Any, limits: Limits) -> ThreadInput:
    body = _object(body)
    _only(body, {"title", "owner_id", "metadata"})
    return ThreadInput(_str(body, "title"), _str(body, "owner_id", max_len=128),
                       _metadata(body, limits))


def parse_message(body: Any, limits: Limits) -> MessageInput:
    body = _object(body)
    _only(body, {"message_id", "role", "content", "metadata"}, {"role", "content"})
    mid = body.get("message_id")
    if mid is not None:
        if not isinstance(mid, str):
            raise Invalid("message_id must be a string", {"field": "message_id"})
        check_id(mid, "message_id")
    return MessageInput(mid, _role(body), _str(body, "content", max_len=limits.max_content_chars),
                        _metadata(body, limits))


def _role(body: dict[str, Any]) -> str:
    role = _str(body, "role", max_len=64)
    if not role:
        raise Invalid("role must not be empty", {"field": "role"})
    return role


def parse_patch(body: Any, limits: Limits) -> MessagePatch:
    body = _object(body)
    _only(body, {"role", "content", "metadata"})
    if not body:
        raise Invalid("nothing to change: give role, content or metadata", {"field": "body"})
    fields: dict[str, Any] = {}
    if "role" in body:
        fields["role"] = _role(body)
    if "content" in body:
        fields["content"] = _str(body, "content", max_len=limits.max_content_chars)
    if "metadata" in body:
        fields["metadata"] = _metadata(body, limits)
    return MessagePatch(fields)


def parse_state(body: Any, max_value_bytes: int) -> StateInput:
    body = _object(body)
    _only(body, {"value", "ttl"}, {"value"})
    ttl = body.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                            or not 0 < ttl <= TTL_MAX_S):
        raise Invalid("ttl must be a number of seconds greater than 0", {"field": "ttl"})
    try:
        size = len(orjson.dumps(body["value"]))
    except TypeError as e:
        raise Invalid(f"value cannot be stored: {e}", {"field": "value"}) from e
    if size > max_value_bytes:
        raise Invalid(f"value is larger than {max_value_bytes} bytes", {"field": "value"})
    if _has_nul(body["value"]):
        raise Invalid("value must not contain NUL characters", {"field": "value"})
    return StateInput(body["value"], float(ttl) if ttl is not None else None)


def thread_body(tid: str, t: ThreadInput, deleted: bool, ms: int) -> bytes:
    """A thread doc without version and created_at (the script adds them)."""
    return orjson.dumps({"thread_id": tid, "title": t.title, "owner_id": t.owner_id,
                         "metadata": t.metadata, "updated_at": iso(ms), "deleted": deleted})


def message_body(tid: str, mid: str, m: MessageInput, ms: int) -> bytes:
    """A new message doc without seq (the script adds it)."""
    stamp = iso(ms)
    return orjson.dumps({"version": 1, "message_id": mid, "thread_id": tid, "role": m.role,
                         "content": m.content, "metadata": m.metadata, "created_at": stamp,
                         "updated_at": stamp, "deleted": False})


def edited_message(doc: dict[str, Any], changes: dict[str, Any], ms: int) -> dict[str, Any]:
    """The next version of a message doc (field order kept: seq first)."""
    return {**doc, **changes, "version": int(doc["version"]) + 1, "updated_at": iso(ms)}


def deleted_message(doc: dict[str, Any], ms: int) -> dict[str, Any]:
    """A tombstone keeps the seq (no gaps) and drops the text."""
    return edited_message(doc, {"content": "", "metadata": {}, "deleted": True}, ms)


def state_body(key: str, value: Any, expires_at_ms: int | None, deleted: bool, ms: int) -> bytes:
    """A state doc without version (the script adds it)."""
    expires = iso(expires_at_ms) if expires_at_ms is not None else None
    return orjson.dumps({"key": key, "value": None if deleted else value,
                         "expires_at": expires, "updated_at": iso(ms), "deleted": deleted})


def parse_marker(body: Any) -> int:
    """The seq of a read-marker move: {"seq": n}, a whole number from 0 to MAX_CURSOR."""
    body = _object(body)
    _only(body, {"seq"}, {"seq"})
    seq = body["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_CURSOR:
        raise Invalid(f"seq must be a whole number from 0 to {MAX_CURSOR}", {"field": "seq"})
    return seq


def marker_doc(tid: str, uid: str, seq: int, ms: int) -> bytes:
    """A read marker as the log carries it (kind 'r'; its version is its seq)."""
    return orjson.dumps({"thread_id": tid, "user_id": uid, "seq": seq, "updated_at": iso(ms)})
# ---- inbox

InboxKey = tuple[int, str]  # (last activity ms, thread id): inbox order, newest first
MAX_INBOX = 200  # threads in one inbox page
DEFAULT_INBOX = 50


INBOX_CURSOR = r"^[0-9]{1,15}\.[A-Za-z0-9._:-]{1,128}$"  # "<activity ms>.<thread id>"
_INBOX_CURSOR_RE = re.compile(INBOX_CURSOR)


def inbox_cursor(key: InboxKey) -> str:
    """The next_cursor of an inbox page: the position of its last thread (opaque to clients)."""
    return f"{key[0]}.{key[1]}"


def parse_inbox_cursor(raw: str) -> InboxKey:
    """A position as inbox_cursor writes it; Malformed for anything else."""
    if not _INBOX_CURSOR_RE.fullmatch(raw):
        raise Malformed("before is not an inbox cursor (next_cursor of a page)",
                        {"param": "before"})
    ms, _, tid = raw.partition(".")
    return int(ms), tid
