"""Threads in Redis: one hash per thread (doc, version, last seq, tombstone, unflushed count),
read through from PostgreSQL when it left Redis."""

from __future__ import annotations

import orjson

from proxy import keys, model
from proxy.backends import PG, ThreadRow
from proxy.errors import Conflict, NotFound, PreconditionFailed
from proxy.hot import erasure
from proxy.hot.core import ACKNOWLEDGED, Core, Result, settle


class Threads:
    def __init__(self, core: Core) -> None:
        self._c = core

    async def get(self, tid: str) -> Result:
        t = self._c.thread_keys(tid)[0]
        doc, seq, deleted = await self._c.call(t, "HMGET", t, "doc", "seq", "del")
        tier = "redis"
        if doc is None:
            row, tier = await self._c.below(lambda: self.fill(tid), lambda b: b.load_thread(tid))
            if row is None:
                raise NotFound(f"thread {tid} not found")
            doc, seq, deleted = row.doc, str(row.last_seq).encode(), b"1" if row.deleted else b"0"
        if deleted == b"1":
            raise NotFound(f"thread {tid} was deleted")
        return Result(with_last_seq(doc, int(seq)), tier)

    async def live(self, tid: str) -> bool:
        """The thread exists and is not deleted: Redis's copy decides if it holds one (a thread
        whose creation is not flushed yet, while flushed messages of it left Redis, is only
        there), else PostgreSQL's, filled into Redis."""
        t = self._c.thread_keys(tid)[0]
        deleted = await self._c.call(t, "HGET", t, "del")
        if deleted is not None:
            return bool(deleted == b"0")
        row = await self.fill(tid)
        return row is not None and not row.deleted

    async def fill(self, tid: str) -> ThreadRow | None:
        """Load the thread from the backing into Redis (one load for concurrent misses);
        a fill whose load began before the thread was released again is refused."""
        async def load(token: str) -> ThreadRow | None:
            row = await self._c.backing.load_thread(tid)
            await self._c.failpoints.hit("after-load-before-fill")
            if row is not None:
                await self._c.run("fill_thread", self._fill_keys(tid), [
                    row.doc, row.version, row.created_at, row.last_seq, int(row.deleted),
                    self._c.ttl_ms, token, model.now_ms(), row.owner_id,
                    row.last_activity_ms, row.last_cseq])
                self._c.owners.learn(tid, row.owner_id)
            return row

        return await self._c.flights.do(("t", tid), lambda: self._c.fresh("t", tid, load))

    def _fill_keys(self, tid: str) -> list[str]:
        return self._c.thread_keys(tid)[:3] + [
            self._c.fence_key("t", tid), self._c.recent_key(tid), self._c.overlay_key(tid),
            self._c.changes_key(tid)]

    async def put(self, tid: str, t: model.ThreadInput, if_match: str,
                  durability: str = ACKNOWLEDGED) -> Result:
        return await self._write(tid, t, if_match, "put", durability)

    async def delete(self, tid: str, if_match: str, durability: str = ACKNOWLEDGED,
                     erase: bool = False) -> Result:
        """A tombstone; `erase` (a deleted thread too) also removes the thread's and its
        messages' log entries, dead letters and docs from Redis (thread_put.lua), and the
        sinks remove their content from what they store."""
        return await self._write(tid, model.ThreadInput("", "", {}), if_match, "del", durability,
                                 erase)

    async def _write(self, tid: str, t: model.ThreadInput, if_match: str, op: str,
                     durability: str, erase: bool = False) -> Result:
        self._c.admit()
        s = self._c.shard(tid)
        ks = self._c.thread_keys(tid) + [self._c.fence_key("t", tid), self._c.recent_key(tid),
                                         self._c.overlay_key(tid), keys.dead_letters(s),
                                         keys.cold(s, tid)]

        async def attempt(new: str = "") -> Result | None:
            ms = model.now_ms()
            ahead = await erasure.read_ahead(self._c, s, erasure.of_thread(tid)) if erase else []
            # Inbox: the index keys of the new owner and of the one we believe it has now.
            believed = self._c.owners.get(tid, "" if op == "del" else t.owner_id)
            owner = believed if op == "del" else t.owner_id
            out = await self._c.run("thread_put", ks + [
                self._c.inbox_key(tid, owner), self._c.inbox_key(tid, believed),
                self._c.changes_key(tid)], [
                model.thread_body(tid, t, op == "del", ms), orjson.dumps(model.iso(ms)),
                if_match, new, op, keys.events(s), ms, tid, owner, believed,
                PG.name if erase else "", *ahead])
            status = out[0].decode()
            if status == "OWNER":  # another owner than believed: again with its index key
                self._c.owners.learn(tid, out[1].decode())
                return None
            if status == "MISS" and new:  # the fence moved: the thread was released since
                return None
            if status == "MISS":  # not in Redis: PostgreSQL has it, or it is new
                async with self._c.fenced("t", tid) as fence:  # before the load saying "new"
                    if await self.fill(tid) is not None:
                        return None
                    return await attempt(fence.token)
            if status == "GONE":
                raise (NotFound if op == "del" else Conflict)(f"thread {tid} was deleted")
            if status == "NOTFOUND":
                raise NotFound(f"thread {tid} not found")
            if status == "PRECONDITION":
                raise PreconditionFailed(f"thread {tid} is at version {out[1].decode()}",
                                         {"version": out[1].decode()})
            self._c.owners.learn(tid, owner)
            doc = with_last_seq(out[2], int(out[3]))
            return await self._c.stored("thread", tid, doc, durability, status == "CREATED",
                                        erased=erase)

        return await settle(f"thread {tid}", attempt)


def with_last_seq(doc: bytes, last_seq: int) -> bytes:
    return doc[:-1] + b',"last_seq":' + str(last_seq).encode() + b"}"
