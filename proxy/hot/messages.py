"""Messages in Redis: a hash per thread (docs, versions and fingerprints, unflushed counts) and
the window, a sorted set of the newest messages by seq. Appends assign the thread's next seq in
the script; edits are a compare-and-set on the version. What left Redis is read through from
PostgreSQL and cached again (the window, or the cold cache below it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy import keys, model
from proxy.backends import PG, Backing, MessageRow
from proxy.errors import Conflict, NotFound, PreconditionFailed
from proxy.flights import KeyedLocks
from proxy.hot import erasure
from proxy.hot.core import ACKNOWLEDGED, PERSISTED, Core, Result, settle
from proxy.hot.threads import Threads

Edit = Callable[[dict[str, Any], int], dict[str, Any]]


class Messages:
    def __init__(self, core: Core, threads: Threads) -> None:
        self._c = core
        self._threads = threads
        self._edits = KeyedLocks()

    # ---- append

    async def append(self, tid: str, m: model.MessageInput,
                     durability: str = ACKNOWLEDGED) -> Result:
        self._c.admit()
        mid, ms = m.message_id or model.new_id(), model.now_ms()
        req = _Append(tid, mid, m, ms, model.message_body(tid, mid, m, ms), m.fingerprint(),
                      durability)
        # A generated id is new everywhere; a client's id may be in PostgreSQL only.
        return await settle(f"thread {tid}",
                            lambda: self._append_once(req, "" if m.message_id else "*"))

    async def _append_once(self, req: _Append, checked: str) -> Result | None:
        c, tid = self._c, req.tid
        owner = c.owners.get(tid)  # inbox: its index key goes last
        out = await c.run("message_append", c.thread_keys(tid) + [
            c.fence_key("t", tid), c.recent_key(tid), c.inbox_key(tid, owner),
            c.changes_key(tid)], [
            tid, req.mid, req.body, req.fingerprint, keys.events(c.shard(tid)), req.ms, checked,
            model.ulid_ms(req.mid), int(c.settings.cache.id_clock_skew_s * 1000), owner])
        status = out[0].decode()
        if status == "OWNER":  # another owner than believed: again with its index key
            c.owners.learn(tid, out[1].decode())
            return None
        if status == "MISS":
            if await self._threads.fill(tid) is None:
                raise NotFound(f"thread {tid} not found")
            return None
        if status == "CHECK":
            return None if checked else await self._check(req)  # a stale check: again
        if status == "GONE":
            raise NotFound(f"thread {tid} was deleted")
        if status == "CONFLICT":
            raise Conflict(f"message {req.mid} exists with a different body")
        if status == "DUP":
            doc = out[1] or await self._original(req, out[2:])
            return await c.stored("message", tid, doc, req.durability,
                                  fingerprint=req.fingerprint)
        return await c.stored("message", tid, out[1], req.durability, True, req.fingerprint)

    async def _original(self, req: _Append, known: list[bytes]) -> bytes:
        """The doc of a repeated append whose message left the window: rebuilt from the
        request (same fingerprint, same body) when never edited — no PostgreSQL needed —
        else read through (never from the degraded tier: this answers a write)."""
        version, ts, seq, cseq = (v.decode() for v in known)
        if version == "1" and ts and seq and cseq:
            head = b'{"seq":%d,"cseq":%d,' % (int(float(seq)), int(float(cseq)))
            return head + model.message_body(req.tid, req.mid, req.input, int(ts))[1:]
        return (await self.get(req.tid, req.mid, include_deleted=True, degraded=False)).doc

    async def _check(self, req: _Append) -> Result | None:
        """Is the id in PostgreSQL only? Then this is a repeat; else append under the fence
        of the load that said so (a peer's copy flushed and trimmed meanwhile moves it)."""
        async with self._c.fenced("t", req.tid) as fence:
            row = await self._c.backing.load_message(req.tid, req.mid)
            await self._c.failpoints.hit("after-load-before-fill")
            if row is None:
                return await self._append_once(req, fence.token)
        if row.fingerprint != req.fingerprint:
            raise Conflict(f"message {req.mid} exists with a different body")
        return Result(row.doc, durability=PERSISTED)  # it is in PostgreSQL

    # ---- one message

    async def get(self, tid: str, mid: str, include_deleted: bool = False,
                  degraded: bool = True) -> Result:
        """`degraded` False: not from the degraded tier (a write builds on what it reads)."""
        s = self._c.shard(tid)
        doc = await self._c.run("get_message", [keys.messages(s, tid), keys.cold(s, tid),
                                                keys.thread(s, tid)], [mid])
        if doc == b"GONE":
            raise NotFound(f"thread {tid} was deleted")
        tier = "redis"
        if doc is None:
            row, tier = await self._c.below(
                lambda: self._load_live(tid, mid),
                (lambda b: _degraded_message(b, tid, mid)) if degraded else None)
            if row is None:
                raise NotFound(f"message {mid} not found in thread {tid}")
            doc = row.doc
        # Parsed, not searched: metadata may hold a "deleted": true of its own.
        if not include_deleted and orjson.loads(doc)["deleted"]:
            raise NotFound(f"message {mid} was deleted")
        return Result(doc, tier)

    async def _load_live(self, tid: str, mid: str) -> MessageRow | None:
        """Read through, but only from a thread that exists and is not deleted (its tombstone
        may be in PostgreSQL only, with the message still there)."""
        if not await self._threads.live(tid):
            raise NotFound(f"thread {tid} not found")
        return await self._c.flights.do(("m", tid, mid), lambda: self._load(tid, mid))

    async def _load(self, tid: str, mid: str) -> MessageRow | None:
        async def load(token: str) -> MessageRow | None:
            row = await self._c.backing.load_message(tid, mid)
            await self._c.failpoints.hit("after-load-before-fill")
            if row is not None:
                await self.refill([row], tid, token)
            return row

        return await self._c.fresh("t", tid, load)

    async def refill(self, rows: list[MessageRow], tid: str, token: str) -> None:
        """Cache messages read through (under the load fence `token`, taken before the load):
        in the window if they extend it, else the cold cache."""
        s = self._c.shard(tid)
        args: list[Any] = [self._c.ttl_ms, self._c.settings.redis.window, token]
        for r in rows:
            args += [r.mid, r.seq, r.version, r.fingerprint, r.doc]
        await self._c.run("fill_messages", self._c.thread_keys(tid)[:3] + [
            keys.cold(s, tid), self._c.fence_key("t", tid), self._c.recent_key(tid)], args)

    # ---- edits and tombstones

    async def edit(self, tid: str, mid: str, patch: model.MessagePatch, if_match: str,
                   durability: str = ACKNOWLEDGED) -> Result:
        return await self._update(tid, mid, if_match, durability,
                                  lambda d, ms: model.edited_message(d, patch.fields, ms))

    async def delete(self, tid: str, mid: str, if_match: str,
                     durability: str = ACKNOWLEDGED, erase: bool = False) -> Result:
        """A tombstone; `erase` also removes every earlier version from the log and the
        dead letters (message_update.lua), and the sinks remove it from what they store."""
        return await self._update(tid, mid, if_match, durability, model.deleted_message, erase)

    async def _update(self, tid: str, mid: str, if_match: str, durability: str,
                      change: Edit, erase: bool = False) -> Result:
        """Read, change, compare-and-set on the version; retried on a lost race unless the
        client named the version it expects (then the race is its 412)."""
        self._c.admit()
        # Edits of one message take turns in this process, so concurrent edits do not spend
        # their retries losing the compare-and-set to each other (only to other sidecars).
        async with self._edits.hold((tid, mid)):
            return await settle(f"message {mid}",
                                lambda: self._compare_and_set(tid, mid, if_match, durability,
                                                              change, erase))

    async def _compare_and_set(self, tid: str, mid: str, if_match: str, durability: str,
                               change: Edit, erase: bool = False) -> Result | None:
        # A deleted message may still be erased: its earlier versions hold its content.
        got = await self.get(tid, mid, include_deleted=erase, degraded=False)
        current = orjson.loads(got.doc)
        version = str(current["version"])
        if if_match and if_match != version:
            raise PreconditionFailed(f"message {mid} is at version {version}",
                                     {"version": version})
        ms = model.now_ms()
        new = change(current, ms)
        new.pop("cseq", None)  # the script puts the change's own cseq after the seq
        event = "message.deleted" if new["deleted"] else "message.updated"
        s = self._c.shard(tid)
        ks = self._c.thread_keys(tid) + [keys.cold(s, tid), self._c.recent_key(tid),
                                         self._c.overlay_key(tid), keys.dead_letters(s),
                                         self._c.changes_key(tid)]
        ahead = await erasure.read_ahead(self._c, s, erasure.of_message(tid, mid)) if erase else []
        out = await self._c.run("message_update", ks, [
            tid, mid, version, orjson.dumps(new), new["version"],
            "message.erased" if erase else event, keys.events(s), ms, new["seq"],
            PG.name if erase else "", *ahead])
        status = out[0].decode()
        if status == "OK":
            return await self._c.stored("message", tid, out[3], durability,
                                        fingerprint=out[2].decode(), erased=erase)
        if status == "MISS":
            await self._fill_meta(tid, mid)
        elif status == "GONE":
            raise NotFound(f"thread {tid} was deleted")
        elif if_match:
            raise PreconditionFailed(f"message {mid} changed meanwhile",
                                     {"version": out[1].decode()})
        return None

    async def _fill_meta(self, tid: str, mid: str) -> None:
        """Give Redis the doc and version of a message only PostgreSQL holds, so the edit can
        be checked and applied atomically."""
        if not await self._threads.live(tid):
            raise NotFound(f"thread {tid} not found")
        async with self._c.fenced("t", tid) as fence:
            row = await self._c.backing.load_message(tid, mid)
            await self._c.failpoints.hit("after-load-before-fill")
            if row is None:
                raise NotFound(f"message {mid} not found in thread {tid}")
            await self._c.run("fill_meta", self._c.thread_keys(tid)[:2] + [
                self._c.fence_key("t", tid)], [mid, row.version, row.fingerprint, row.doc,
                                               fence.token])


async def _degraded_message(below: Backing, tid: str, mid: str) -> MessageRow | None:
    thread = await below.load_thread(tid)
    if thread is None or thread.deleted:
        raise NotFound(f"thread {tid} not found")
    return await below.load_message(tid, mid)


@dataclass(frozen=True)
class _Append:
    tid: str
    mid: str
    input: model.MessageInput
    ms: int  # when the body was made: its created_at, and the append time the script keeps
    body: bytes  # the new message's doc without its seq
    fingerprint: str
    durability: str
