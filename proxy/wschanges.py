"""Subscriptions that follow a thread's changes (subscribe with after_cseq): every change of
the thread or one of its messages has the thread's next cseq, gapless, so a subscription
delivers each exactly once by remembering the last cseq it delivered (`Subscription.cseq`).

A replay reads the changes feed (the current doc of each entity changed after the position)
and sends each doc as the event of its latest change; live events held meanwhile are then
released in cseq order, those already covered dropped. A live cseq that skips ahead starts
another replay. A position past the thread's last cseq (a Redis that lost data, or erased
history) cannot be continued: the subscription ends with a `resync` error frame carrying the
thread's current cseq. Events without a cseq (not changes) pass through as they come."""

from __future__ import annotations

from collections import deque

from proxy.hot import HotTier
from proxy.wsconn import Subscription
from proxy.wsframes import Event, Out, change_frame

REPLAY_PAGE = 200


class ChangeFollower:
    def __init__(self, hot: HotTier) -> None:
        self._hot = hot

    @staticmethod
    def live(sub: Subscription, ev: Event) -> bool:
        """Deliver a live event; True when a cseq was skipped (the caller replays)."""
        assert sub.cseq is not None
        if not ev.cseq:
            sub.conn.send(Out(ev.frame, True, ev.ts_ms))
        elif ev.cseq == sub.cseq + 1:
            if sub.conn.send(Out(ev.frame, True, ev.ts_ms)):
                sub.cseq = ev.cseq
        elif ev.cseq > sub.cseq:
            sub.held = deque([ev])
            return True
        return False

    async def replay(self, sub: Subscription) -> None:
        """Send the current doc of everything changed after `sub.cseq`, by cseq, until caught
        up with the thread's last cseq (Resync if the position is past it)."""
        assert sub.cseq is not None
        while not sub.conn.closed:
            feed = await self._hot.changes.after(sub.thread_id, sub.cseq, REPLAY_PAGE)
            for item in feed.items:
                frame = change_frame(sub.thread_id, item.member, item.cseq, item.doc)
                if not await sub.conn.send_paced(Out(frame, True)):
                    return
                sub.cseq = item.cseq  # every change up to it is covered by what was sent
            sub.cseq = max(sub.cseq, feed.upto)
            if sub.cseq >= max(feed.last_cseq, sub.hint):
                return

    @staticmethod
    async def release(sub: Subscription) -> bool:
        """Send the held events in cseq order, dropping those the replay covered, then go
        live. False if another replay is needed (a cseq is missing)."""
        held = sub.held
        assert held is not None and sub.cseq is not None
        while held:
            ev = held[0]
            if ev.cseq > sub.cseq + 1:
                return False
            held.popleft()
            if ev.cseq and ev.cseq <= sub.cseq:
                continue
            if not await sub.conn.send_paced(Out(ev.frame, True, ev.ts_ms)):
                return True
            sub.cseq = ev.cseq or sub.cseq
        if sub.again or sub.hint > sub.cseq:
            return False
        sub.held = None
        return True
