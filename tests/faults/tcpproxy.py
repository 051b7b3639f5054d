"""A small asyncio TCP fault proxy (toxiproxy-like) to put faults between the sidecar and Redis/PG.

The proxy runs its own event loop in a daemon thread, so sync tests, async tests (on any loop)
and a sidecar running in a subprocess can all go through it. Control methods are thread-safe
and synchronous: when they return, the fault is in effect (after ``set_mode("down")`` or
``cut()`` no connection is open any more).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Literal, get_args

Mode = Literal["pass", "down", "blackhole", "drop_replies", "hold_replies"]
MODES: tuple[str, ...] = get_args(Mode)
_CHUNK_BYTES = 64 * 1024
_CONTROL_TIMEOUT_S = 10.0
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on with 0 s: closing sends RST, not FIN


class FaultProxy:
    """Forwards 127.0.0.1:listen_port -> (upstream_host, upstream_port), with faults on demand.

    Modes: ``pass`` forwards; ``down`` resets every open connection and resets new ones as soon
    as they are accepted; ``blackhole`` keeps sockets open but discards bytes both ways, no RST
    (toxiproxy ``timeout 0``); ``drop_replies`` forwards client->upstream and discards
    upstream->client (an ambiguous ack); ``hold_replies`` forwards client->upstream and holds
    upstream->client back until the mode changes (a reply stalled after the work was done).
    Discarded bytes are gone, so a stream healed back to ``pass`` may be out of step: ``cut()``
    on heal if the client would not notice by itself. Latency delays each chunk in each
    direction, one chunk after another. Either side's EOF closes both sides (no half-close).
    """

    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0) -> None:
        self.port = listen_port  # the actual port once start() returns
        self.errors: list[dict[str, Any]] = []  # unexpected errors on the proxy loop
        self._upstream = (upstream_host, upstream_port)
        self._mode: Mode = "pass"
        self._latency_ms = (0.0, 0.0)  # (delay, jitter)
        self._links: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._released: asyncio.Event | None = None  # clear while replies are held
        self.held = 0  # replies waiting now in hold_replies mode

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    def start(self) -> None:
        """Bind the listen port and start forwarding; returns once the port accepts."""
        if self._thread is not None:
            raise RuntimeError("fault proxy: start() called twice")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        name = f"fault-proxy->{self._upstream[0]}:{self._upstream[1]}"
        self._thread = threading.Thread(target=self._run, args=(ready,), name=name, daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=_CONTROL_TIMEOUT_S)
        finally:
            if not ready.done() or ready.exception() is not None:
                self._thread.join(timeout=_CONTROL_TIMEOUT_S)

    def stop(self) -> None:
        """Close the listener and every connection, join the thread; raise if the loop erred."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=_CONTROL_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"fault proxy {self.port}: thread did not stop")
        if self.errors:
            raise RuntimeError(f"fault proxy {self.port}: errors on its loop: {self.errors}")

    def set_mode(self, mode: Mode) -> None:
        """Switch fault mode (see the class docstring); "down" resets open connections first."""
        if mode not in MODES:
            raise ValueError(f"fault proxy: unknown mode {mode!r}, expected one of {MODES}")
        self._control(self._apply_mode(mode))

    def set_latency(self, ms: float, jitter_ms: float = 0) -> None:
        """Delay each chunk in both directions by ms ± jitter_ms (uniform, never below 0)."""
        if ms < 0 or jitter_ms < 0:
            raise ValueError(f"fault proxy: latency must be >= 0, got {ms} ± {jitter_ms} ms")
        self._control(self._apply_latency(ms, jitter_ms))

    def cut(self) -> None:
        """Reset every open connection now; new connections are served per the current mode."""
        self._control(self._close_links(reset=True))

    def _control(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run coro on the proxy loop and wait for it, so the change is in effect on return."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("fault proxy: not running (call start() first)")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=_CONTROL_TIMEOUT_S)

    async def _apply_mode(self, mode: Mode) -> None:
        self._mode = mode
        assert self._released is not None
        if mode == "hold_replies":
            self._released.clear()
        else:
            self._released.set()
        if mode == "down":
            await self._close_links(reset=True)

    async def _apply_latency(self, ms: float, jitter_ms: float) -> None:
        self._latency_ms = (ms, jitter_ms)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        # Our own loop class, so an event loop policy installed by the tests cannot leak in.
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            runner.run(self._main(ready))

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self._stopping = asyncio.Event()
        self._released = asyncio.Event()
        self._released.set()
        try:
            server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        except OSError as exc:
            ready.set_exception(exc)
            return
        self.port = server.sockets[0].getsockname()[1]
        ready.set_result(None)
        await self._stopping.wait()
        server.close()  # stop accepting first, then end what is open
        await self._close_links(reset=False)
        await server.wait_closed()

    def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """start_server callback. A plain function, so the task is ours to track (and 3.11's
        stream protocol never sees a handler task it might misreport)."""
        assert self._stopping is not None
        if self._mode == "down" or self._stopping.is_set():
            _abort(client_w, reset=True)
            return
        writers = [client_w]
        task = asyncio.create_task(self._serve(client_r, writers))
        self._links[task] = writers
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        del self._links[task]
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.errors.append({"message": "fault proxy connection failed", "exception": exc})

    async def _serve(
        self, client_r: asyncio.StreamReader, writers: list[asyncio.StreamWriter]
    ) -> None:
        """Own one client connection: connect upstream, pump both ways until either side ends."""
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self._upstream)
            writers.append(upstream_w)
            await self._pump(client_r, writers[0], upstream_r, upstream_w)
        except OSError:
            _abort(writers[0], reset=True)  # upstream refused: the client sees a reset
        finally:
            for writer in writers:
                await _close(writer)

    async def _pump(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream_r: asyncio.StreamReader,
        upstream_w: asyncio.StreamWriter,
    ) -> None:
        pipes = [
            asyncio.create_task(self._pipe(client_r, upstream_w, to_upstream=True)),
            asyncio.create_task(self._pipe(upstream_r, client_w, to_upstream=False)),
        ]
        try:
            done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.wait(pipes)
        for pipe in done:
            pipe.result()  # surfaces bugs; connection errors end a pipe quietly

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_upstream: bool
    ) -> None:
        """Copy one direction until EOF or a connection error, applying latency and mode."""
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK_BYTES):
                await self._delay()
                if self._mode == "hold_replies" and not to_upstream:
                    assert self._released is not None
                    self.held += 1
                    try:
                        await self._released.wait()
                    finally:
                        self.held -= 1
                # The mode is checked after the delay: a chunk in flight obeys the new fault.
                one_way = self._mode in ("drop_replies", "hold_replies") and to_upstream
                if self._mode == "pass" or one_way:
                    writer.write(data)
                    await writer.drain()

    async def _delay(self) -> None:
        ms, jitter_ms = self._latency_ms
        if ms or jitter_ms:
            await asyncio.sleep(max(0.0, random.uniform(ms - jitter_ms, ms + jitter_ms)) / 1000)

    async def _close_links(self, *, reset: bool) -> None:
        """Abort every open connection (RST if reset) and wait until their tasks have ended."""
        for writers in self._links.values():
            for writer in writers:
                _abort(writer, reset=reset)
        if self._links:
            await asyncio.wait(list(self._links), timeout=_CONTROL_TIMEOUT_S)


def _abort(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    """Close now, dropping unsent bytes; with reset the peer gets RST instead of FIN."""
    if reset and not writer.transport.is_closing():
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST
            )
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after flushing and wait until the socket is released."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
