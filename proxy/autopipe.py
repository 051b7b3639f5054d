"""Auto-pipelining of the request path's Redis calls: the calls concurrent requests make in one
event-loop tick leave as one write on one connection per server, and the replies (RESP keeps
them in order) are parsed by hiredis and handed back call by call. That is the client's cost
per call cut from redis-py's full machinery (~40 µs, more outside a pipeline) to a few µs,
while Redis still runs each call on its own — a pipeline is not a transaction.

Every call names a key, which picks the server: the one server, the master Sentinel names, or
the Cluster node owning the key's slot (every script's keys share one hash tag, so one slot).
A script runs by its SHA; after NOSCRIPT (a restarted or flushed server) it is loaded and run
again — NOSCRIPT means it did not run, so that second run is its only one. On a Cluster, MOVED
and ASK (it did not run either) refresh the slot map and send the call where it now belongs.
A reply late by more than the socket timeout fails every call on that connection (Unavailable)
and drops it; the next call connects anew (Sentinel: to the master it names then).

Writes that must reach replicas (X-Durability: replicated) are confirmed on a second
connection per server, its wait lane: a mark is written there, then WAIT. WAIT covers only its
own connection's writes, and the mark follows every write answered before it in the
replication stream; a blocked WAIT holds the calls behind it, so it never delays the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proxy import topology
from proxy.errors import RedisDown, Unavailable
from proxy.luascripts import scripts
from proxy.settings import Settings
from proxy.topology import Tls, Topology

MAX_WRITE = 512  # calls one write carries at most; the rest go in the next tick's
_REDIRECTS = 3  # MOVED/ASK hops one call follows before it gives up
WAIT_LANE = "/wait"  # the second connection per server: a mark written, then WAIT
MARK_MS = 60_000  # a wait mark's life (it only has to be written)
# Replies that mean Redis cannot take the command now (not that the command is wrong): a 503
# on the request path, a retry with backoff in the background. Inside a script's error (Redis
# 6.2 wraps them: "Error running script ...: -NOREPLICAS ...") they follow a dash.
_UNAVAILABLE = re.compile(r"(?:^|-)(MISCONF|OOM|READONLY|LOADING|MASTERDOWN|NOGROUP|NOREPLICAS"
                          r"|BUSY|CLUSTERDOWN|TRYAGAIN|NOTREADY)\b")


@dataclass(frozen=True)
class Address:
    host: str = ""
    port: int = 0
    path: str = ""  # a unix socket


Resolve = Callable[[], Awaitable[Address]]  # where a link's server is, asked at each connect
Route = Callable[[str], tuple[str, Resolve]]  # key -> (the link's name, how to find its server)


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else (b"%d" % a if isinstance(a, int) else str(a).encode())
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


@dataclass
class Stats:
    writes: int = 0  # socket writes
    calls: int = 0  # calls they carried


class Link(asyncio.Protocol):
    """One connection to one server: calls queued in a tick are written together; replies
    resolve their futures in order."""

    def __init__(self, resolve: Resolve, topology: Topology, timeout_s: float,
                 stats: Stats) -> None:
        self._resolve = resolve
        self._stats = stats
        self._address = Address()
        self._topology = topology
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._wait: tuple[tuple[int, int], asyncio.Future[Any]] | None = None

    # ---- calls

    async def call(self, packed: bytes) -> Any:
        await self._connected()
        return await self._send(packed)

    async def _connected(self) -> None:
        """A connection to send on. One lost right after it was made (a server or proxy
        that accepts, then resets) fails the call here: nothing was sent, and a call queued
        on no connection would never be answered."""
        if self._transport is None:
            await self._connect()
        if self._transport is None:
            raise RedisDown(f"redis at {_where(self._address)}: connection lost as it was "
                            "made", sent=False)

    async def wait(self, mark: str, replicas: int, timeout_ms: int) -> tuple[Any, Any]:
        """A write of `mark`, then WAIT, both on this connection (WAIT covers only its own
        connection's writes): their replies. The callers of one tick share them; a blocked
        WAIT holds the calls behind it, hence a connection of its own."""
        await self._connected()
        if self._wait is None or self._wait[0] != (replicas, timeout_ms):
            marked = self._send(pack(("SET", mark, "1", "PX", MARK_MS)))
            waited = self._send(pack(("WAIT", replicas, timeout_ms)))
            self._wait = ((replicas, timeout_ms), asyncio.gather(marked, waited))
        marked, waited = await asyncio.shield(self._wait[1])
        return marked, waited

    def _send(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((fut, loop.time()))
        self._out.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = loop.call_later(self._timeout_s, self._check_late)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._wait = None  # its mark goes out now: a write answered later may come after it
        if self._transport is None:
            return  # lost meanwhile: connection_lost failed the calls
        out, self._out = self._out[:MAX_WRITE], self._out[MAX_WRITE:]
        self._transport.write(b"".join(out))
        self._stats.writes += 1
        self._stats.calls += len(out)
        if self._out:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _check_late(self) -> None:
        self._timer = None
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        age = loop.time() - self._pending[0][1]
        if age >= self._timeout_s and self._transport is not None:
            self._transport.abort()  # connection_lost fails what is pending
        else:
            self._timer = loop.call_later(self._timeout_s - age, self._check_late)

    # ---- the connection

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                a = self._address = await self._resolve()
                if a.path:
                    await loop.create_unix_connection(lambda: self, a.path)
                else:
                    await loop.create_connection(lambda: self, a.host, a.port,
                                                 ssl=_ssl(self._topology.tls))
        except (OSError, TimeoutError, RedisConnectionError) as e:  # Sentinel: no master found
            raise RedisDown(f"redis at {_where(self._address)}: cannot connect: "
                            f"{e or type(e).__name__}", sent=False) from e
        for setup in _handshake(self._topology):
            reply = await self._send(setup)
            if isinstance(reply, ResponseError):
                self.close()
                raise Unavailable(f"redis at {_where(self._address)}: {reply}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._reader = hiredis.Reader(replyError=ResponseError)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            fut, _ = self._pending.popleft()
            if not fut.done():  # its caller may have been cancelled
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = RedisDown(f"redis at {_where(self._address)}: connection lost"
                          f"{f' ({exc})' if exc else ''}", sent=True)
        while self._pending:
            fut, _ = self._pending.popleft()
            if not fut.done():
                fut.set_exception(error)
        self._out.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class AutoPipeline:
    """The request path's Redis: `call(key, *command)` and `script(name, keys, args)`."""

    def __init__(self, topology: Topology, route: Route, timeout_s: float,
                 refresh: Callable[[], Awaitable[Any]] | None = None) -> None:
        """`route(key)` names the link serving key and how to find its server; `refresh()`
        (a Cluster's) re-reads the slot map after MOVED/ASK."""
        self._topology = topology
        self._route = route
        self._refresh = refresh
        self._timeout_s = timeout_s
        self._links: dict[str, Link] = {}
        self._texts: dict[str, str] = {}
        self._shas: dict[str, str] = {}
        self.stats = Stats()
        for name, text in scripts().items():
            self.add_script(name, text)

    def add_script(self, name: str, text: str) -> None:
        """Make a script callable by name (the sidecar's come from proxy/scripts)."""
        self._texts[name] = text
        self._shas[name] = hashlib.sha1(text.encode()).hexdigest()

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        call = ("EVALSHA", self._shas[name], len(keys), *keys, *args)
        reply = await self._call(keys[0], call)
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            await self._call(keys[0], ("SCRIPT", "LOAD", self._texts[name]))
            reply = await self._call(keys[0], call)
        return _checked(reply)

    async def replicas(self, mark: str, wanted: int, timeout_ms: int) -> int:
        """How many replicas (up to `wanted`, waiting at most `timeout_ms`) have every write
        `mark`'s server answered before this call: a write of `mark`, then WAIT, on the
        server's wait lane. WAIT covers its own connection's writes, and the mark comes
        after all earlier writes in the replication stream, whichever connection made them."""
        name, resolve = self._route(mark)
        marked, waited = await self._link(name + WAIT_LANE, resolve).wait(mark, wanted,
                                                                         timeout_ms)
        if isinstance(marked, ResponseError):  # MOVED, a read-only replica: WAIT saw nothing
            return 0
        return int(_checked(waited))

    async def call(self, key: str, *command: Any) -> Any:
        return _checked(await self._call(key, command))

    async def _call(self, key: str, command: tuple[Any, ...]) -> Any:
        packed = pack(command)
        for _ in range(_REDIRECTS):
            reply = await self._link(*self._route(key)).call(packed)
            if not (isinstance(reply, ResponseError) and str(reply).startswith(("MOVED", "ASK"))
                    and self._refresh is not None):
                return reply
            await self._refresh()  # the slot moved: the call did not run anywhere
        return reply

    def _link(self, name: str, resolve: Resolve) -> Link:
        link = self._links.get(name)
        if link is None:
            link = self._links[name] = Link(resolve, self._topology, self._timeout_s,
                                            self.stats)
        return link

    async def aclose(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()


def for_client(settings: Settings, client: Any) -> AutoPipeline:
    """The request path's auto-pipeline on the same deployment as `client` (which it asks
    where the Sentinel master or a Cluster slot is)."""
    t, timeout = topology.parse(settings.redis.url), settings.redis.socket_timeout_s
    if t.kind == "cluster":
        async def refresh() -> None:
            await client.nodes_manager.initialize()

        def route(key: str) -> tuple[str, Resolve]:
            node = client.nodes_manager.get_node_from_slot(slot_of(key))
            return node.name, _fixed(Address(node.host, node.port))

        return AutoPipeline(t, route, timeout, refresh)
    if t.kind == "sentinel":
        async def master() -> Address:
            host, port = await client.connection_pool.get_master_address()
            return Address(host, int(port))

        return AutoPipeline(t, lambda key: ("master", master), timeout)
    one = _fixed(Address(path=t.unix_path) if t.unix_path else Address(*t.hosts[0]))
    return AutoPipeline(t, lambda key: ("server", one), timeout)


def _fixed(address: Address) -> Resolve:
    async def resolve() -> Address:
        return address

    return resolve


def unavailable_reply(text: str) -> bool:
    """An error reply that means Redis cannot take the call now (503), not a wrong call."""
    return _UNAVAILABLE.search(text) is not None



def _checked(reply: Any) -> Any:
    """A reply, or the error it is: Unavailable for what means Redis cannot take the call now
    (503), ResponseError for a call that is wrong (500)."""
    if isinstance(reply, ResponseError):
        if unavailable_reply(str(reply)):
            raise Unavailable(f"redis: {reply}")
        raise reply
    return reply


def _handshake(t: Topology) -> list[bytes]:
    out = []
    if t.password is not None:
        out.append(pack(("AUTH", t.username, t.password) if t.username else ("AUTH", t.password)))
    if t.db:
        out.append(pack(("SELECT", t.db)))
    return out


def _ssl(tls: Tls | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    ctx = ssl.create_default_context(cafile=tls.ca_certs)
    ctx.check_hostname = tls.check_hostname and tls.cert_reqs != "none"
    ctx.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                       "required": ssl.CERT_REQUIRED}[tls.cert_reqs]
    if tls.certfile:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)
    return ctx


def _where(a: Address) -> str:
    return a.path or f"{a.host}:{a.port}" if a.path or a.host else "(not resolved)"


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))
