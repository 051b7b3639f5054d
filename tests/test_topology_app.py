"""Whole sidecars (tests/sidecar.py subprocesses) on real Redis topologies
(tests/redis_topology.py): two sidecars sharing a three-primary Cluster (write on one, push and
read on the other, flush to PostgreSQL, read-through after Redis lost a thread), and one sidecar
on a Sentinel set whose primary is killed under a load of replica-acknowledged appends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from proxy import keys
from proxy.client import (
    Client,
    RetryPolicy,
    ServerError,
    Subscription,
    TransportError,
    Unavailable,
    new_message_id,
)
from proxy.embedded import clickhouse_url
from proxy.topology import Client as RedisClient
from proxy.topology import connect, parse
from tests.conftest import Servers
from tests.faults.cluster import UNREACHABLE_CLICKHOUSE
from tests.faults.results import Outcome, recording
from tests.helpers import wait_for
from tests.redis_topology import Cluster, SentinelSet, admin
from tests.sidecar import Sidecar

SHARDS = 8  # on three primaries CRC16 puts these 2/4/2 (README: choosing redis.shards)
ROUNDS = 4  # appends per thread in the cluster scenario
# Fail fast while the master is away, so the load measures the failover, not a timeout.
FAST_REDIS = {"TIERPROXY_REDIS_SHARDS": str(SHARDS), "TIERPROXY_REDIS_SOCKET_TIMEOUT_S": "1",
              "TIERPROXY_REDIS_HEALTH_CHECK_INTERVAL_S": "1"}
# Short client backoff: the load notices the new master soon after it takes the role.
LOAD_RETRY = RetryPolicy(attempts=3, total_s=3.0, base_s=0.02, cap_s=0.2)


# ---- sidecars and Redis clients


@asynccontextmanager
async def running(*sidecars: Sidecar) -> AsyncIterator[None]:
    """Start the sidecars together, wait until each is ready; kill -9 them all at the end."""
    try:
        await asyncio.gather(*(asyncio.to_thread(s.start, 45.0) for s in sidecars))
        yield
    finally:
        for sidecar in sidecars:
            await asyncio.to_thread(sidecar.kill)


def redis_client(url: str) -> RedisClient:
    return connect(parse(url), max_connections=8, socket_timeout_s=2.0,
                   health_check_interval_s=1.0)


@pytest.fixture
async def on_cluster(cluster: Cluster) -> AsyncIterator[RedisClient]:
    """A client of the session cluster, every primary emptied first (other tests leave raw
    script calls in the shards' logs, which the sidecars' flushers would take for theirs)."""
    client = redis_client(cluster.url)
    await client.flushall()
    await client.script_flush()
    yield client
    await client.aclose()


def threads_by_node(cluster: Cluster, per_node: int) -> list[str]:
    """Thread ids, `per_node` of them on each primary (by the slot of their shard's tag)."""
    found: list[list[str]] = [[] for _ in cluster.nodes]
    for n in range(10_000):
        tid = f"ct{n}"
        owner = cluster.nodes.index(cluster.owner(keys.log(keys.shard_of(tid, SHARDS))))
        if len(found[owner]) < per_node:
            found[owner].append(tid)
        if all(len(f) == per_node for f in found):
            return [tid for on_node in found for tid in on_node]
    raise AssertionError(f"no {per_node} threads on every node among 10000 ids")


def on_owners(cluster: Cluster, tids: list[str]) -> bool:
    """Each thread's hash is on the primary that owns its slot (asked directly, no redirect),
    so the sidecars' writes did go to every primary."""
    for tid in tids:
        key = thread_keys(tid)[0]
        with admin(cluster.owner(key).port) as r:
            if not r.exists(key):
                return False
    return True


def thread_keys(tid: str) -> list[str]:
    """Every Redis key of a thread and its messages (see proxy/keys.py)."""
    s = keys.shard_of(tid, SHARDS)
    return [keys.thread(s, tid), keys.messages(s, tid), keys.window(s, tid),
            keys.recent(s, tid), keys.overlay(s, tid), keys.cold(s, tid),
            keys.fence(s, "t", tid)]


async def in_postgres(pg: asyncpg.Connection, tids: list[str]) -> dict[str, list[tuple[int, str]]]:
    """(seq, message_id) of each thread's messages in PostgreSQL, in seq order."""
    rows = await pg.fetch("SELECT thread_id, seq, message_id FROM messages "
                          "WHERE thread_id = ANY($1) ORDER BY thread_id, seq", tids)
    out: dict[str, list[tuple[int, str]]] = {tid: [] for tid in tids}
    for r in rows:
        out[r["thread_id"]].append((r["seq"], r["message_id"]))
    return out


async def read_all(client: Client, tid: str) -> list[tuple[int, str]]:
    """(seq, message_id) of every message of the thread, read forward page by page."""
    return [(m["seq"], m["message_id"]) async for m in client.messages(tid, after=0, limit=5)]


# ---- Cluster: two sidecars


def cluster_pair(cluster: Cluster, servers: Servers, root: Path) -> tuple[Sidecar, Sidecar]:
    """A streams to ClickHouse on a chDB directory of its own; B (one chDB process per
    directory) flushes to PostgreSQL only and names a ClickHouse nobody listens on."""
    a = Sidecar(root / "a", cluster.url, servers.postgres_url, clickhouse_url(root / "a"),
                TIERPROXY_FLUSH_SINKS="pg,ch", **FAST_REDIS)
    b = Sidecar(root / "b", cluster.url, servers.postgres_url, UNREACHABLE_CLICKHOUSE,
                TIERPROXY_FLUSH_SINKS="pg", **FAST_REDIS)
    return a, b


async def created_events(sub: Subscription, count: int,
                         timeout_s: float = 20.0) -> dict[str, list[tuple[int, str]]]:
    """The next `count` message.created events, (seq, message_id) per thread as received."""
    out: dict[str, list[tuple[int, str]]] = {}
    got = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for event in sub:
                if event.type == "message.created":
                    assert event.message is not None and event.seq is not None, event
                    out.setdefault(event.thread_id, []).append(
                        (event.seq, event.message["message_id"]))
                    got += 1
                    if got == count:
                        return out
    except TimeoutError:
        raise AssertionError(f"{got} of {count} message.created events within {timeout_s} s: "
                             f"{out}") from None
    raise AssertionError(f"subscription ended after {got} of {count} events")


async def test_two_sidecars_on_a_cluster_write_push_flush_and_read_through(
        cluster: Cluster, on_cluster: RedisClient, servers: Servers, pg: asyncpg.Connection,
        tmp_path: Path) -> None:
    tids = threads_by_node(cluster, per_node=2)
    a, b = cluster_pair(cluster, servers, tmp_path)
    async with running(a, b), Client(a.url) as on_a, Client(b.url) as on_b:
        for tid in tids:
            await on_a.put_thread(tid, title=tid)
        async with on_b.subscribe(*tids) as sub:  # returns once B has subscribed them all
            written: dict[str, list[tuple[int, str]]] = {tid: [] for tid in tids}
            for n in range(ROUNDS):
                for tid in tids:
                    w = await on_a.append(tid, f"{tid} message {n}")
                    written[tid].append((w.doc["seq"], w.doc["message_id"]))
            pushed = await created_events(sub, ROUNDS * len(tids))
            assert sub.connects == 1  # one socket: no resume filled a gap
        assert pushed == written  # each once, in seq order, on every primary's threads
        assert all([s for s, _ in w] == list(range(1, ROUNDS + 1)) for w in written.values())
        assert {tid: await read_all(on_b, tid) for tid in tids} == written
        assert on_owners(cluster, tids)
        await wait_for(lambda: flushed(pg, written), timeout_s=20)
        await forget_and_read_through(on_cluster, on_b, tids[-1], written[tids[-1]])


async def flushed(pg: asyncpg.Connection, written: dict[str, list[tuple[int, str]]]) -> bool:
    return await in_postgres(pg, list(written)) == written


async def forget_and_read_through(redis: RedisClient, client: Client, tid: str,
                                  expected: list[tuple[int, str]]) -> None:
    """Once the thread is released (flushed: its keys have the cache TTL), drop every key of
    it, as eviction would: the next page comes from PostgreSQL and is cached again."""
    hash_key = thread_keys(tid)[0]
    await wait_for(lambda: _has_ttl(redis, hash_key), timeout_s=20)
    assert await redis.exists(hash_key)
    for key in thread_keys(tid):  # one at a time: the cluster client routes each by its slot
        await redis.delete(key)
    first = await client.list_messages(tid, after=0, limit=100)
    assert (first.tier, [(m["seq"], m["message_id"]) for m in first.items]) == (
        "postgres", expected)
    assert await redis.exists(hash_key)  # filled again by the read
    assert await read_all(client, tid) == expected


async def _has_ttl(redis: RedisClient, key: str) -> bool:
    return int(await redis.pttl(key)) > 0


# ---- Sentinel: the primary killed under load


@dataclass
class Ack:
    sent: float  # time.monotonic() when the append call began (its retries included)
    at: float  # ... and when it was answered
    message_id: str
    status: int
    durability: str  # X-Durability of the answer

    @property
    def replicated(self) -> bool:
        """Confirmed on a replica: a 2xx that is no 202 and says so (a 202 says the WAIT
        timed out: only in the primary)."""
        return self.status != 202 and self.durability == "replicated"


@dataclass
class Load:
    """Appends to one thread, one at a time, each asking for `X-Durability: replicated`. A
    failed append is sent again with the same message_id until it is answered (the id makes
    a repeat of an append that did land return the original), so nothing is left unknown but
    the append running when the load stops. Refusals of the request itself (4xx) end it:
    sending it again cannot help."""

    client: Client
    tid: str
    acks: list[Ack] = field(default_factory=list)
    unavailable: list[tuple[float, str]] = field(default_factory=list)  # 503, no answer
    server_errors: list[tuple[float, str]] = field(default_factory=list)  # 500
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def acked_after(self, since: float, count: int) -> bool:
        """At least `count` appends sent after `since` are answered (raises what ended the
        load, if it did)."""
        if self._task is not None and self._task.done():
            self._task.result()
            raise AssertionError("the load ended by itself")
        return len(self.after(since)) >= count

    def after(self, since: float) -> list[Ack]:
        return [a for a in self.acks if a.sent > since]

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self._append(new_message_id())

    async def _append(self, mid: str) -> None:
        sent = time.monotonic()
        while not self._stop.is_set():
            try:
                w = await self.client.append(self.tid, f"load {len(self.acks)}",
                                             message_id=mid, durability="replicated")
            except (Unavailable, TransportError) as e:  # refused, cut, the master away
                self.unavailable.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                continue
            except ServerError as e:  # a bug, reported at the end; the client does not repeat
                self.server_errors.append((time.monotonic(), str(e)))
                await asyncio.sleep(0.02)  # pacing (as its retry policy would), not a wait
                continue
            self.acks.append(Ack(sent, time.monotonic(), mid, w.status, w.durability))
            return


@pytest.fixture
def outcome(request: pytest.FixtureRequest) -> Iterator[Outcome]:
    """The failover's figures, recorded for RELIABILITY.md's matrix when
    TIERPROXY_FAULTS_RESULTS asks for them (tests/faults/results.py)."""
    yield from recording(request)


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    """A set of this test's own (its primary gets killed). Started from this thread: each
    server dies with the thread that started it."""
    deployment = SentinelSet(tmp_path / "redis")
    deployment.start()
    yield deployment
    deployment.stop()


async def test_sentinel_primary_killed_under_load_loses_no_replicated_append(
        sentinel_set: SentinelSet, servers: Servers, pg: asyncpg.Connection,
        tmp_path: Path, outcome: Outcome) -> None:
    outcome.describe("Sentinel: the primary kill -9 under X-Durability: replicated appends, "
                     "the replica promoted (down-after 1 s)", faults_md=None,
                     recovery="kill -9 -> first append acknowledged after it")
    sidecar = Sidecar(tmp_path / "side", sentinel_set.url, servers.postgres_url,
                      UNREACHABLE_CLICKHOUSE, TIERPROXY_FLUSH_SINKS="pg", **FAST_REDIS)
    async with running(sidecar), Client(sidecar.url, retry=LOAD_RETRY, timeout_s=5) as client:
        await client.put_thread("load", title="failover")
        load = Load(client, "load")
        load.start()
        try:
            await wait_for(lambda: load.acked_after(0.0, 20), timeout_s=15)
            old = sentinel_set.kill_primary()
            killed = time.monotonic()
            await asyncio.to_thread(sentinel_set.wait_promoted, old)
            promoted = time.monotonic()
            await wait_for(lambda: load.acked_after(promoted, 10), timeout_s=20)
        finally:
            await load.stop()
        report_failover(load, killed, promoted, outcome)
        durable = {a.message_id for a in load.acks if a.replicated}
        assert durable, f"no append was answered as replicated: {load.acks[:3]}"
        await check_no_replicated_loss(client, pg, load, durable, outcome)
    if load.server_errors:
        at, what = load.server_errors[0]
        pytest.fail(f"{len(load.server_errors)} appends answered 500 during the failover "
                    f"(503 expected), the first {at - killed:.2f} s after the kill: {what}")


async def check_no_replicated_loss(client: Client, pg: asyncpg.Connection, load: Load,
                                   durable: set[str], outcome: Outcome) -> None:
    """Once PostgreSQL holds exactly what the thread's pages show, seq for seq (the flush
    has drained), every replicated append is in both; print how many plain
    acknowledgements were lost. The outcome's lost counts replicated appends only (a plain
    one may be lost in a failover: its notes say how many were)."""
    async def drained() -> list[tuple[int, str]] | None:
        page = await read_all(client, load.tid)
        return page if page == (await in_postgres(pg, [load.tid]))[load.tid] else None

    kept = await wait_for(drained, timeout_s=20)
    ids = {mid for _, mid in kept}
    lost, plain = durable - ids, {a.message_id for a in load.acks} - durable
    outcome.lost, outcome.duplicated = len(lost), len(kept) - len(ids)
    outcome.problems = len(lost) + len(kept) - len(ids)
    outcome.notes += (f"; {len(durable)} replicated, {len(plain)} only acknowledged (202, "
                      f"may be lost): {len(plain - ids)} of those lost")
    assert [seq for seq, _ in kept] == list(range(1, len(kept) + 1))
    assert not lost, f"{len(lost)} replicated appends lost in the failover"
    print(f"plain-acknowledged appends: {len(plain)}, lost: "
          f"{len(plain - ids)}; replicated: {len(durable)}, lost: 0")


def report_failover(load: Load, killed: float, promoted: float, outcome: Outcome) -> None:
    """What the failover cost, measured (shown with -s, and in the outcome), never
    asserted."""
    first = load.after(killed)[0]
    replicated = next((a for a in load.after(killed) if a.replicated), None)
    failed = [what for at, what in load.unavailable if at > killed]
    kinds = sorted({what.split(":")[0] for what in failed})
    outcome.acknowledged = len(load.acks)
    outcome.refused = len(load.unavailable) + len(load.server_errors)  # each sent again
    outcome.recovered(killed, first.at)
    again = ("none (the set's one replica is now the primary)" if replicated is None
             else f"{replicated.at - killed:.2f} s")
    outcome.notes = (f"promotion seen {promoted - killed:.2f} s after the kill; first append "
                     f"answered replicated after it: {again}; {len(load.server_errors)} "
                     "answered 500")
    print(f"\nprimary killed -> promoted {promoted - killed:.2f} s -> first acknowledged "
          f"append {first.at - killed:.2f} s ({first.status}, {first.durability}); first "
          f"replicated: {'none' if replicated is None else f'{replicated.at - killed:.2f} s'}"
          f"; {len(failed)} failed calls meanwhile {kinds}, {len(load.server_errors)} "
          f"answered 500; {len(load.after(promoted))} appends acknowledged after the "
          f"promotion, {len(load.acks)} in all")
