"""FaultProxy: each mode proven against a real echo server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from tests.faults.tcpproxy import FaultProxy

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connect = Callable[[], Awaitable[Conn]]
IO_TIMEOUT_S = 5.0  # a generous bound for what must happen; never a measure of speed
SILENCE_S = 0.3  # how long "nothing arrives" is watched for


class EchoServer:
    """Echoes every byte back and records what it received; owns its connection tasks."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.accepted = 0
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def open(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await wait_until(lambda: self.open == 0, "echo connections closed")
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.create_task(self._echo(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # the proxy reset us: that is what these tests do
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = IO_TIMEOUT_S) -> None:
    """Poll cond until true; fail naming what was awaited once the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for: {what}")
        await asyncio.sleep(0.01)


async def roundtrip(conn: Conn, data: bytes) -> bytes:
    reader, writer = conn
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), IO_TIMEOUT_S)


async def assert_reset(conn: Conn) -> None:
    """The connection was ended with an RST (not a clean EOF)."""
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(conn[0].read(1), IO_TIMEOUT_S)


async def assert_silent(conn: Conn) -> None:
    """Nothing arrives and the connection is not closed while we watch."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(conn[0].read(1), SILENCE_S)


async def assert_refused(port: int) -> None:
    """A new connection is refused, or accepted and then closed before any byte comes back."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionError:
        return
    try:
        writer.write(b"hello?")
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(1), IO_TIMEOUT_S) == b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def connect(proxy: FaultProxy) -> AsyncIterator[Connect]:
    """Open client connections through the proxy; all are closed at teardown."""
    writers: list[asyncio.StreamWriter] = []

    async def _connect() -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writers.append(writer)
        return reader, writer

    yield _connect
    for writer in writers:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_pass_echoes(proxy: FaultProxy, echo: EchoServer, connect: Connect) -> None:
    conn = await connect()
    assert await roundtrip(conn, b"hello") == b"hello"
    assert bytes(echo.received) == b"hello"
    assert proxy.connections == 1


async def test_down_resets_open_connections_and_refuses_new(
    proxy: FaultProxy, echo: EchoServer, connect: Connect
) -> None:
    conn = await connect()
    assert await roundtrip(conn, b"before") == b"before"

    proxy.set_mode("down")
    assert proxy.connections == 0
    await assert_reset(conn)
    await assert_refused(proxy.port)
    await wait_until(lambda: echo.open == 0, "upstream side closed")
    assert echo.accepted == 1, "a connection made while down reached the upstream"

    proxy.set_mode("pass")
    assert await roundtrip(await connect(), b"after") == b"after"


async def test_blackhole_keeps_connections_open_and_forwards_nothing(
    proxy: FaultProxy, echo: EchoServer, connect: Connect
) -> None:
    old = await connect()
    assert await roundtrip(old, b"before") == b"before"

    proxy.set_mode("blackhole")
    old[1].write(b"lost")
    await assert_silent(old)
    new = await connect()  # accepted, but nothing flows
    new[1].write(b"lost too")
    await assert_silent(new)
    assert proxy.connections == 2

    proxy.set_mode("pass")
    # Same sockets work again (no RST), and what was sent into the hole never arrived.
    assert await roundtrip(old, b"healed") == b"healed"
    assert await roundtrip(new, b"healed too") == b"healed too"
    assert bytes(echo.received) == b"beforehealedhealed too"


async def test_drop_replies_forwards_requests_but_not_replies(
    proxy: FaultProxy, echo: EchoServer, connect: Connect
) -> None:
    conn = await connect()
    proxy.set_mode("drop_replies")
    conn[1].write(b"ping")
    await wait_until(lambda: bytes(echo.received) == b"ping", "upstream received the request")
    await assert_silent(conn)
    assert proxy.connections == 1


@pytest.mark.parametrize(("ms", "jitter_ms"), [(150, 0), (100, 50)])
async def test_latency_delays_each_direction(
    proxy: FaultProxy, connect: Connect, ms: float, jitter_ms: float
) -> None:
    conn = await connect()
    proxy.set_latency(ms, jitter_ms)
    started = time.monotonic()
    assert await roundtrip(conn, b"slow") == b"slow"
    # Request and reply are each delayed: a lower bound only, machines may be slower.
    assert time.monotonic() - started >= 2 * (ms - jitter_ms) / 1000

    proxy.set_latency(0)
    assert await roundtrip(conn, b"fast") == b"fast"


async def test_cut_resets_open_connections_and_keeps_accepting(
    proxy: FaultProxy, echo: EchoServer, connect: Connect
) -> None:
    first, second = await connect(), await connect()
    assert await roundtrip(first, b"1") == b"1"
    assert await roundtrip(second, b"2") == b"2"

    proxy.cut()
    assert proxy.connections == 0
    await assert_reset(first)
    await assert_reset(second)
    await wait_until(lambda: echo.open == 0, "upstream side closed")

    assert await roundtrip(await connect(), b"3") == b"3"
    assert proxy.connections == 1


async def test_upstream_refusing_resets_the_client() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with FaultProxy("127.0.0.1", dead_port) as proxy:
        await assert_refused(proxy.port)
        await wait_until(lambda: proxy.connections == 0, "proxy dropped the connection")


async def test_stop_closes_connections_and_is_idempotent(
    proxy: FaultProxy, connect: Connect
) -> None:
    conn = await connect()
    assert await roundtrip(conn, b"x") == b"x"
    proxy.stop()
    assert await asyncio.wait_for(conn[0].read(1), IO_TIMEOUT_S) == b""
    proxy.stop()
    with pytest.raises(RuntimeError, match="not running"):
        proxy.set_mode("down")


def test_bad_arguments_are_rejected(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        proxy.set_mode("sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="latency"):
        proxy.set_latency(-1)
    with pytest.raises(OSError), FaultProxy("127.0.0.1", 1, listen_port=proxy.port):
        pass  # the port is taken: start() fails instead of hanging


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


def test_works_from_sync_code() -> None:
    """No event loop on the caller's side: plain sockets and a threaded echo server."""
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler) as server:
        serving = threading.Thread(target=server.serve_forever)
        serving.start()
        try:
            with (
                FaultProxy("127.0.0.1", server.server_address[1]) as proxy,
                socket.create_connection(("127.0.0.1", proxy.port), IO_TIMEOUT_S) as conn,
            ):
                conn.sendall(b"sync")
                assert conn.recv(4, socket.MSG_WAITALL) == b"sync"
                proxy.set_mode("down")
                with pytest.raises(ConnectionResetError):
                    conn.recv(1)
        finally:
            server.shutdown()
            serving.join()



async def test_hold_replies_delivers_them_once_released(
        proxy: FaultProxy, echo: EchoServer, connect: Connect) -> None:
    reader, writer = await connect()
    proxy.set_mode("hold_replies")
    writer.write(b"ping")
    await writer.drain()
    await wait_until(lambda: proxy.held == 1, "the reply held in the proxy")
    assert bytes(echo.received) == b"ping"  # the request went through
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), SILENCE_S)
    proxy.set_mode("pass")
    assert await asyncio.wait_for(reader.readexactly(4), IO_TIMEOUT_S) == b"ping"
