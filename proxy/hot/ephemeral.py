"""Ephemeral events (a typing indicator, an assistant's reply streamed token by token): checked
against the thread and its rate, then PUBLISHed on the shard's event channel by one script, so
every sidecar's hub pushes them to the thread's live subscribers. Never stored, never logged:
so never flushed, never replayed on resume. What Redis keeps is the thread's rate counter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from proxy import keys, metrics, model
from proxy.errors import Invalid, NotFound, RateLimited, TooLarge
from proxy.hot.core import Core, settle
from proxy.hot.threads import Threads

_TYPE_RE = re.compile(keys.EVENT_TYPE_PATTERN)
_FIELDS = ("type", "data")


@dataclass(frozen=True)
class Published:
    thread_id: str
    type: str
    ts_ms: int  # when it was accepted (the frame's `ts`)

    def body(self) -> bytes:
        return orjson.dumps({"thread_id": self.thread_id, "type": self.type, "ts": self.ts_ms})


def parse_event(doc: Any, max_bytes: int) -> tuple[str, bytes]:
    """The event's type and its JSON `{"type", "data"}` as pushed (`data` absent: null).
    Invalid (422) names a bad field; TooLarge (413): the JSON is over `max_bytes`."""
    if not isinstance(doc, dict):
        raise Invalid("the event must be a JSON object", {"field": "event"})
    for name in doc:
        if name not in _FIELDS:
            raise Invalid(f"unknown field {name!r}", {"field": name})
    kind = doc.get("type")
    if not isinstance(kind, str) or not _TYPE_RE.fullmatch(kind):
        raise Invalid("type must match [A-Za-z0-9._:-]{1,64}", {"field": "type"})
    try:
        encoded = orjson.dumps({"type": kind, "data": doc.get("data")})
    except orjson.JSONEncodeError as e:  # an integer beyond 64 bits (the JSON parse kept it)
        raise Invalid(f"data cannot be pushed: {e}", {"field": "data"}) from e
    if len(encoded) > max_bytes:
        raise TooLarge(f"the event is larger than {max_bytes} bytes "
                       "(ephemeral.max_event_bytes)", {"field": "data", "limit": max_bytes})
    return kind, encoded


class Ephemerals:
    def __init__(self, core: Core, threads: Threads) -> None:
        self._c = core
        self._threads = threads

    async def publish(self, tid: str, doc: Any) -> Published:
        """Push `doc` ({"type", "data"}) to the thread's subscribers: NotFound for an unknown
        or deleted thread, RateLimited over the thread's rate; either way nothing is sent."""
        cfg = self._c.settings.ephemeral
        kind, event = parse_event(doc, cfg.max_event_bytes)
        s = self._c.shard(tid)
        ks = [keys.thread(s, tid), keys.ephemeral_rate(s, tid)]

        async def attempt() -> Published | None:
            ts = model.now_ms()
            frame = b'{"type":"ephemeral","thread_id":"%s","ts":%d,"event":%s}' % (
                tid.encode(), ts, event)
            out = await self._c.run("ephemeral_publish", ks, [
                keys.events(s), frame, 1000.0 / cfg.rate_per_s, cfg.burst])
            status = out[0].decode()
            if status == "MISS":  # not in Redis: PostgreSQL may have it
                if await self._threads.fill(tid) is None:
                    raise NotFound(f"thread {tid} not found")
                return None
            if status == "GONE":
                raise NotFound(f"thread {tid} was deleted")
            if status == "RATE":
                metrics.EPHEMERAL.labels("rate_limited").inc()
                raise RateLimited(
                    f"thread {tid}: ephemeral events over {cfg.rate_per_s:g}/s "
                    f"(burst {cfg.burst})", int(out[1]) / 1000, {"retry_after_ms": int(out[1])})
            metrics.EPHEMERAL.labels("published").inc()
            return Published(tid, kind, ts)

        return await settle(f"thread {tid}", attempt)
