"""The flusher's own logic — coalescing, retries with backoff behind the circuit, poison
isolation, dead letters, the final flush on stop — with proxy.flusher.Flusher on the session's
real Redis (the write-behind log) and the in-memory sink (tests/memory_sink.py) in place of a
database. Log entries are added with XADD in the write scripts' shape (proxy/keys.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from proxy import keys, metrics
from proxy.circuit import CLOSED, Circuit
from proxy.failpoints import Failpoints
from proxy.flusher import FlushConfig, Flusher
from proxy.model import Change
from proxy.writelog import WriteLog
from tests.helpers import wait_for
from tests.memory_sink import Identity, MemorySink

SHARDS = 2
GROUP = "mem"
STOP_S = 10.0  # an idle reader sees a stop within one blocking read (1 s)
CFG = FlushConfig(max_batch=100, max_delay_ms=10, max_attempts=3, claim_idle_ms=60_000,
                  backoff_base_ms=5, backoff_max_ms=40)
Acks = list[tuple[str, int, list[str]]]


class Rig:
    """A flusher of the memory sink on the real log, recording every acknowledgement."""

    def __init__(self, r: aioredis.Redis, sink: MemorySink) -> None:
        self.redis = r
        self.sink = sink
        self.log = WriteLog(r, SHARDS, (GROUP,), Failpoints(""), 3.0)
        self.circuit = Circuit(threshold=2, open_s=0.02)
        self.acks: Acks = []
        self.flusher = Flusher(self.log, sink, self.circuit, CFG, "consumer-1", 2, self._ack,
                               Failpoints(""))

    async def _ack(self, group: str, shard: int, changes: list[Change]) -> None:
        self.acks.append((group, shard, [c.entry_id for c in changes]))
        await self.log.ack_changes(group, shard, changes)

    async def add(self, kind: str, entity: str, version: int, tid: str = "",
                  doc: Any = None) -> str:
        """XADD one change as the scripts log it (state entries carry no tid)."""
        owner = entity if kind == "s" else tid
        fields = {"k": kind, "id": entity, "v": str(version), "e": f"{kind}.test", "ts": "1",
                  "d": orjson.dumps(doc if doc is not None else _doc(kind, entity, tid, version))}
        if kind != "s":
            fields["tid"] = tid
        return await self.add_raw(keys.shard_of(owner, SHARDS), fields)

    async def add_raw(self, shard: int, fields: dict[str, Any]) -> str:
        entry_id: bytes = await self.redis.xadd(keys.log(shard), fields)
        return entry_id.decode()

    async def settled(self) -> bool:
        """Every entry of every shard delivered to the group and acknowledged."""
        for shard in range(SHARDS):
            stream = keys.log(shard)
            last = (await self.redis.xinfo_stream(stream))["last-generated-id"]
            group = next(g for g in await self.redis.xinfo_groups(stream)
                         if g["name"] == GROUP.encode())
            if group["pending"] or group["last-delivered-id"] != last:
                return False
        return True

    async def pending(self) -> int:
        return sum([(await self.redis.xpending(keys.log(s), GROUP))["pending"]
                    for s in range(SHARDS)])

    async def dead_letters(self) -> list[dict[bytes, bytes]]:
        return [f for s in range(SHARDS)
                for _, f in await self.redis.xrange(keys.dead_letters(s))]


def _doc(kind: str, entity: str, tid: str, version: int) -> dict[str, Any]:
    if kind == "m":
        return {"seq": 1, "version": version, "message_id": entity, "thread_id": tid,
                "role": "user", "content": f"v{version}", "metadata": {}, "deleted": False}
    if kind == "t":
        return {"version": version, "thread_id": entity, "title": f"v{version}"}
    return {"version": version, "key": entity, "value": version, "deleted": False}


def counter(metric: Any) -> float:
    return float(metric.labels(GROUP)._value.get())


@pytest.fixture
async def rig(redis: aioredis.Redis) -> Rig:
    """An emptied Redis with the log's groups; the flusher is not running yet."""
    r = Rig(redis, MemorySink(GROUP))
    await r.log.ensure_groups()
    return r


@asynccontextmanager
async def flushing(rig: Rig) -> AsyncIterator[None]:
    """Run the flusher for the body, then stop it: it must end by itself."""
    task = asyncio.create_task(rig.flusher.run(), name="flusher under test")
    try:
        yield
    finally:
        rig.flusher.stop()
        await asyncio.wait_for(task, STOP_S)


def written(sink: MemorySink) -> list[tuple[Identity, int]]:
    """Every (entity, version) the sink committed, over all its successful writes."""
    return sorted((c.identity, c.version) for call in sink.ok_calls() for c in call.changes)


# ---- coalescing


async def test_coalescing_keeps_the_highest_version_per_entity(rig: Rig) -> None:
    """Versions read in one batch collapse to the newest; one message id in two threads is
    two entities, and so is a state key named like a thread."""
    for v in (1, 3, 2):
        await rig.add("s", "k", v)
    for v in (1, 2):
        await rig.add("m", "m1", v, tid="ta")
    await rig.add("m", "m1", 1, tid="tb")
    for v in (2, 1):
        await rig.add("t", "k", v, tid="k")
    coalesced = counter(metrics.COALESCED)
    async with flushing(rig):
        await wait_for(rig.settled)
    assert written(rig.sink) == sorted([(("s", "k", "k"), 3), (("m", "ta", "m1"), 2),
                                        (("m", "tb", "m1"), 1), (("t", "k", "k"), 2)])
    assert counter(metrics.COALESCED) - coalesced == 4
    assert all(group == GROUP for group, _, _ in rig.acks)
    acked = sorted(i for _, _, ids in rig.acks for i in ids)
    assert len(acked) == 8 == len(set(acked))  # superseded entries are acknowledged too


async def test_an_event_sink_gets_every_version_once(redis: aioredis.Redis) -> None:
    rig = Rig(redis, MemorySink(GROUP, coalesce=False))
    await rig.log.ensure_groups()
    for v in (1, 2, 2, 3):  # version 2 logged twice (a replayed dead letter, say)
        await rig.add("m", "m1", v, tid="ta")
    async with flushing(rig):
        await wait_for(rig.settled)
    assert written(rig.sink) == [(("m", "ta", "m1"), v) for v in (1, 2, 3)]


# ---- transient failures


async def test_a_failing_sink_gets_the_same_batch_until_it_commits(rig: Rig) -> None:
    ids = [await rig.add("m", f"m{i}", 1, tid="t1") for i in range(3)]
    rig.sink.fail_next(10**9)  # the database is down
    retries = counter(metrics.RETRIES)
    async with flushing(rig):
        await wait_for(lambda: _failed_at_least(rig.sink, 4))
        assert rig.acks == [] and await rig.pending() == 3  # nothing acknowledged
        assert counter(metrics.CIRCUIT) == 2  # open
        rig.sink.fail_next(0)  # it is back
        await wait_for(rig.settled)
    batches = {tuple(sorted(call.entry_ids)) for call in rig.sink.calls}
    assert batches == {tuple(sorted(ids))}  # every attempt was the very same batch
    assert [c.outcome for c in rig.sink.calls][-1] == "ok"
    assert len(rig.sink.ok_calls()) == 1
    assert counter(metrics.RETRIES) - retries == len(rig.sink.calls) - 1
    assert rig.circuit.state == CLOSED and counter(metrics.CIRCUIT) == 0


async def _failed_at_least(sink: MemorySink, n: int) -> bool:
    return sum(c.outcome == "transient" for c in sink.calls) >= n


# ---- poison


async def test_poison_is_isolated_and_dead_lettered_without_blocking_the_shard(
        rig: Rig) -> None:
    good = [await rig.add("m", "good-1", 1, tid="t1"),
            await rig.add("m", "bad", 1, tid="t1"),
            await rig.add("m", "good-2", 1, tid="t1")]
    bad_id = good.pop(1)
    rig.sink.reject("bad")
    dead = counter(metrics.DEAD_LETTERS)
    async with flushing(rig):
        await wait_for(lambda: _dead_lettered(rig, 1))
        later = await rig.add("m", "later", 1, tid="t1")  # the shard keeps flowing
        await wait_for(rig.settled)
    assert [i for i, _ in written(rig.sink)] == [
        ("m", "t1", "good-1"), ("m", "t1", "good-2"), ("m", "t1", "later")]
    alone = [c for c in rig.sink.calls if c.entry_ids == [bad_id]]
    assert [c.outcome for c in alone] == ["poison"] * CFG.max_attempts
    [letter] = await rig.dead_letters()
    assert letter[b"source_id"].decode() == bad_id and letter[b"group"] == GROUP.encode()
    assert b"rejected m:bad" in letter[b"error"]
    assert letter[b"id"] == b"bad" and orjson.loads(letter[b"d"])["message_id"] == "bad"
    assert counter(metrics.DEAD_LETTERS) - dead == 1
    acked = {i for _, _, ids in rig.acks for i in ids}
    assert acked == {*good, later}  # the poison entry is acked by its move to dead letters


async def _dead_lettered(rig: Rig, n: int) -> bool:
    return len(await rig.dead_letters()) >= n


async def test_an_unreadable_entry_is_dead_lettered(rig: Rig) -> None:
    shard = keys.shard_of("t1", SHARDS)
    before = await rig.add("m", "m1", 1, tid="t1")
    broken = [await rig.add_raw(shard, {"k": "m", "id": "no-doc"}),
              await rig.add_raw(shard, {"k": "m", "id": "m2", "tid": "t1", "v": "two",
                                        "e": "message.created", "ts": "1", "d": b"{}"})]
    after = await rig.add("m", "m3", 1, tid="t1")
    async with flushing(rig):
        await wait_for(rig.settled)
    assert [i for i, _ in written(rig.sink)] == [("m", "t1", "m1"), ("m", "t1", "m3")]
    seen = {i for call in rig.sink.calls for i in call.entry_ids}
    assert seen == {before, after}  # the sink never got the unreadable ones
    letters = await rig.dead_letters()
    assert sorted(f[b"source_id"].decode() for f in letters) == sorted(broken)
    assert all(b"malformed log entry" in f[b"error"] for f in letters)


# ---- stop


async def test_stop_flushes_what_the_log_holds_and_ends(rig: Rig) -> None:
    """Stopped before it even started: the final flush alone drains every shard (more than
    one read of max_batch each)."""
    for i in range(250):
        await rig.add("s", f"k{i}", 1)
    rig.flusher.stop()
    await asyncio.wait_for(rig.flusher.run(), STOP_S)
    assert len(written(rig.sink)) == 250
    assert await rig.settled()


async def test_stop_finishes_the_batch_in_hand_and_what_came_after(rig: Rig) -> None:
    rig.sink.hold.clear()  # the first write parks in the sink
    await rig.add("s", "first", 1)
    task = asyncio.create_task(rig.flusher.run())
    await wait_for(lambda: _calls_at_least(rig.sink, 1))
    for i in range(5):  # written while a batch is in hand, before the stop
        await rig.add("s", f"then-{i}", 1)
    rig.flusher.stop()
    rig.sink.hold.set()
    await asyncio.wait_for(task, STOP_S)
    assert [i[1] for i, _ in written(rig.sink)] == ["first", *(f"then-{i}" for i in range(5))]
    assert await rig.settled()


async def _calls_at_least(sink: MemorySink, n: int) -> bool:
    return len(sink.calls) >= n
