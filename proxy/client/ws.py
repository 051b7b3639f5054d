"""Subscription: the WebSocket push as an async iterator that resumes by itself.

It keeps, per thread, the seq of the last `message.created` event it handed out. When the
socket ends — the sidecar closes it (1001 shutting down, 4008 slow consumer), the
connection is cut, the heartbeat gets no answer, or a thread's backfill reports
`unavailable` — it reconnects (with backoff under a RetryPolicy) and subscribes every thread
again with `after_seq` = that seq. The server then sends every later message once, in
order; seqs at or below it that still arrive (frames already queued) are dropped. So the
caller sees each message once, in seq order, with no gap.

Not replayed on a resume by seq: `message.updated`/`deleted` and thread events that happened
while disconnected; the backfill carries each message's current version instead. To miss no
change, follow the changes (`after_cseq`): positions are then the last change number (cseq)
handed out, every event with a cseq counts, and a resume replays the current doc of
everything changed since (each change once, in cseq order). A position the server cannot
continue (past the thread's last cseq) raises Resync. `resume=False`: a socket that ends
ends the iteration instead (`last_close_code` says why).

There is no background task: the socket is read inside `__anext__`, so a consumer that
stops iterating stops reading (and may get 4008 and a resume later).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

from proxy.client.errors import (
    ProtocolError,
    TransportError,
    Unavailable,
    error_from_frame,
    error_from_response,
)
from proxy.client.retry import RetryPolicy
from proxy.client.transport import Transport

CREATED = "message.created"
RECONNECT = RetryPolicy(attempts=12, total_s=120.0, base_s=0.05, cap_s=5.0)
_ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


@dataclass(frozen=True, slots=True)
class Event:
    """One pushed event. `seq`: the message's seq (message events) or the thread's last
    seq (thread events); `cseq`: its change number (None on events that are no change);
    `ts_ms`: when a live write was acknowledged (None on backfilled
    messages; an ephemeral event: when accepted); `message`/`thread`: the doc carried, if
    any; `ephemeral`: the `{"type", "data"}` of an "ephemeral" event (live only, never
    replayed on resume, so never in `positions`)."""

    type: str
    thread_id: str
    seq: int | None
    ts_ms: int | None
    message: dict[str, Any] | None
    thread: dict[str, Any] | None
    ephemeral: dict[str, Any] | None = None
    cseq: int | None = None

    @property
    def backfilled(self) -> bool:
        """A message sent on (re)subscribe, in its current version, rather than live."""
        return self.type == CREATED and self.ts_ms is None


def _event(frame: dict[str, Any]) -> Event:
    return Event(frame["type"], frame["thread_id"], frame.get("seq", frame.get("last_seq")),
                 frame.get("ts"), frame.get("message"), frame.get("thread"),
                 frame.get("event"), frame.get("cseq"))


class Subscription:
    """Events of some threads over one socket. `async with client.subscribe("t1") as sub:`
    returns once every thread is subscribed (writes acknowledged after that are delivered);
    then `async for event in sub`. `positions` is the last seq handed out per thread (None:
    nothing yet, live from the subscribe point), or the last cseq with `changes`: persist it
    to resume in a later process. One consumer per subscription (a socket has one reader)."""

    def __init__(self, transport: Transport, threads: dict[str, int | None], *,
                 heartbeat_s: float, retry: RetryPolicy = RECONNECT, changes: bool = False,
                 resume: bool = True) -> None:
        self._t = transport
        self._positions = dict(threads)
        self._heartbeat_s = heartbeat_s
        self._retry = retry
        self._changes = changes  # positions are cseqs (subscribed with after_cseq)
        self._resume = resume
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._subscribed: set[str] = set()  # acknowledged on the current socket
        self._pending: deque[Event] = deque()  # received, not handed out yet
        self._ends = 0  # sockets ended since a frame last arrived: the reconnect's backoff
        self._closed = False
        self.connects = 0  # sockets opened (1 + the number of resumes)
        self.last_close_code: int | None = None  # of the last socket that ended

    @property
    def positions(self) -> dict[str, int | None]:
        return dict(self._positions)

    async def __aenter__(self) -> Subscription:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._closed:
            if self._pending:
                event = self._deliver(self._pending.popleft())
                if event is not None:
                    return event
                continue
            ws = await self._socket()
            frame = await _receive(ws)
            if frame is None:
                await self._lost(ws)
                continue
            self._ends = 0
            try:
                self._on_frame(frame)
            except Unavailable:  # a thread's backfill could not be read: resume later
                if not self._resume:
                    raise
                await self._lost(ws)
        raise StopAsyncIteration

    async def connect(self) -> None:
        """Open the socket and subscribe every thread, unless that is done already."""
        await self._socket()

    async def add(self, thread_id: str, after_seq: int | None = None, *,
                  after_cseq: int = 0) -> None:
        """Follow one more thread on this socket (or again): from `after_seq` (None: live),
        or, on a subscription that follows the changes, from `after_cseq`."""
        self._positions[thread_id] = after_cseq if self._changes else after_seq
        self._subscribed.discard(thread_id)
        await self._send_if_open(self._subscribe_frame(thread_id))

    async def remove(self, thread_id: str) -> None:
        """Stop following a thread; its events still in flight are dropped."""
        self._positions.pop(thread_id, None)
        self._subscribed.discard(thread_id)
        await self._send_if_open({"op": "unsubscribe", "thread_id": thread_id})

    async def _send_if_open(self, frame: dict[str, Any]) -> None:
        """A socket that fails now is ending: the next one subscribes from `positions`."""
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(TransportError):
                await _send(self._ws, frame)

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    # ---- connecting

    async def _socket(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is not None and not self._ws.closed:
            return self._ws
        if self._ends:  # jitter spreads the resumes of a closing sidecar's clients; a socket
            # that keeps ending before any event backs off further instead of spinning
            await asyncio.sleep(self._retry.backoff_s(self._ends))
        self._ws = await self._retry.run(self._open, idempotent=True, write=False)
        self.connects += 1
        return self._ws

    async def _open(self) -> aiohttp.ClientWebSocketResponse:
        """One attempt: connect and subscribe every thread (the socket is closed if that
        fails). A thread the server refuses is dropped and its error raised."""
        ws = await self._connect()
        try:
            async with asyncio.timeout(self._t.timeout_s):
                await self._subscribe_all(ws)
        except TimeoutError as e:
            await ws.close()
            raise TransportError(f"no subscribe reply within {self._t.timeout_s} s",
                                 sent=True) from e
        except BaseException:
            await ws.close()
            raise
        return ws

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        url = self._t.url("v1", "ws")
        try:
            async with asyncio.timeout(self._t.timeout_s):
                return await self._t.session.ws_connect(url, heartbeat=self._heartbeat_s)
        except aiohttp.WSServerHandshakeError as e:
            raise error_from_response(e.status, e.headers or {}, e.message.encode()) from e
        except aiohttp.ClientConnectorError as e:
            raise TransportError(f"websocket {url}: cannot connect: {e}", sent=False) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TransportError(f"websocket {url}: {type(e).__name__}: {e}", sent=True) from e

    async def _subscribe_all(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Subscribe each thread from its position and wait for every reply; events that
        arrive meanwhile are kept for `__anext__`."""
        self._subscribed.clear()
        for tid in list(self._positions):
            await _send(ws, self._subscribe_frame(tid))
        while not self._subscribed >= self._positions.keys():
            frame = await _receive(ws)
            if frame is None:
                raise TransportError(f"socket closed while subscribing (code {ws.close_code})",
                                     sent=True)
            self._on_frame(frame)

    def _subscribe_frame(self, tid: str) -> dict[str, Any]:
        after = self._positions.get(tid)
        frame: dict[str, Any] = {"op": "subscribe", "thread_id": tid}
        return frame if after is None else {
            **frame, ("after_cseq" if self._changes else "after_seq"): after}

    async def _lost(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The socket ended (or must be dropped): the next `__anext__` resumes."""
        self.last_close_code = ws.close_code
        self._ends += 1
        await ws.close()
        if self._ws is ws:
            self._ws = None
        if not self._resume:
            self._closed = True

    # ---- frames

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind, tid = frame.get("type"), frame.get("thread_id")
        if kind == "error":
            self._on_error(frame)
        elif not isinstance(kind, str) or not isinstance(tid, str) or tid not in self._positions:
            return  # a pong, or a thread removed meanwhile
        elif kind == "subscribed":
            self._subscribed.add(tid)
            if self._positions[tid] is None:  # live (by seq): everything after this point
                self._positions[tid] = int(frame["last_seq"])
        else:
            self._pending.append(_event(frame))

    def _on_error(self, frame: dict[str, Any]) -> None:
        """An error naming a thread ended that thread's subscription: `unavailable` is
        resumed (raised for `__anext__` to reconnect); anything else drops the thread."""
        error = error_from_frame(frame)
        if error.thread_id is None:
            raise ProtocolError(f"the server refused a frame of this client: {error}")
        self._subscribed.discard(error.thread_id)
        if not isinstance(error, Unavailable) or not self._resume:
            self._positions.pop(error.thread_id, None)
        raise error

    def _deliver(self, event: Event) -> Event | None:
        """The event, unless its thread was removed or it repeats a seq handed out."""
        if event.thread_id not in self._positions:
            return None
        position = event.cseq if self._changes else (
            event.seq if event.type == CREATED else None)
        if position is not None:
            last = self._positions[event.thread_id]
            if last is not None and position <= last:
                return None
            self._positions[event.thread_id] = position
        return event


async def _send(ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any]) -> None:
    try:
        await ws.send_str(orjson.dumps(frame).decode())
    except (aiohttp.ClientError, ConnectionError) as e:
        raise TransportError(f"websocket send failed: {e}", sent=True) from e


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any] | None:
    """The next JSON frame, or None once the socket has ended."""
    msg = await ws.receive()
    if msg.type in _ENDED:
        return None
    if msg.type is not WSMsgType.TEXT:
        raise ProtocolError(f"unexpected websocket frame {msg.type.name}")
    try:
        frame = orjson.loads(msg.data)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"a websocket frame is not JSON: {e}") from e
    if not isinstance(frame, dict):
        raise ProtocolError("a websocket frame is not a JSON object")
    return frame
