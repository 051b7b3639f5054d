"""The inbox: an owner's threads, newest activity first, in pages below a cursor.

Redis keeps, per shard, an index of each owner's threads by last activity (the thread scripts
update it in the same call as the write, so it covers every unflushed change); PostgreSQL
holds every thread's flushed last activity (threads_inbox index). A page asks each shard's
index and PostgreSQL for the top `limit` below the cursor (all in one loop tick), then asks
each shard what its thread hashes say of every candidate: a hash outlives every unflushed
change of its thread, so where there is one its activity, tombstone, owner and doc win;
where there is none, PostgreSQL's row is current. The merged order is certain down to the
lowest entry of any source that may hold more; a page short of `limit` past that asks again
below it. O(shards x limit) per page, whatever the owner's thread count."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from proxy import keys, model
from proxy.backends import ThreadRow
from proxy.hot.core import Core
from proxy.hot.threads import with_last_seq
from proxy.model import InboxKey

ROUNDS = 4  # asks below the certain part of a short page; then the page ends short


@dataclass(frozen=True)
class InboxPage:
    owner_id: str
    items: list[bytes]  # thread docs with last_seq and last_activity_at
    next_cursor: InboxKey | None
    tier: str


@dataclass
class _Round:
    """One ask of every source: candidates by tid, and how far each source's answer is
    complete (its lowest entry when it answered `limit`: more may follow below it)."""

    found: dict[str, tuple[InboxKey, bytes]] = field(default_factory=dict)
    lows: list[InboxKey] = field(default_factory=list)
    from_postgres: bool = False

    def certain(self) -> tuple[list[tuple[InboxKey, bytes]], InboxKey | None]:
        """The candidates no unseen thread can rank above, newest first, and that bound
        (None: every source is exhausted)."""
        bound = max(self.lows) if self.lows else None
        items = sorted((v for v in self.found.values() if bound is None or v[0] >= bound),
                       reverse=True)
        return items, bound


class Inbox:
    def __init__(self, core: Core) -> None:
        self._c = core

    async def page(self, owner: str, before: InboxKey | None, limit: int) -> InboxPage:
        items: list[tuple[InboxKey, bytes]] = []
        pos, tier = before, "redis"
        for _ in range(ROUNDS):
            need = limit - len(items)
            r = await self._round(owner, pos, need)
            tier = self._c.backing.tier if r.from_postgres else tier
            certain, bound = r.certain()
            items += certain[:need]
            if len(certain) >= need:
                more = len(certain) > need or bound is not None
                return self._page(owner, items, items[-1][0] if more else None, tier)
            if bound is None:
                return self._page(owner, items, None, tier)
            pos = bound  # everything from pos to bound is in `items`: ask below it
        return self._page(owner, items, pos, tier)

    @staticmethod
    def _page(owner: str, items: list[tuple[InboxKey, bytes]], cursor: InboxKey | None,
              tier: str) -> InboxPage:
        return InboxPage(owner, [doc for _, doc in items], cursor, tier)

    async def _round(self, owner: str, pos: InboxKey | None, limit: int) -> _Round:
        shards = range(self._c.settings.redis.shards)
        ms, tid = ("+inf", "") if pos is None else pos
        scans, rows = await asyncio.gather(
            asyncio.gather(*(self._c.run("inbox_scan", [keys.inbox(s, owner)], [ms, tid, limit])
                             for s in shards)),
            self._c.backing.load_inbox(owner, pos, limit))
        r = _Round()
        if len(rows) == limit:
            r.lows.append((rows[-1].last_activity_ms, rows[-1].thread_id))
        scored: dict[str, int] = {}
        for scan in scans:
            pairs = [(scan[i].decode(), int(float(scan[i + 1]))) for i in range(0, len(scan), 2)]
            scored.update(pairs)
            if len(pairs) == limit:
                r.lows.append((pairs[-1][1], pairs[-1][0]))
        pg = {row.thread_id: row for row in rows}
        await self._check(owner, scored, pg, pos, r)
        return r

    async def _check(self, owner: str, scored: dict[str, int], pg: dict[str, ThreadRow],
                     pos: InboxKey | None, r: _Round) -> None:
        """Ask each shard about its candidates; keep what is live, below the cursor."""
        by_shard: dict[int, list[str]] = {}
        for tid in scored.keys() | pg.keys():
            by_shard.setdefault(self._c.shard(tid), []).append(tid)
        answers = await asyncio.gather(*(
            self._c.run("inbox_check", [keys.inbox(s, owner)] + [
                keys.thread(s, t) for t in tids], [owner, *tids])
            for s, tids in by_shard.items()))
        for tids, out in zip(by_shard.values(), answers, strict=True):
            for i, tid in enumerate(tids):
                state, doc, seq, la = out[4 * i:4 * i + 4]
                row = pg.get(tid)
                if state == b"live":
                    ms = max(int(la), scored.get(tid, 0), row.last_activity_ms if row else 0)
                    item = (ms, tid), with_last_seq(doc, int(seq))
                elif state == b"none" and row is not None:
                    item = (row.last_activity_ms, tid), with_last_seq(row.doc, row.last_seq)
                    r.from_postgres = True
                else:
                    continue
                if pos is None or item[0] < pos:
                    r.found[tid] = item[0], with_activity(item[1], item[0][0])


def with_activity(doc: bytes, ms: int) -> bytes:
    """A thread doc (with last_seq) as the inbox lists it."""
    return doc[:-1] + b',"last_activity_at":"' + model.iso(ms).encode() + b'"}'
