"""What the routes call: each operation on the hot tier, or — while Redis is down and
redis.write_through is on (proxy.failover) — the same operation on PostgreSQL alone, with the
same answers and errors (writes answered once committed: X-Durability persisted)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson

from proxy import model
from proxy.backends import PG, Backing, ThreadRow
from proxy.backends.postgres.writethrough import WriteThrough
from proxy.errors import NotFound
from proxy.failover import Failover
from proxy.hot import Feed, HotTier, InboxPage, Marker, Page, Result, page_range
from proxy.hot.changes import resync
from proxy.hot.core import PERSISTED
from proxy.hot.inbox import with_activity
from proxy.hot.threads import with_last_seq

T = TypeVar("T")


class PostgresTier:
    """The hot tier's operations on PostgreSQL alone."""

    def __init__(self, through: WriteThrough, backing: Backing) -> None:
        self._through = through
        self._backing = backing

    async def put_thread(self, tid: str, t: model.ThreadInput, if_match: str,
                         op: str = "put") -> Result:
        row, created = await self._through.put_thread(tid, t, if_match, op)
        return Result(with_last_seq(row.doc, row.last_seq), PG.tier, created, PERSISTED)

    async def get_thread(self, tid: str) -> Result:
        row = await self._live_thread(tid)
        return Result(with_last_seq(row.doc, row.last_seq), PG.tier)

    async def _live_thread(self, tid: str) -> ThreadRow:
        row = await self._backing.load_thread(tid)
        if row is None:
            raise NotFound(f"thread {tid} not found")
        if row.deleted:
            raise NotFound(f"thread {tid} was deleted")
        return row

    async def append(self, tid: str, m: model.MessageInput) -> Result:
        mid = m.message_id or model.new_id()
        row, created = await self._through.append(tid, mid, m, generated=not m.message_id)
        return Result(row.doc, PG.tier, created, PERSISTED)

    async def page(self, tid: str, mode: str, cursor: int, limit: int) -> Page:
        thread = await self._live_thread(tid)
        lo, hi = page_range(mode, cursor, limit, thread.last_seq)
        rows = await self._backing.load_messages(tid, lo, hi) if lo <= hi else []
        return Page(tid, thread.last_seq, lo, hi, [r.doc for r in rows], PG.tier)

    async def changes(self, tid: str, after: int, limit: int) -> Feed:
        thread = await self._live_thread(tid)
        if after > thread.last_cseq:
            raise resync(tid, after, thread.last_cseq)
        rows = await self._backing.load_changes(tid, after, limit)
        upto = rows[-1].cseq if len(rows) == limit else thread.last_cseq
        return Feed(tid, thread.last_cseq, min(upto, thread.last_cseq), rows, PG.tier)

    async def get_message(self, tid: str, mid: str) -> Result:
        await self._live_thread(tid)
        row = await self._backing.load_message(tid, mid)
        if row is None:
            raise NotFound(f"message {mid} not found in thread {tid}")
        if orjson.loads(row.doc)["deleted"]:
            raise NotFound(f"message {mid} was deleted")
        return Result(row.doc, PG.tier)

    async def edit(self, tid: str, mid: str, patch: model.MessagePatch,
                   if_match: str) -> Result:
        row = await self._through.update_message(
            tid, mid, if_match, lambda d, ms: model.edited_message(d, patch.fields, ms))
        return Result(row.doc, PG.tier, False, PERSISTED)

    async def delete_message(self, tid: str, mid: str, if_match: str,
                             erase: bool = False) -> Result:
        """`erase`: the tombstone, the content blanked and its logged changes dropped; the
        erase event takes it out of ClickHouse and, on recovery, of Redis (proxy.services)."""
        row = await self._through.update_message(tid, mid, if_match, model.deleted_message,
                                                 erase)
        return Result(row.doc, PG.tier, False, PERSISTED)

    async def inbox(self, owner: str, before: model.InboxKey | None, limit: int) -> InboxPage:
        """PostgreSQL alone holds every thread now: one range of its inbox index."""
        rows = await self._backing.load_inbox(owner, before, limit)
        items = [with_activity(with_last_seq(r.doc, r.last_seq), r.last_activity_ms)
                 for r in rows]
        cursor = (rows[-1].last_activity_ms, rows[-1].thread_id) if len(rows) == limit else None
        return InboxPage(owner, items, cursor, PG.tier)

    async def put_state(self, key: str, st: model.StateInput, if_match: str) -> Result:
        expires = model.now_ms() + int(st.ttl_s * 1000) if st.ttl_s is not None else None
        row, created = await self._through.put_state(key, st.value, expires, if_match, "put")
        return Result(row.doc, PG.tier, created, PERSISTED)

    async def delete_state(self, key: str, if_match: str) -> Result:
        row, _ = await self._through.put_state(key, None, None, if_match, "del")
        return Result(row.doc, PG.tier, False, PERSISTED)

    async def get_state(self, key: str) -> Result:
        row = await self._backing.load_state(key)
        if row is None or row.deleted or (row.expires_at_ms is not None
                                          and row.expires_at_ms <= model.now_ms()):
            raise NotFound(f"state {key} not found")
        return Result(row.doc, PG.tier)

    async def get_marker(self, tid: str, uid: str) -> Marker:
        thread = await self._live_thread(tid)
        seq = await self._backing.load_marker(tid, uid) or 0
        unread = await self._backing.count_live(tid, seq + 1, thread.last_seq, [])
        return Marker(tid, uid, seq, unread, PG.tier)

    async def put_marker(self, tid: str, uid: str, seq: int) -> Result:
        """Forward only, in PostgreSQL; on recovery the reconciler raises the markers Redis
        caches to PostgreSQL's (proxy.reconcile), so an older one is never served again."""
        current = await self._through.put_marker(tid, uid, seq)
        doc = orjson.dumps({"thread_id": tid, "user_id": uid, "seq": current})
        return Result(doc, PG.tier, False, PERSISTED)


class Tiers:
    def __init__(self, hot: HotTier, postgres: PostgresTier, failover: Failover | None) -> None:
        self._hot = hot
        self._pg = postgres
        self._failover = failover

    async def _serve(self, hot: Callable[[], Awaitable[T]], below: Callable[[], Awaitable[T]],
                     write: bool = True) -> T:
        if self._failover is None:
            return await hot()
        return await self._failover.serve(hot, below, write)

    async def put_thread(self, tid: str, t: model.ThreadInput, if_match: str,
                         durability: str) -> Result:
        return await self._serve(lambda: self._hot.threads.put(tid, t, if_match, durability),
                                 lambda: self._pg.put_thread(tid, t, if_match))

    async def delete_thread(self, tid: str, if_match: str, durability: str,
                            erase: bool = False) -> Result:
        return await self._serve(
            lambda: self._hot.threads.delete(tid, if_match, durability, erase),
            lambda: self._pg.put_thread(tid, model.ThreadInput("", "", {}), if_match,
                                        "erase" if erase else "del"))

    async def get_thread(self, tid: str) -> Result:
        return await self._serve(lambda: self._hot.threads.get(tid),
                                 lambda: self._pg.get_thread(tid), write=False)

    async def append(self, tid: str, m: model.MessageInput, durability: str) -> Result:
        return await self._serve(lambda: self._hot.messages.append(tid, m, durability),
                                 lambda: self._pg.append(tid, m))

    async def page(self, tid: str, mode: str, cursor: int, limit: int) -> Page:
        return await self._serve(lambda: self._hot.pages.page(tid, mode, cursor, limit),
                                 lambda: self._pg.page(tid, mode, cursor, limit), write=False)

    async def changes(self, tid: str, after: int, limit: int) -> Feed:
        return await self._serve(lambda: self._hot.changes.after(tid, after, limit),
                                 lambda: self._pg.changes(tid, after, limit), write=False)

    async def get_message(self, tid: str, mid: str) -> Result:
        return await self._serve(lambda: self._hot.messages.get(tid, mid),
                                 lambda: self._pg.get_message(tid, mid), write=False)

    async def edit(self, tid: str, mid: str, patch: model.MessagePatch, if_match: str,
                   durability: str) -> Result:
        return await self._serve(
            lambda: self._hot.messages.edit(tid, mid, patch, if_match, durability),
            lambda: self._pg.edit(tid, mid, patch, if_match))

    async def delete_message(self, tid: str, mid: str, if_match: str,
                             durability: str, erase: bool = False) -> Result:
        return await self._serve(
            lambda: self._hot.messages.delete(tid, mid, if_match, durability, erase),
            lambda: self._pg.delete_message(tid, mid, if_match, erase))

    async def put_state(self, key: str, st: model.StateInput, if_match: str,
                        durability: str) -> Result:
        return await self._serve(lambda: self._hot.state.put(key, st, if_match, durability),
                                 lambda: self._pg.put_state(key, st, if_match))

    async def delete_state(self, key: str, if_match: str, durability: str) -> Result:
        return await self._serve(lambda: self._hot.state.delete(key, if_match, durability),
                                 lambda: self._pg.delete_state(key, if_match))

    async def get_state(self, key: str) -> Result:
        return await self._serve(lambda: self._hot.state.get(key),
                                 lambda: self._pg.get_state(key), write=False)

    async def put_marker(self, tid: str, uid: str, seq: int, durability: str) -> Result:
        return await self._serve(lambda: self._hot.markers.put(tid, uid, seq, durability),
                                 lambda: self._pg.put_marker(tid, uid, seq))

    async def get_marker(self, tid: str, uid: str) -> Marker:
        return await self._serve(lambda: self._hot.markers.get(tid, uid),
                                 lambda: self._pg.get_marker(tid, uid), write=False)

    async def unread(self, tid: str, uid: str) -> int:
        """The user's unread (live) messages of the thread after their read marker, right
        on every sidecar after any append or delete; NotFound for an unknown or deleted
        thread. For the inbox's `user_id` (one call per thread of a page)."""
        return (await self.get_marker(tid, uid)).unread

    async def inbox(self, owner: str, before: model.InboxKey | None, limit: int) -> InboxPage:
        return await self._serve(lambda: self._hot.inbox.page(owner, before, limit),
                                 lambda: self._pg.inbox(owner, before, limit), write=False)

