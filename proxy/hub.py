"""WebSocketHub: subscriptions, fan-out from Redis pub/sub, gapless resume, slow-consumer limits.

Every write script PUBLISHes its event on its shard's channel (`keys.events`). Each sidecar
holds ONE pub/sub connection subscribed to every shard's channel (one subscription per shard
per sidecar, whatever the number of clients) and routes each event to the local sockets
subscribed to its thread.

No gap, no duplicate: a subscription remembers the last `message.created` seq it delivered.
While it (re)synchronises, live events are held back; the backfill reads the thread's pages
from the hot tier (Redis, or PostgreSQL below the window) until it has caught up with the
thread's last seq, then the held events are sent with every seq already delivered dropped.
A subscription (re)synchronises when it starts, when a live seq skips ahead, and after the
pub/sub connection is (re)established (events published meanwhile were never received).
`message.updated`/`message.deleted` and thread events are not part of the seq stream: they
pass through in arrival order. Ephemeral events (hot/ephemeral.py) are never held: they go
straight to subscriptions that are live or synchronising, and are dropped, never a reason to
close, when a socket's queue is three quarters full (Connection.offer).
pass through in arrival order. A subscription with after_cseq follows the changes instead
(every event, gapless by cseq: wschanges.py); the same hold/sync/release steps apply.

Bounded memory: each socket has a send queue of `ws.queue_size` frames and one writer task.
A live event that finds the queue full closes the socket with 4008 (the client resumes with
after_seq) and drops its queue. Backfills wait for room instead (half the queue stays free
for live events), and held events are capped at `ws.queue_size` per subscription (created
events past the cap are re-read from the hot tier instead of being held).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import orjson
from aiohttp import web
from redis import exceptions as rexc

from proxy import keys, metrics, topology
from proxy.backoff import Backoff
from proxy.errors import ProxyError, Resync, TooManySubscriptions, Unavailable
from proxy.hot import HotTier
from proxy.redisconn import connect
from proxy.settings import Settings
from proxy.wschanges import ChangeFollower
from proxy.wsconn import (
    CLOSE_GOING_AWAY,
    CLOSE_TIMEOUT_S,
    GOING_AWAY_REASON,
    Connection,
    Subscription,
)
from proxy.wsframes import (
    Event,
    Out,
    backfill_frame,
    error_frame,
    parse_event,
    parse_op,
    reply,
)

logger = logging.getLogger(__name__)

BACKFILL_PAGE = 200
SYNC_RETRIES = 5  # attempts of a backfill round whose reads are unavailable, then `error`
HEARTBEAT_S = 30.0
MAX_FRAME_BYTES = 64 * 1024
_PING = b"tierproxy-hub"
_BACKOFF_BASE_S, _BACKOFF_MAX_S = 0.05, 2.0
_REDIS_DOWN = (rexc.ConnectionError, rexc.TimeoutError, OSError, TimeoutError)


class WebSocketHub:
    def __init__(self, settings: Settings, hot: HotTier) -> None:
        self._s = settings
        self._hot = hot
        self._changes = ChangeFollower(hot)
        self.connections: set[Connection] = set()
        self.by_thread: dict[str, set[Subscription]] = {}
        self._channels = {keys.events(s).encode(): s for s in range(settings.redis.shards)}
        self.subscribed_shards: set[int] = set()
        self.pubsub_connects = 0
        self.closing = False

    # ---- the pub/sub side

    async def run(self) -> None:
        """Receive every shard's events until cancelled; reconnect with backoff."""
        client = connect(self._s, self._s.redis.url, max_connections=2)
        backoff = Backoff(_BACKOFF_BASE_S, _BACKOFF_MAX_S)
        try:
            while True:
                started = time.monotonic()
                try:
                    await self._listen(client)
                except _REDIS_DOWN as e:
                    if time.monotonic() - started > _BACKOFF_MAX_S:  # it was up a while
                        backoff.reset()
                    delay = backoff.failed()
                    if backoff.should_log:
                        logger.warning("%6.2fs ws hub: redis pub/sub lost (%s), reconnecting "
                                       "(attempt %d)", delay, e or type(e).__name__,
                                       backoff.attempt)
                    await asyncio.sleep(delay)
        finally:
            await client.aclose()

    async def _listen(self, client: Any) -> None:
        pubsub: Any = await topology.pubsub(client)  # redis-py leaves PubSub untyped
        self.subscribed_shards.clear()
        self.pubsub_connects += 1
        try:
            await pubsub.subscribe(*self._channels)
            await self._pump(pubsub)
        finally:
            await pubsub.aclose()

    async def _pump(self, pubsub: Any) -> None:
        """Route messages; PING every interval and give up on a connection that stops answering."""
        interval = self._s.redis.health_check_interval_s
        loop = asyncio.get_running_loop()
        last_rx = next_ping = loop.time()
        while True:
            msg = await pubsub.get_message(timeout=interval)
            now = loop.time()
            if msg is not None:
                last_rx = now
                self._on_message(msg)
            if now - last_rx > 3 * interval:
                raise TimeoutError(f"no answer from redis pub/sub for {now - last_rx:.1f} s")
            if now >= next_ping:
                await pubsub.ping(_PING)
                next_ping = now + interval

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "message":
            self.dispatch(msg["data"])
        elif kind == "subscribe":
            shard = self._channels.get(msg["channel"])
            if shard is not None:
                self.subscribed_shards.add(shard)
                self._resync_shard(shard)

    def _resync_shard(self, shard: int) -> None:
        """The shard's channel was (re)subscribed: what was published before may be missed."""
        for tid, subs in self.by_thread.items():
            if keys.shard_of(tid, self._s.redis.shards) == shard:
                for sub in subs:
                    self._resync(sub)

    def dispatch(self, data: bytes) -> None:
        """Route one published event to the local subscriptions of its thread."""
        ev = parse_event(data)
        subs = self.by_thread.get(ev.thread_id) if ev is not None else None
        if ev is None or not subs:
            return
        for sub in tuple(subs):
            self._route(sub, ev)

    def _route(self, sub: Subscription, ev: Event) -> None:
        if ev.ephemeral:  # straight to a live subscription, once `subscribed` was sent
            if sub.task is not None:
                sub.conn.offer(Out(ev.frame, True))
        elif sub.held is not None:
            sub.hold(ev)
        elif sub.cseq is not None:
            if self._changes.live(sub, ev):
                self._start_sync(sub)
        elif not ev.created:
            sub.conn.send(Out(ev.frame, True, ev.ts_ms))
        elif ev.seq == sub.last_seq + 1:
            if sub.conn.send(Out(ev.frame, True, ev.ts_ms)):
                sub.last_seq = ev.seq
        elif ev.seq > sub.last_seq:  # seqs were skipped (missed while disconnected): re-read
            sub.held = deque([ev])
            self._start_sync(sub)

    # ---- synchronising a subscription

    def _resync(self, sub: Subscription) -> None:
        if sub.task is None:  # not started: its first backfill reads Redis after this
            return
        if sub.held is None:
            sub.held = deque()
            self._start_sync(sub)
        else:
            sub.again = True

    def _start_sync(self, sub: Subscription) -> None:
        sub.task = sub.conn.spawn(self._sync(sub), "ws-sync")

    async def _sync(self, sub: Subscription) -> None:
        """Backfill, then release the held events; repeat until nothing was missed. A read
        that is only momentarily unavailable (a read-through that writers kept racing, a
        Redis blip) is tried again before the subscription is given up."""
        backoff = Backoff(0.05, 1.0)
        try:
            while not sub.conn.closed:
                sub.again = False
                try:
                    if sub.cseq is not None:  # follows the changes
                        await self._changes.replay(sub)
                        if await self._changes.release(sub):
                            return
                        continue
                    await self._backfill(sub)
                    if await self._release(sub):
                        return
                except Unavailable:
                    if backoff.attempt >= SYNC_RETRIES:
                        raise
                    await asyncio.sleep(backoff.failed())
        except ProxyError as e:
            self._fail(sub, e)
        except Exception:
            logger.exception("ws hub: backfill of thread %s failed", sub.thread_id)
            self._fail(sub, ProxyError("backfill failed (logged)"))

    async def _backfill(self, sub: Subscription) -> None:
        """Send every message after `last_seq` until caught up with the thread's last seq."""
        while not sub.conn.closed:
            cursor = sub.last_seq
            page = await self._hot.pages.page(sub.thread_id, "after", cursor, BACKFILL_PAGE)
            first = await self._send_run(sub, page.items)
            if sub.last_seq == cursor and page.hi > cursor:
                # Nothing new: seqs cursor+1 .. first-1 exist nowhere; step over them only.
                skip_to = min(first - 1, page.hi) if first else page.hi
                logger.warning("ws hub: thread %s has no messages %d..%d, skipped",
                               sub.thread_id, cursor + 1, skip_to)
                sub.last_seq = skip_to
            if page.hi <= cursor or sub.last_seq >= max(page.last_seq, sub.hint):
                return

    async def _send_run(self, sub: Subscription, docs: list[bytes]) -> int:
        """Send the docs that continue `last_seq` without a hole; a page read through from
        PostgreSQL can lack rows not flushed yet, and the next page starts at the hole (in
        Redis). Returns the first seq past `last_seq` seen (0: none)."""
        first = 0
        for doc in docs:
            seq, frame = backfill_frame(sub.thread_id, doc)
            if seq <= sub.last_seq:
                continue
            first = first or seq
            if seq > sub.last_seq + 1 or not await sub.conn.send_paced(Out(frame, True)):
                break
            sub.last_seq = seq
        return first

    async def _release(self, sub: Subscription) -> bool:
        """Send the held events in order, dropping seqs already sent, then go live. False if
        another backfill round is needed (a seq is missing, or the pub/sub reconnected)."""
        held = sub.held
        assert held is not None
        while held:
            ev = held[0]
            if ev.created and ev.seq > sub.last_seq + 1:
                return False
            held.popleft()
            if ev.created and ev.seq <= sub.last_seq:
                continue
            if not await sub.conn.send_paced(Out(ev.frame, True, ev.ts_ms)):
                return True
            sub.last_seq = ev.seq if ev.created else sub.last_seq
        if sub.again or sub.hint > sub.last_seq:
            return False
        sub.held = None
        return True

    def _fail(self, sub: Subscription, e: ProxyError) -> None:
        """The thread cannot be followed (deleted, a store down): say so and unsubscribe."""
        if self.unsubscribe(sub.conn, sub.thread_id, cancel=False):
            extra = e.detail if isinstance(e, Resync) else {}  # the current cseq
            sub.conn.send(Out(reply("error", code=e.code, message=e.message,
                                    thread_id=sub.thread_id, **extra)))

    # ---- the socket side

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        """The life of one socket: read the client's frames until it or we close."""
        if self.closing:
            raise Unavailable("the sidecar is shutting down")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, compress=False,
                                   max_msg_size=MAX_FRAME_BYTES + self._s.ephemeral.max_event_bytes,
                                   timeout=CLOSE_TIMEOUT_S)
        await ws.prepare(request)
        conn = Connection(ws, request.transport, self._s.ws.queue_size)
        self.connections.add(conn)
        metrics.WS_CONNECTIONS.inc()
        try:
            async for msg in ws:
                await self._on_frame(conn, msg)
        finally:
            for tid in list(conn.subs):
                self.unsubscribe(conn, tid)
            self.connections.discard(conn)
            metrics.WS_CONNECTIONS.dec()
            await conn.finish()
        return ws

    async def _on_frame(self, conn: Connection, msg: Any) -> None:
        op = None
        try:
            op = parse_op(msg)
            if op.op == "subscribe":
                await self.subscribe(conn, op.thread_id, op.after_seq, op.after_cseq)
            elif op.op == "unsubscribe":
                self.unsubscribe(conn, op.thread_id)
            elif op.op == "publish":  # no reply when pushed (a reply streamed token by token)
                await self._hot.ephemeral.publish(op.thread_id, op.event)
            else:
                conn.send(Out(reply("pong")))
        except ProxyError as e:
            conn.send(Out(error_frame(e, op.op if op else "", op.thread_id if op else "")))

    async def subscribe(self, conn: Connection, tid: str, after_seq: int | None,
                        after_cseq: int | None = None) -> None:
        """Register first (live events are held from now on), read the thread's last seq,
        reply, then backfill after `after_seq` (or from the last seq: live only) — or
        replay the changes after `after_cseq`."""
        if tid in conn.subs:
            self.unsubscribe(conn, tid)
        elif len(conn.subs) >= self._s.ws.max_subscriptions:
            raise TooManySubscriptions(
                f"at most {self._s.ws.max_subscriptions} subscriptions per socket")
        sub = Subscription(conn, tid, self._s.ws.queue_size)
        conn.subs[tid] = sub
        self.by_thread.setdefault(tid, set()).add(sub)
        metrics.WS_SUBSCRIPTIONS.inc()
        try:
            last_seq = orjson.loads((await self._hot.threads.get(tid)).doc)["last_seq"]
        except ProxyError:
            self.unsubscribe(conn, tid)
            raise
        if conn.closed:
            return
        conn.send(Out(reply("subscribed", thread_id=tid, last_seq=last_seq)))
        sub.last_seq = last_seq if after_seq is None else after_seq
        sub.cseq = after_cseq
        self._start_sync(sub)

    def unsubscribe(self, conn: Connection, tid: str, cancel: bool = True) -> bool:
        sub = conn.subs.pop(tid, None)
        if sub is None:
            return False
        subs = self.by_thread.get(tid)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.by_thread[tid]
        if cancel and sub.task is not None:
            sub.task.cancel()  # awaited by the connection's finish()
        metrics.WS_SUBSCRIPTIONS.dec()
        return True

    async def shutdown(self) -> None:
        """Close every socket with 1001 (going away); new ones are refused."""
        self.closing = True
        for conn in list(self.connections):
            conn.close(CLOSE_GOING_AWAY, GOING_AWAY_REASON)
        await asyncio.gather(*(c.wait_closed() for c in list(self.connections)),
                             return_exceptions=True)
