"""The request path's auto-pipeline on real Redis deployments: concurrent calls share writes,
replies come back to the right caller, NOSCRIPT reloads once, broken and silent connections
fail fast as Unavailable and heal by themselves, the handshake (AUTH, SELECT) is applied, and
calls follow a Sentinel failover and a Cluster's slots."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis import exceptions as rexc

from proxy import autopipe, keys
from proxy.autopipe import AutoPipeline
from proxy.embedded import RedisServer
from proxy.errors import RedisDown, Unavailable
from proxy.redisconn import connect
from tests.conftest import Servers, make_settings
from tests.faults.tcpproxy import FaultProxy
from tests.redis_topology import Cluster, SentinelSet

COUNT = "local n = redis.call('INCR', KEYS[1]) return {n, ARGV[1]}"


Pipelines = Callable[[str], Awaitable[AutoPipeline]]


@pytest.fixture
async def pipelines(servers: Servers) -> AsyncIterator[Pipelines]:
    """Makes auto-pipelines on a URL; each and its redis-py client are closed at the end."""
    made: list[tuple[AutoPipeline, Any]] = []

    async def make(url: str) -> AutoPipeline:
        s = make_settings(servers, redis={"url": url, "socket_timeout_s": 1.0})
        client = connect(s, url, 4)
        if hasattr(client, "initialize"):  # a cluster client reads the slot map first
            await client.initialize()
        made.append((autopipe.for_client(s, client), client))
        return made[-1][0]

    yield make
    for pipe, client in made:
        await pipe.aclose()
        await client.aclose()


@pytest.fixture
async def pipe(servers: Servers, pipelines: Pipelines) -> AutoPipeline:
    return await pipelines(servers.redis_url)


async def test_concurrent_calls_share_writes_and_get_their_own_replies(
        pipe: AutoPipeline) -> None:
    await pipe.call("warm", "PING")  # connected
    writes = pipe.stats.writes
    replies = await asyncio.gather(*(pipe.call(f"k{i % 7}", "INCRBY", f"k{i % 7}", i)
                                     for i in range(200)))
    assert pipe.stats.writes - writes == 1  # one tick, one write
    # Each caller got its own reply: INCRBY answers the running total of its key.
    for j in range(7):
        mine = [replies[i] for i in range(200) if i % 7 == j]
        assert mine == [sum(range(j, i + 1, 7)) for i in range(j, 200, 7)]


async def test_a_flushed_script_cache_reloads_and_runs_once(
        pipe: AutoPipeline, redis: aioredis.Redis) -> None:
    pipe.add_script("count", COUNT)
    assert await pipe.script("count", ["c"], ["a"]) == [1, b"a"]
    await redis.script_flush()  # as a restart or SCRIPT FLUSH leaves it
    assert await pipe.script("count", ["c"], ["b"]) == [2, b"b"]  # it ran once
    assert await redis.get("c") == b"2"


async def test_errors_are_unavailable_or_raised_as_they_mean(
        pipe: AutoPipeline, redis: aioredis.Redis) -> None:
    with pytest.raises(rexc.ResponseError):  # a wrong call: 500
        await pipe.call("x", "NOSUCHCOMMAND")
    await redis.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(Unavailable):  # Redis cannot take it now: 503
            await pipe.call("x", "SET", "x", "1")
    finally:
        await redis.config_set("min-replicas-to-write", 0)
    assert await pipe.call("x", "SET", "x", "1") == b"OK"


async def test_a_killed_connection_fails_its_calls_and_the_next_reconnects(
        pipe: AutoPipeline, redis: aioredis.Redis) -> None:
    assert await pipe.call("a", "SET", "a", "1") == b"OK"
    blocked = asyncio.ensure_future(pipe.call("b", "BLPOP", "nothing", 5))
    await asyncio.sleep(0.2)  # it is waiting in Redis
    await redis.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(Unavailable):
        await blocked
    assert await pipe.call("a", "GET", "a") == b"1"


async def test_a_silent_server_fails_calls_within_the_timeout_then_heals(
        servers: Servers, pipelines: Pipelines) -> None:
    port = int(servers.redis_url.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy("127.0.0.1", port) as proxy:
        pipe = await pipelines(f"redis://127.0.0.1:{proxy.port}/0")
        assert await pipe.call("a", "SET", "a", "1") == b"OK"
        proxy.set_mode("blackhole")
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await pipe.call("a", "GET", "a")
        assert time.monotonic() - started < 5  # bounded by the socket timeout (1 s here)
        proxy.set_mode("pass")
        proxy.cut()
        assert await pipe.call("a", "GET", "a") == b"1"


async def test_a_server_that_resets_every_connection_fails_calls_as_not_sent(
        servers: Servers, pipelines: Pipelines) -> None:
    """Accepted, then reset (a proxy `down`): each call fails at once as never sent — none
    is left queued on no connection, waiting for a reply that cannot come."""
    port = int(servers.redis_url.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy("127.0.0.1", port) as proxy:
        pipe = await pipelines(f"redis://127.0.0.1:{proxy.port}/0")
        proxy.set_mode("down")
        for _ in range(20):
            async with asyncio.timeout(5):  # a call queued on no connection hangs forever
                with pytest.raises(RedisDown):
                    await pipe.call("a", "PING")
        proxy.set_mode("pass")
        assert await pipe.call("a", "PING") == b"PONG"


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "auth")
    server.start()
    with redis.Redis(port=server.port) as admin:
        admin.config_set("requirepass", "s3cret")
    yield server
    server.kill()


async def test_the_handshake_authenticates_and_selects_the_database(
        pipelines: Pipelines, guarded: RedisServer) -> None:
    url = f"redis://:s3cret@127.0.0.1:{guarded.port}/3"
    pipe = await pipelines(url)
    assert await pipe.call("k", "SET", "k", "v") == b"OK"
    direct = aioredis.Redis(port=guarded.port, password="s3cret", db=3)
    assert await direct.get("k") == b"v"
    await direct.aclose()
    wrong = await pipelines(f"redis://:nope@127.0.0.1:{guarded.port}/0")
    with pytest.raises(Unavailable):
        await wrong.call("k", "GET", "k")


async def test_calls_follow_a_sentinel_failover(pipelines: Pipelines, tmp_path: Path) -> None:
    deployment = SentinelSet(tmp_path)
    deployment.start()
    try:
        pipe = await pipelines(deployment.url)
        assert await pipe.call("k", "SET", "k", "before") == b"OK"
        old = deployment.kill_primary()
        await asyncio.to_thread(deployment.wait_promoted, old)
        deadline = time.monotonic() + 15
        while True:  # refused, then no master, then the new one
            try:
                assert await pipe.call("k", "SET", "k", "after") == b"OK"
                break
            except Unavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
    finally:
        deployment.stop()


async def test_calls_reach_the_node_of_their_slot(pipelines: Pipelines,
                                                  cluster: Cluster) -> None:
    pipe = await pipelines(cluster.url)
    shard_keys = [keys.thread(s, "t") for s in range(16)]
    await asyncio.gather(*(pipe.call(k, "SET", k, k) for k in shard_keys))
    for k in shard_keys:
        owner = cluster.owner(k)
        direct = aioredis.Redis(port=owner.port)
        assert await direct.get(k) == k.encode()  # it is on the node owning its slot
        await direct.aclose()
    pipe.add_script("count", COUNT)
    assert [r[0] for r in await asyncio.gather(
        *(pipe.script("count", [f"{k}:n"], ["x"]) for k in shard_keys))] == [1] * 16
