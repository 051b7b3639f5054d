"""Pages of a thread's messages by seq, in one script call when the window holds them; below
the window (everything there is flushed) from PostgreSQL, cached again; while PostgreSQL is
down, from the degraded tier."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from proxy import model
from proxy.backends import MessageRow, ThreadRow
from proxy.errors import NotFound
from proxy.hot.core import Core, settle
from proxy.hot.messages import Messages
from proxy.hot.threads import Threads


@dataclass(frozen=True)
class Page:
    thread_id: str
    last_seq: int
    lo: int
    hi: int
    items: list[bytes]
    tier: str


class Pages:
    def __init__(self, core: Core, threads: Threads, messages: Messages) -> None:
        self._c = core
        self._threads = threads
        self._messages = messages

    async def page(self, tid: str, mode: str, cursor: int, limit: int) -> Page:
        """mode 'latest' (cursor unused), 'after' or 'before' the cursor seq."""
        return await settle(f"thread {tid}", lambda: self._attempt(tid, mode, cursor, limit))

    async def _attempt(self, tid: str, mode: str, cursor: int, limit: int) -> Page | None:
        out = await self._c.run("read_page", self._c.thread_keys(tid)[:3] + [
            self._c.overlay_key(tid)], [mode, cursor, limit])
        status = out[0].decode()
        if status == "GONE":
            raise NotFound(f"thread {tid} was deleted")
        if status == "MISS":
            row, tier = await self._c.below(lambda: self._threads.fill(tid),
                                            lambda b: b.load_thread(tid))
            if row is None or row.deleted:
                raise NotFound(f"thread {tid} not found")
            if tier == self._c.backing.tier:
                return None  # filled: read the window again
            return await self._degraded(tid, row, mode, cursor, limit)
        last, lo, hi, floor, n = (int(v) for v in out[1:6])
        window = list(out[6:6 + n])
        if status == "OK":
            return Page(tid, last, lo, hi, window, "redis")
        return await self._below(tid, last, lo, hi, floor, window, list(out[6 + n:]))

    async def _below(self, tid: str, last: int, lo: int, hi: int, floor: int,
                     window_docs: list[bytes], overlay: list[bytes]) -> Page:
        """Seqs lo..floor-1 from below Redis (all flushed, but for the unflushed edits of the
        overlay, which win), floor..hi from the window (which holds every unflushed message:
        read-your-writes)."""
        top = min(hi, floor - 1)
        rows, tier = await self._c.below(
            lambda: self._c.flights.do(("p", tid, lo, top),
                                       functools.partial(self._load, tid, lo, top)),
            lambda b: b.load_messages(tid, lo, top))
        edited = {model.seq_of(doc): doc for doc in overlay}
        below = [edited.get(r.seq, r.doc) for r in rows]
        return Page(tid, last, lo, hi, below + window_docs, tier)

    async def _load(self, tid: str, lo: int, hi: int) -> list[MessageRow]:
        async def load(token: str) -> list[MessageRow]:
            rows = await self._c.backing.load_messages(tid, lo, hi)
            await self._c.failpoints.hit("after-load-before-fill")
            if rows:
                await self._messages.refill(rows, tid, token)
            return rows

        return await self._c.fresh("t", tid, load)

    async def _degraded(self, tid: str, thread: ThreadRow, mode: str, cursor: int,
                        limit: int) -> Page:
        """The page when neither Redis nor the backing has the thread: from the degraded tier."""
        assert self._c.degraded is not None
        lo, hi = page_range(mode, cursor, limit, thread.last_seq)
        rows = await self._c.degraded.load_messages(tid, lo, hi) if lo <= hi else []
        return Page(tid, thread.last_seq, lo, hi, [r.doc for r in rows], self._c.degraded.tier)


def page_range(mode: str, cursor: int, limit: int, last: int) -> tuple[int, int]:
    """The seqs lo..hi of a page (as read_page.lua computes them); lo > hi: empty."""
    if mode == "after":
        return cursor + 1, min(last, cursor + limit)
    hi = min(cursor - 1, last) if mode == "before" else last
    return max(1, hi - limit + 1), hi
