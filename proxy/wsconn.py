"""One WebSocket's side of push: its subscriptions, its bounded send queue and the tasks it
owns. A live event that finds the queue full closes the socket with 4008 (the client resumes
with after_seq); backfills wait for room instead (half the queue stays free for live events)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from aiohttp import WSMsgType, web

from proxy import metrics
from proxy.wsframes import Event, Out

logger = logging.getLogger(__name__)

CLOSE_SLOW = 4008
SLOW_REASON = "slow consumer: resume with after_seq"
CLOSE_GOING_AWAY = 1001
GOING_AWAY_REASON = "sidecar shutting down: resume with after_seq"
CLOSE_TIMEOUT_S = 5.0  # a client that reads nothing loses its socket (aborted) after this


class Connection:
    """One socket: its subscriptions, its bounded send queue, and the tasks it owns (a writer,
    the subscriptions' backfills, the closer), cancelled and awaited by `finish`."""

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport | None,
                 queue_size: int) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[Out] = asyncio.Queue(queue_size)
        self.peak = 0  # the deepest the queue has been
        self.subs: dict[str, Subscription] = {}
        self.closed = False
        self.close_code: int | None = None
        self._transport = transport
        self._half = max(1, queue_size // 2)
        self._ephemeral_room = max(1, queue_size - queue_size // 4)
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.spawn(self._write(), "ws-writer")
        self._closer: asyncio.Task[None] | None = None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def send(self, out: Out) -> bool:
        """Queue a frame; a full queue means the client does not keep up: close it (4008)."""
        if self.closed:
            return False
        try:
            self.queue.put_nowait(out)
        except asyncio.QueueFull:
            metrics.WS_SLOW_CLOSES.inc()
            self.close(CLOSE_SLOW, SLOW_REASON)
            return False
        self.peak = max(self.peak, self.queue.qsize())
        return True

    def offer(self, out: Out) -> bool:
        """For ephemeral frames: queued while the queue is under three quarters full, else
        dropped (counted). A resume would not bring them back, so they never close a socket
        (4008); and the last quarter stays free for stored events."""
        if self.closed:
            return False
        if self.queue.qsize() >= self._ephemeral_room:
            metrics.WS_EPHEMERAL_DROPPED.inc()
            return False
        return self.send(out)

    async def send_paced(self, out: Out) -> bool:
        """For backfills: wait while the queue is half full, so live events keep the rest."""
        while not self.closed and self.queue.qsize() >= self._half:
            self._room.clear()
            await self._room.wait()
        return self.send(out)

    async def _write(self) -> None:
        try:
            while True:
                out = await self.queue.get()
                await self.ws.send_frame(out.frame, WSMsgType.TEXT)
                if self.queue.qsize() < self._half:
                    self._room.set()
                if out.event:
                    metrics.WS_EVENTS.inc()
                if out.ts_ms:
                    metrics.WS_DELIVERY_SECONDS.observe(max(0.0, time.time() - out.ts_ms / 1000))
        except ConnectionError:  # the client went away; the handler's read loop ends too
            self.closed = True

    def close(self, code: int, reason: str) -> None:
        """Stop sending, drop the queue and close the socket with `code` (bounded in time)."""
        if self.closed:
            return
        self.closed, self.close_code = True, code
        self.queue = asyncio.Queue(1)  # the frames held are dropped with the old queue
        for task in self._tasks:
            task.cancel()
        self._closer = self.spawn(self._close(code, reason), "ws-close")

    async def _close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close(code=code, message=reason.encode())
        except TimeoutError:
            if self._transport is not None:  # it reads nothing: drop what is buffered for it
                self._transport.abort()

    async def wait_closed(self) -> None:
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def finish(self) -> None:
        """Cancel what still runs (the closer finishes: it has its own deadline), await all."""
        self.closed = True
        for task in self._tasks:
            if task is not self._closer:
                task.cancel()
        for result in await asyncio.gather(*list(self._tasks), return_exceptions=True):
            if isinstance(result, Exception):
                logger.error("ws connection task failed", exc_info=result)


class Subscription:
    """One thread on one socket. `last_seq`: the last message.created seq delivered (or
    skipped past); `cseq`, for a subscription that follows the changes (after_cseq), the
    position delivered instead (None: it follows seqs). `held` is None when live, else the
    events held back during a sync."""

    def __init__(self, conn: Connection, thread_id: str, cap: int) -> None:
        self.conn, self.thread_id = conn, thread_id
        self.last_seq = 0
        self.cseq: int | None = None
        self.held: deque[Event] | None = deque()  # registered: hold until the first sync ends
        self.hint = 0  # the highest created seq seen but not held (the held deque was full)
        self.again = False  # another backfill round is needed (pub/sub reconnected meanwhile)
        self.task: asyncio.Task[None] | None = None
        self._cap = cap

    def hold(self, ev: Event) -> None:
        assert self.held is not None
        if len(self.held) < self._cap:
            self.held.append(ev)
        elif self.cseq is not None and ev.cseq:  # the replay will read it from the feed
            self.hint = max(self.hint, ev.cseq)
        elif ev.created and self.cseq is None:
            self.hint = max(self.hint, ev.seq)  # the backfill will read it from the hot tier
        else:  # an edit cannot be read back later: the client must resume
            metrics.WS_SLOW_CLOSES.inc()
            self.conn.close(CLOSE_SLOW, SLOW_REASON)
