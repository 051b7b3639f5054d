"""The WebSocket protocol's frames: client ops parsed and validated, published events read,
server frames built. No I/O here (see hub.py)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from aiohttp import WSMsgType

from proxy import model
from proxy.errors import Invalid, Malformed, ProxyError, RateLimited, UnknownOp

logger = logging.getLogger(__name__)

CREATED = "message.created"
EPHEMERAL = "ephemeral"
# What the write scripts publish starts like this; anything else is parsed as JSON.
_EVENT_HEAD = re.compile(
    rb'\{"type":"([a-z.]+)","thread_id":"([A-Za-z0-9._:-]+)","(?:last_)?seq":(\d+),"ts":(\d+)'
    rb'(?:,"cseq":(\d+))?[,}]')
# What ephemeral_publish.lua publishes (the frame hot/ephemeral.py builds) starts like this.
_EPHEMERAL_HEAD = re.compile(rb'\{"type":"ephemeral","thread_id":"([A-Za-z0-9._:-]+)","ts":(\d+),')
_LONG_NUMBER = re.compile(r"\d{19}")  # 19+ digits: an integer that may not fit in 64 bits
_OPS = {"subscribe": {"op", "thread_id", "after_seq", "after_cseq"},
        "unsubscribe": {"op", "thread_id"}, "ping": {"op"},
        "publish": {"op", "thread_id", "event"}}


@dataclass(frozen=True, slots=True)
class Event:
    """One published event; `frame` is sent to clients as published."""

    type: str
    thread_id: str
    seq: int  # the message's seq (message events) or the thread's last_seq (thread events)
    ts_ms: int  # when the write was acknowledged
    frame: bytes
    cseq: int = 0  # the change's number in its thread (0: an event that is no change)

    @property
    def created(self) -> bool:
        return self.type == CREATED

    @property
    def ephemeral(self) -> bool:
        """Live only: never held for a backfill, never replayed, not in the seq stream."""
        return self.type == EPHEMERAL


def parse_event(data: bytes) -> Event | None:
    m = _EVENT_HEAD.match(data)
    if m:
        return Event(m[1].decode(), m[2].decode(), int(m[3]), int(m[4]), data, int(m[5] or 0))
    m = _EPHEMERAL_HEAD.match(data)
    if m:
        return Event(EPHEMERAL, m[1].decode(), 0, int(m[2]), data)
    try:
        doc = orjson.loads(data)
        seq = doc.get("seq", doc.get("last_seq", 0))
        return Event(doc["type"], doc["thread_id"], int(seq), int(doc.get("ts", 0)), data,
                     int(doc.get("cseq", 0)))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        logger.warning("ws hub: ignoring an event that is not one: %r", data[:200])
        return None


def backfill_frame(tid: str, doc: bytes) -> tuple[int, bytes]:
    """A stored message doc as the `message.created` frame of its seq (current version)."""
    seq = int(orjson.loads(doc)["seq"])
    head = b'{"type":"message.created","thread_id":"%s","seq":%d,"message":' % (tid.encode(), seq)
    return seq, head + doc + b"}"


def change_frame(tid: str, member: str, cseq: int, doc: bytes) -> bytes:
    """An entity's current doc from the changes feed (member '': the thread) as the event of
    its latest change, `cseq`: created at version 1, else updated, or deleted."""
    d = orjson.loads(doc)
    kind = "message" if member else "thread"
    what = "deleted" if d["deleted"] else "created" if d["version"] == 1 else "updated"
    head = orjson.dumps({"type": f"{kind}.{what}", "thread_id": tid, "cseq": cseq,
                         **({"seq": d["seq"]} if member else {})})
    return head[:-1] + b',"%s":' % kind.encode() + doc + b"}"


def reply(kind: str, **fields: Any) -> bytes:
    return orjson.dumps({"type": kind, **fields})


def error_frame(e: ProxyError, op: str, tid: str) -> bytes:
    """An error frame. One answering a publish says so (`op`), so that its `thread_id` is not
    taken for the end of that thread's subscription; a rate refusal says when to retry."""
    extra: dict[str, Any] = {"thread_id": tid} if tid else {}
    if op == "publish":
        extra["op"] = op
    if isinstance(e, RateLimited):
        extra["retry_after_ms"] = max(1, round(e.retry_after_s * 1000))
    return reply("error", code=e.code, message=e.message, **extra)


class Out(NamedTuple):
    frame: bytes
    event: bool = False  # counted in the events-sent metric
    ts_ms: int = 0  # > 0: a live event; its delivery latency is observed when sent


@dataclass(frozen=True, slots=True)
class Op:
    op: str
    thread_id: str
    after_seq: int | None
    event: Any = None  # publish: the event, validated by the hot tier (as over HTTP)
    after_cseq: int | None = None


def parse_op(msg: Any) -> Op:
    """A client frame, validated: Malformed / UnknownOp / Invalid name what is wrong."""
    if msg.type is not WSMsgType.TEXT:
        raise Malformed("send text frames, each holding one JSON object")
    try:
        doc = orjson.loads(msg.data)
    except orjson.JSONDecodeError as e:
        raise Malformed(f"the frame is not valid JSON: {e}") from e
    if _LONG_NUMBER.search(msg.data):  # as routes.read_json: an integer beyond 64 bits is
        doc = json.loads(msg.data)  # kept exact (orjson rounds it), so validation refuses it
    if not isinstance(doc, dict):
        raise Malformed("a frame must be a JSON object")
    op = doc.get("op")
    allowed = _OPS.get(op) if isinstance(op, str) else None
    if allowed is None:
        raise UnknownOp(f"unknown op {op!r}: use subscribe, unsubscribe, publish or ping")
    for name in doc:
        if name not in allowed:
            raise Invalid(f"unknown field {name!r} for op {op}", {"field": name})
    tid = "" if op == "ping" else _thread_id(doc.get("thread_id"))
    if op == "publish" and "event" not in doc:
        raise Invalid("publish needs an event {\"type\", \"data\"}", {"field": "event"})
    if doc.get("after_seq") is not None and doc.get("after_cseq") is not None:
        raise Invalid("give either after_seq or after_cseq, not both", {"field": "after_cseq"})
    return Op(str(op), tid, _after_seq(doc.get("after_seq")), doc.get("event"),
              _after_seq(doc.get("after_cseq"), "after_cseq"))


def _thread_id(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("thread_id must be a string", {"field": "thread_id"})
    return model.check_id(value, "thread_id")


def _after_seq(value: Any, name: str = "after_seq") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= model.MAX_CURSOR:
        raise Invalid(f"{name} must be a whole number >= 0", {"field": name})
    return value


