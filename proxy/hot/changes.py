"""The changes feed of a thread: the current doc of every entity (the thread, its messages)
whose latest change has a cseq after a position, in cseq order. From Redis alone (the changes
set) when it holds everything after the position; else PostgreSQL's rows, with what Redis
holds newer winning (every unflushed change is in the changes set, with its doc)."""

from __future__ import annotations

from dataclasses import dataclass

from proxy import keys
from proxy.backends import ChangeRow
from proxy.errors import NotFound, Resync
from proxy.hot.core import Core, settle
from proxy.hot.threads import Threads


@dataclass(frozen=True)
class Feed:
    """A page of the feed: `items` by cseq; every change up to `upto` is covered by them (the
    next page starts after it); `last_cseq` is the thread's last change number."""

    thread_id: str
    last_cseq: int
    upto: int
    items: list[ChangeRow]
    tier: str


class Changes:
    def __init__(self, core: Core, threads: Threads) -> None:
        self._c = core
        self._threads = threads

    async def after(self, tid: str, after: int, limit: int) -> Feed:
        return await settle(f"thread {tid}", lambda: self._attempt(tid, after, limit))

    async def _attempt(self, tid: str, after: int, limit: int) -> Feed | None:
        s = self._c.shard(tid)
        out = await self._c.run("read_changes", [
            keys.thread(s, tid), keys.messages(s, tid), keys.changes(s, tid),
            keys.cold(s, tid)], [after, limit])
        status = out[0].decode()
        if status == "GONE":
            raise NotFound(f"thread {tid} was deleted")
        if status == "MISS":
            row = await self._threads.fill(tid)
            if row is None or row.deleted:
                raise NotFound(f"thread {tid} not found")
            return None  # filled: read Redis again
        if status == "AHEAD":
            raise resync(tid, after, int(out[1]))
        last, n = int(out[1]), int(out[2])
        held = [ChangeRow(out[i].decode(), int(float(out[i + 1])), out[i + 2])
                for i in range(3, 3 + 3 * n, 3)]
        if status == "OK":
            upto = held[-1].cseq if n == limit else last
            return Feed(tid, last, min(upto, last), held, "redis")
        return await self._below(tid, after, limit, last, held)

    async def _below(self, tid: str, after: int, limit: int, last: int,
                     held: list[ChangeRow]) -> Feed:
        """PostgreSQL's rows after `after`, merged with Redis's: a row Redis has at a newer
        cseq is left out (it comes at that cseq); the page covers up to what both sides
        surely answered in full."""
        rows = await self._c.backing.load_changes(tid, after, limit)
        newer = await self._scores(tid, [r.member for r in rows])
        best = {h.member: h for h in held if h.doc}
        for r in rows:
            known = best.get(r.member)
            if (known is None or known.cseq < r.cseq) and newer.get(r.member, 0) <= r.cseq:
                best[r.member] = r
        upto = last
        for side in (held, rows):
            if len(side) == limit:
                upto = min(upto, side[-1].cseq)
        items = sorted((c for c in best.values() if c.cseq <= upto), key=lambda c: c.cseq)
        if len(items) > limit:
            items = items[:limit]
            upto = items[-1].cseq
        return Feed(tid, last, upto, items, self._c.backing.tier)

    async def _scores(self, tid: str, members: list[str]) -> dict[str, int]:
        """The cseq at which the changes set holds each member now (absent: not held)."""
        if not members:
            return {}
        key = self._c.changes_key(tid)
        scores = await self._c.call(key, "ZMSCORE", key, *members)
        return {m: int(float(v)) for m, v in zip(members, scores, strict=True) if v is not None}


def resync(tid: str, after: int, last: int) -> Resync:
    return Resync(f"thread {tid} has no change {after}: its last is {last}; start again from "
                  f"the current state", {"cseq": last})
