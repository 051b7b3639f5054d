"""Which Redis deployment `redis.url` names, and the redis-py asyncio client for it.

    redis://[user:pass@]host[:port][/db]                    one server (rediss:// = TLS)
    unix://[user:pass@]/path/to/redis.sock[?db=N]           one server on a unix socket
    redis+sentinel://[user:pass@]h1:26379,h2:26379/<master>[/<db>]    (rediss+sentinel:// = TLS)
    redis+cluster://[user:pass@]h1:7000,h2:7001             (rediss+cluster:// = TLS)

Query options: `ssl_cert_reqs` (none|optional|required), `ssl_ca_certs`, `ssl_certfile`,
`ssl_keyfile`, `ssl_check_hostname` (true|false) with TLS; `sentinel_username` and
`sentinel_password` with Sentinel. The URL's credentials are those of the data nodes (master and
replicas, or every cluster node); sentinels get none unless `sentinel_password` is given, since
sentinels usually run without `requirepass` and an AUTH to such a server is an error.

Every client is built with no command retries by default: redis-py would otherwise resend a
script call after a timeout or a dropped connection, running a write twice. A failed call is the
caller's to report (503); the next call reconnects (Sentinel: to the master it finds then;
Cluster: after refreshing the slot map).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

Kind = Literal["single", "sentinel", "cluster"]
Client: TypeAlias = "aioredis.Redis | RedisCluster"  # both untyped here (see pyproject)

_SCHEMES: dict[str, tuple[Kind, bool]] = {  # scheme -> (kind, TLS)
    "redis": ("single", False), "rediss": ("single", True), "unix": ("single", False),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORT: dict[Kind, int] = {"single": 6379, "sentinel": 26379, "cluster": 6379}
_TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                "ssl_check_hostname")
_CERT_REQS = ("none", "optional", "required")
_BOOLS = {"true": True, "false": False}


@dataclass(frozen=True)
class Tls:
    cert_reqs: str = "required"
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True)
class Topology:
    kind: Kind
    hosts: tuple[tuple[str, int], ...]  # empty for a unix socket
    unix_path: str | None = None
    master: str | None = None  # the Sentinel service name
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: Tls | None = None  # None: plain TCP
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


# ---- parsing


def parse(url: str) -> Topology:
    """The deployment a Redis URL names; ValueError saying what is wrong (never the password)."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"redis URL must start with one of "
                         f"{', '.join(s + '://' for s in _SCHEMES)}, not {scheme!r}")
    kind, tls = _SCHEMES[scheme.lower()]
    try:
        parts = urlsplit(url)
    except ValueError as e:  # an unclosed [IPv6 bracket
        raise ValueError(f"redis URL: {e}") from None
    if parts.fragment:
        raise ValueError("redis URL must not have a #fragment")
    options = _query(parts.query)
    auth, _, netloc = parts.netloc.rpartition("@")
    user, _, password = auth.partition(":")
    sentinel_user, sentinel_password = _sentinel_auth(kind, options)
    base = Topology(kind, (), username=unquote(user) or None,
                    password=unquote(password) if password else None,
                    tls=_tls(options) if tls else None, sentinel_username=sentinel_user,
                    sentinel_password=sentinel_password)
    if scheme.lower() == "unix":
        return _unix(base, netloc, parts.path, options)
    _reject_unknown(options, scheme.lower())
    return _network(base, _hosts(netloc, kind), parts.path)


def _query(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if len(values) > 1:
            raise ValueError(f"redis URL option {name!r} is given {len(values)} times")
        out[name] = values[0]
    return out


def _reject_unknown(options: dict[str, str], scheme: str) -> None:
    """Options left after the known ones were taken out are mistakes: say which."""
    if options:
        raise ValueError(f"redis URL option(s) {', '.join(sorted(options))} not valid for "
                         f"{scheme}:// (TLS options need rediss, sentinel_* need Sentinel)")


def _tls(options: dict[str, str]) -> Tls:
    taken = {k: options.pop(k) for k in _TLS_OPTIONS if k in options}
    reqs = taken.get("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise ValueError(f"redis URL option ssl_cert_reqs must be one of {_CERT_REQS}, "
                         f"not {reqs!r}")
    check = taken.get("ssl_check_hostname", "true").lower()
    if check not in _BOOLS:
        raise ValueError(f"redis URL option ssl_check_hostname must be true or false, "
                         f"not {check!r}")
    return Tls(reqs, taken.get("ssl_ca_certs") or None, taken.get("ssl_certfile") or None,
               taken.get("ssl_keyfile") or None, _BOOLS[check])


def _sentinel_auth(kind: Kind, options: dict[str, str]) -> tuple[str | None, str | None]:
    if kind != "sentinel":
        return None, None
    user, password = options.pop("sentinel_username", ""), options.pop("sentinel_password", "")
    return user or None, password or None


def _hosts(netloc: str, kind: Kind) -> tuple[tuple[str, int], ...]:
    hosts = tuple(_host_port(item.strip(), _DEFAULT_PORT[kind]) for item in netloc.split(","))
    if kind == "single" and len(hosts) > 1:
        raise ValueError("redis:// and rediss:// take one host; for several use "
                         "redis+sentinel:// or redis+cluster://")
    return hosts


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port`."""
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"redis URL host {item!r}: unclosed or malformed [IPv6] address")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = item.partition(":")
        if ":" in port_text:
            raise ValueError(f"redis URL host {item!r}: put an IPv6 address in brackets")
    if not host:
        raise ValueError(f"redis URL has an empty host{f' in {item!r}' if item else ''}")
    if not port_text:
        return host, default_port
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"redis URL host {item!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


def _network(base: Topology, hosts: tuple[tuple[str, int], ...], path: str) -> Topology:
    segments = [s for s in path.split("/") if s]
    if base.kind == "sentinel":
        if not segments:
            raise ValueError("redis+sentinel URL needs the master name: "
                             "redis+sentinel://host:26379,host:26379/<master>[/<db>]")
        master, db_segments = unquote(segments[0]), segments[1:]
        return replace(base, hosts=hosts, master=master, db=_db(db_segments, "redis+sentinel"))
    db = _db(segments, "redis+cluster" if base.kind == "cluster" else "redis")
    if base.kind == "cluster" and db != 0:
        raise ValueError(f"a Redis Cluster has only database 0, not {db}")
    return replace(base, hosts=hosts, db=db)


def _db(segments: list[str], what: str) -> int:
    if not segments:
        return 0
    if len(segments) > 1 or not segments[0].isascii() or not segments[0].isdigit():
        raise ValueError(f"{what} URL path must be /<db> with db a whole number, "
                         f"not /{'/'.join(segments)}")
    return int(segments[0])


def _unix(base: Topology, netloc: str, path: str, options: dict[str, str]) -> Topology:
    if netloc:
        raise ValueError(f"unix:// URL takes a path, not a host ({netloc!r}): "
                         "unix:///path/to/redis.sock")
    if not path or path == "/":
        raise ValueError("unix:// URL needs the socket path: unix:///path/to/redis.sock")
    db_text = options.pop("db", "0")
    if not db_text.isascii() or not db_text.isdigit():
        raise ValueError(f"unix:// URL option db must be a whole number, not {db_text!r}")
    _reject_unknown(options, "unix")
    return replace(base, unix_path=unquote(path), db=int(db_text))


# ---- clients


def connect(topology: Topology, *, max_connections: int, socket_timeout_s: float,
            health_check_interval_s: float, retries: int = 0) -> Client:
    """The client for the deployment: a bounded pool per server, timeouts on every socket,
    idle connections PINGed before reuse. Closing it (aclose) closes everything it opened.

    `max_connections` bounds each server's pool. Single and Sentinel pools make callers wait
    (up to socket_timeout_s) for a free connection; a cluster node's pool raises
    MaxConnectionsError (a ConnectionError) at once when full.
    """
    common = _common_kwargs(topology, socket_timeout_s, health_check_interval_s, retries)
    if topology.kind == "cluster":
        return _cluster(topology, common, max_connections)
    if topology.kind == "sentinel":
        return _sentinel_master(topology, common, max_connections, socket_timeout_s)
    pool = aioredis.BlockingConnectionPool(
        connection_class=_single_connection_class(topology), max_connections=max_connections,
        timeout=socket_timeout_s, db=topology.db, **_address(topology), **common)
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def _common_kwargs(topology: Topology, socket_timeout_s: float, health_check_interval_s: float,
                   retries: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "username": topology.username, "password": topology.password,
        "socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s,
        "health_check_interval": health_check_interval_s,
        "retry": Retry(NoBackoff(), retries)}
    return kwargs | _tls_kwargs(topology.tls)


def _tls_kwargs(tls: Tls | None) -> dict[str, Any]:
    if tls is None:
        return {}
    return {"ssl_cert_reqs": tls.cert_reqs, "ssl_ca_certs": tls.ca_certs,
            "ssl_certfile": tls.certfile, "ssl_keyfile": tls.keyfile,
            "ssl_check_hostname": tls.check_hostname}


def _single_connection_class(topology: Topology) -> Any:
    if topology.unix_path is not None:
        return aioredis.UnixDomainSocketConnection
    return aioredis.SSLConnection if topology.tls else aioredis.Connection


def _address(topology: Topology) -> dict[str, Any]:
    if topology.unix_path is not None:
        return {"path": topology.unix_path}
    host, port = topology.hosts[0]
    return {"host": host, "port": port}


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):  # type: ignore[misc]
    """A Sentinel-managed pool that waits for a free connection (redis-py's raises
    "Too many connections" instead), like the pool of a single server."""


class _SentinelMaster(aioredis.Redis):  # type: ignore[misc]
    """The master client; closing it also closes the clients of the sentinels themselves."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            await self.connection_pool.sentinel_manager.aclose()


def _sentinel_master(topology: Topology, common: dict[str, Any], max_connections: int,
                     wait_s: float) -> Client:
    sentinel_kwargs = {k: v for k, v in common.items() if k not in ("username", "password")}
    sentinel_kwargs |= {"username": topology.sentinel_username,
                        "password": topology.sentinel_password, "ssl": topology.tls is not None}
    manager = Sentinel(list(topology.hosts), sentinel_kwargs=sentinel_kwargs, db=topology.db,
                       ssl=topology.tls is not None, **common)
    return manager.master_for(topology.master, redis_class=_SentinelMaster,
                              connection_pool_class=_BlockingSentinelPool,
                              max_connections=max_connections, timeout=wait_s)


def _cluster(topology: Topology, common: dict[str, Any], max_connections: int) -> Client:
    nodes = [ClusterNode(host, port) for host, port in topology.hosts]
    # `retry` is the cluster-level one (re-read the slot map and resend); redis-py itself
    # gives the per-node connections none.
    return RedisCluster(startup_nodes=nodes, max_connections=max_connections,
                        ssl=topology.tls is not None, **common)


# ---- pub/sub and dedicated connections


async def pubsub(client: Client) -> Any:
    """A PubSub for classic channels (SUBSCRIBE, not SSUBSCRIBE). On a cluster it sits on a
    random node: a classic PUBLISH is broadcast to every node, so any node sees every shard's
    events, and random picks spread the sidecars' subscriptions over the nodes."""
    if isinstance(client, RedisCluster):
        await client.initialize()  # a no-op once the slot map is loaded
        return client.pubsub(node=random.choice(client.get_nodes()))
    return client.pubsub()


async def dedicated(client: Client, key: str, *, refresh: bool = False) -> aioredis.Redis:
    """A client with one connection of its own to the server owning `key`, for blocking reads
    (XREADGROUP BLOCK) that must not hold a connection of the shared pool. Close it with aclose.

    Single and Sentinel: a pool of one with the client's settings (Sentinel: it follows the
    master across failovers by itself). Cluster: a pool of one on the node that owns the key's
    slot; after a MovedError or a ConnectionError from it (the slot moved, the node failed
    over), close it and ask again with refresh=True, which re-reads the slot map first.
    """
    if isinstance(client, RedisCluster):
        return await _cluster_node_client(client, key, refresh)
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        return pool.sentinel_manager.master_for(
            pool.service_name, connection_pool_class=_BlockingSentinelPool, max_connections=1,
            timeout=pool.timeout)
    return _pool_of_one(pool.connection_class, pool.connection_kwargs, pool.timeout)


async def _cluster_node_client(client: RedisCluster, key: str, refresh: bool) -> aioredis.Redis:
    await client.initialize()  # a no-op once the slot map is loaded
    if refresh:
        await client.nodes_manager.initialize()
    node = client.get_node_from_key(key)
    return _pool_of_one(node.connection_class, node.connection_kwargs,
                        node.connection_kwargs.get("socket_timeout"))


def _pool_of_one(connection_class: type[Any], kwargs: dict[str, Any],
                 wait_s: float | None) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool(connection_class=connection_class, max_connections=1,
                                           timeout=wait_s, **kwargs)
    return aioredis.Redis.from_pool(pool)


async def follow_master(client: Client) -> bool:
    """Sentinel only (a no-op otherwise): ask the sentinels where the master is now and, if it
    moved, send every connection there: idle ones at once, busy ones when they are released.
    True when it moved.

    redis-py asks the sentinels only when it opens a connection. A master demoted while alive
    (SENTINEL FAILOVER, a healed partition) keeps accepting writes through the connections
    already open to it until Sentinel turns it into a replica, about 10 s later, and every
    write it took meanwhile is lost. Calling this on a short tick bounds that window.
    """
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return False
    before = pool.master_address
    now = await pool.get_master_address()  # disconnects idle connections when it changed
    if before is None or now == before:
        return False
    await pool.update_active_connections_for_reconnect()
    return True
