"""Read markers in Redis (issue 12.2): per thread, a hash of user -> the seq read up to, moved
forward only by one script that stores, logs and publishes the move (read.updated). A marker
Redis does not know is read through from PostgreSQL under the thread's load fence. Unread =
the thread's live messages after the marker: counted by Redis in the window, and by PostgreSQL
below it (where every message is flushed), less the deletions there not flushed yet."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import orjson

from proxy import keys, model
from proxy.errors import Invalid, NotFound
from proxy.hot.core import ACKNOWLEDGED, Core, Result, settle
from proxy.hot.threads import Threads


@dataclass(frozen=True)
class Marker:
    """A user's read position in a thread; `unread` counts the live messages after it."""

    thread_id: str
    user_id: str
    seq: int
    unread: int
    tier: str = "redis"

    def body(self) -> bytes:
        return orjson.dumps({"thread_id": self.thread_id, "user_id": self.user_id,
                             "seq": self.seq, "unread": self.unread})


class Markers:
    def __init__(self, core: Core, threads: Threads) -> None:
        self._c = core
        self._threads = threads

    async def get(self, tid: str, uid: str) -> Marker:
        return await settle(f"thread {tid}", lambda: self._get_once(tid, uid))

    async def unread(self, tid: str, uid: str) -> int:
        """The user's unread messages in the thread (for the inbox); NotFound if the thread
        is unknown or deleted."""
        return (await self.get(tid, uid)).unread

    async def put(self, tid: str, uid: str, seq: int,
                  durability: str = ACKNOWLEDGED) -> Result:
        """Move the marker to `seq` if that is forward; the answer is the marker now (a doc
        without unread), at the durability it reached."""
        self._c.admit()
        return await settle(f"thread {tid}", lambda: self._put_once(tid, uid, seq, durability))

    async def _call(self, mode: str, tid: str, uid: str, seq: int, doc: bytes,
                    ms: int) -> list[bytes] | None:
        """The script's answer, or None after filling in what it lacked (then again)."""
        c, s = self._c, self._c.shard(tid)
        out: list[bytes] = await c.run("read_marker", c.thread_keys(tid) + [
            c.recent_key(tid), c.overlay_key(tid), keys.markers(s, tid)], [
            mode, uid, seq, doc, keys.events(s), ms, tid])
        status = out[0].decode()
        if status == "MISS":
            if await self._threads.fill(tid) is None:
                raise NotFound(f"thread {tid} not found")
            return None
        if status == "GONE":
            raise NotFound(f"thread {tid} was deleted")
        if status == "AHEAD":
            raise Invalid(f"seq {seq} is past the last seq of thread {tid} "
                          f"({out[1].decode()})", {"field": "seq", "last_seq": int(out[1])})
        if status == "NOMARK":
            await self._fill(tid, uid)
            return None
        return out

    async def _put_once(self, tid: str, uid: str, seq: int, durability: str) -> Result | None:
        ms = model.now_ms()
        out = await self._call("put", tid, uid, seq, model.marker_doc(tid, uid, seq, ms), ms)
        if out is None:
            return None
        # Not moved: the current marker, at the level it reaches (a persisted repeat persists).
        current = int(out[1])
        result = await self._c.stored("marker", tid, model.marker_doc(tid, uid, current, ms),
                                      durability)
        return dataclasses.replace(result, doc=orjson.dumps(
            {"thread_id": tid, "user_id": uid, "seq": current}))

    async def _get_once(self, tid: str, uid: str) -> Marker | None:
        out = await self._call("get", tid, uid, 0, b"", 0)
        if out is None:
            return None
        seq, lo, hi, live = (int(v) for v in out[1:5])
        if lo > hi:
            return Marker(tid, uid, seq, live)
        unflushed_deletions = [m.decode() for m in out[5:]]
        below = await self._c.backing.count_live(tid, lo, hi, unflushed_deletions)
        return Marker(tid, uid, seq, live + below, self._c.backing.tier)

    async def _fill(self, tid: str, uid: str) -> None:
        """The user's marker from PostgreSQL (0: none) into Redis, under the thread's fence."""
        c, s = self._c, self._c.shard(tid)

        async def load(token: str) -> int:
            seq = await c.backing.load_marker(tid, uid) or 0
            await c.failpoints.hit("after-load-before-fill")
            await c.run("fill_marker", [keys.thread(s, tid), keys.markers(s, tid),
                                        c.fence_key("t", tid)], [uid, seq, token, c.ttl_ms])
            return seq

        await c.flights.do(("r", tid, uid), lambda: c.fresh("t", tid, load))
