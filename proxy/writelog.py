"""WriteLog: the per-shard write-behind streams — groups, reads, acks, claims, safe trims,
dead letters. Consumers never see driver types: entries come out as `model.Change` objects
(or `Unreadable` ones, which the flusher dead-letters)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rexc

from proxy import keys
from proxy.failpoints import Failpoints
from proxy.model import Change
from proxy.redisconn import Scripts, redis_call

logger = logging.getLogger(__name__)
COUNT_CAP = 2_000  # entries one backlog measurement reads at most per side of a stream
REPLAY_MAX = 10_000  # dead letters one replay call moves per shard
SAFE_POLICIES = ("noeviction", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl")


class UnsafeRedis(RuntimeError):
    """Redis could evict keys that hold unflushed writes."""


@dataclass(frozen=True)
class Unreadable:
    """A log entry that cannot be decoded: the flusher dead-letters it."""

    entry_id: str
    error: str
    only: str = ""


Delivery = Change | Unreadable


def decode(shard: int, entry_id: bytes, fields: dict[bytes, bytes]) -> Change:
    """Raises KeyError/ValueError on a malformed entry (the flusher dead-letters it)."""
    return Change(shard, entry_id.decode(), fields[b"k"].decode(), fields[b"id"].decode(),
                 fields.get(b"tid", fields[b"id"]).decode(), int(fields[b"v"]),
                 fields[b"e"].decode(), int(fields[b"ts"]), fields[b"d"],
                 fields.get(b"g", b"").decode(), fields.get(b"f", b"").decode())


@dataclass(frozen=True)
class ShardBacklog:
    entries: int
    lag_s: float


class Backlog:
    """What the monitor last measured of the write path's load: the PostgreSQL backlog
    (entries in all shards, age of the oldest) and Redis's used_memory / maxmemory (0: no
    maxmemory). The hot tier refuses writes while one passes its bound."""

    def __init__(self) -> None:
        self.entries = 0
        self.lag_s = 0.0
        self.memory_ratio = 0.0


class WriteLog:
    def __init__(self, client: Any, shards: int, groups: tuple[str, ...],
                 failpoints: Failpoints, socket_timeout_s: float) -> None:
        self._r = client
        self._scripts = Scripts(client)
        self._failpoints = failpoints
        self.shards = shards
        self.groups = groups  # every consumer group (one per sink)
        self.epoch: str | None = None  # Redis's epoch marker as this process first saw it
        # A blocking read must return well within the socket timeout, or an idle stream looks
        # like a dead Redis (a timeout, a reconnect and a warning every read).
        self._max_block_ms = max(1, int(socket_timeout_s * 500))

    async def check_eviction_policy(self) -> None:
        """Refuse a Redis that may evict keys without TTL (allkeys-*): they hold unflushed data."""
        policy = (await self._r.config_get("maxmemory-policy")).get("maxmemory-policy", "")
        if policy not in SAFE_POLICIES:
            raise UnsafeRedis(
                f"redis maxmemory-policy is {policy!r}, which can evict writes not yet flushed; "
                f"use one of {', '.join(SAFE_POLICIES)} (tierproxy only sets TTLs on flushed keys)")

    async def memory_ratio(self) -> float:
        """used_memory / maxmemory of the fullest server (a Cluster answers per node)."""
        every = {"target_nodes": "primaries"} if hasattr(self._r, "get_primaries") else {}
        info = await redis_call(lambda: self._r.info("memory", **every))
        nodes = info.values() if all(isinstance(v, dict) for v in info.values()) else [info]
        return max((n["used_memory"] / n["maxmemory"] for n in nodes if n.get("maxmemory")),
                   default=0.0)

    async def epoch_changed(self) -> bool:
        """True if Redis's epoch marker (a random token set once per dataset) is gone or not
        the one this process saw first: Redis restarted empty, was flushed or failed over to a
        server without the data, and every unflushed write in it is gone. Whoever notices first
        sets a new one (ensure_groups), so every other process sees a change too."""
        current = await redis_call(lambda: self._r.get(keys.EPOCH))
        return current is None or current.decode() != self.epoch

    async def ensure_groups(self) -> None:
        """Create every group at 0 with MKSTREAM, all of a shard's at once (create_groups.lua);
        groups another sidecar made are kept. The first call remembers Redis's epoch."""
        await redis_call(lambda: self._r.set(keys.EPOCH, os.urandom(8).hex(), nx=True))
        if self.epoch is None:
            self.epoch = (await redis_call(lambda: self._r.get(keys.EPOCH)) or b"").decode()
        for shard in range(self.shards):
            await self._scripts.run("create_groups", [keys.log(shard)], list(self.groups))

    async def read(self, shard: int, group: str, consumer: str, count: int,
                   block_ms: int | None) -> list[Delivery]:
        """New entries for this consumer, waiting up to block_ms for one (None: no wait);
        malformed ones come back as `Unreadable`."""
        stream = keys.log(shard)
        if block_ms is not None:
            block_ms = min(block_ms, self._max_block_ms)
        reply = await redis_call(lambda: self._r.xreadgroup(
            group, consumer, {stream: ">"}, count=count, block=block_ms))
        return self._decode_all(shard, reply[0][1] if reply else [])

    def _decode_all(self, shard: int, raw: list[Any]) -> list[Delivery]:
        out: list[Delivery] = []
        for entry_id, fields in raw:
            if fields is None:  # deleted while pending: nothing left to flush
                out.append(Unreadable(entry_id.decode(), "entry vanished from the stream"))
                continue
            try:
                out.append(decode(shard, entry_id, fields))
            except (KeyError, ValueError) as e:
                out.append(Unreadable(entry_id.decode(), f"malformed log entry: {e!r}",
                                      fields.get(b"g", b"").decode(errors="replace")))
        return out

    async def claim_idle(self, shard: int, group: str, consumer: str, min_idle_ms: int,
                         count: int) -> list[Delivery]:
        """Take over entries idle longer than min_idle_ms (their consumer is presumed dead)."""
        reply = await redis_call(lambda: self._r.xautoclaim(
            keys.log(shard), group, consumer, min_idle_ms, start_id="0-0", count=count))
        return self._decode_all(shard, reply[1])

    async def add_for(self, group: str, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Log entries (routing id, fields) meant for one consumer group alone, each in its
        entity's shard: changes another tier already has (write-through's, for ClickHouse)."""
        for routing_id, fields in entries:
            shard = keys.shard_of(routing_id, self.shards)
            await redis_call(lambda s=shard, f=fields: self._r.xadd(  # type: ignore[misc]
                keys.log(s), {**f, "g": group}))

    async def still_pending(self, group: str, consumer: str,
                            changes: list[Change]) -> list[Change]:
        """The changes whose entries `group` still holds pending, now this consumer's (XCLAIM
        JUSTID). An erasure deletes and acknowledges its entity's entries: a batch held
        through a sink outage must not write them once the sink is back."""
        kept: list[Change] = []
        for shard in sorted({c.shard for c in changes}):
            ids = [c.entry_id for c in changes if c.shard == shard]
            held = await redis_call(lambda s=shard, i=ids: self._r.xclaim(  # type: ignore[misc]
                keys.log(s), group, consumer, 0, i, justid=True))
            held_ids = {_as_str(i) for i in held}
            kept += [c for c in changes if c.shard == shard and c.entry_id in held_ids]
        return kept

    async def ack(self, shard: int, group: str, ids: list[str]) -> None:
        if ids:
            await redis_call(lambda: self._r.xack(keys.log(shard), group, *ids))

    async def ack_changes(self, group: str, shard: int, changes: list[Change]) -> None:
        """The acknowledgement of a sink that leaves no cache state to release (ClickHouse);
        PostgreSQL's is HotTier.release."""
        await self.ack(shard, group, [c.entry_id for c in changes])

    async def remove_dead_consumers(self, shard: int, group: str, me: str,
                                    idle_ms: int) -> int:
        """Delete consumers idle past idle_ms whose pending list is empty, in one step
        (remove_consumers.lua): never one with pending entries, which would orphan them."""
        return int(await self._scripts.run("remove_consumers", [keys.log(shard)],
                                           [group, me, idle_ms]))

    async def trim(self, shard: int) -> int:
        """Drop entries every group has acknowledged (trim.lua: exact, never past an entry a
        group holds pending or has not been delivered); -1 when a group is missing, which is
        then created at 0, so it gets everything still in the log."""
        await self._failpoints.hit("before-trim")
        trimmed = int(await self._scripts.run("trim", [keys.log(shard)], list(self.groups)))
        if trimmed < 0:
            logger.warning("log of shard %d: a consumer group (or the log) is missing; not "
                           "trimmed, creating what is missing at 0", shard)
            await self.ensure_groups()
        return trimmed

    async def backlog(self, shard: int, group: str) -> ShardBacklog:
        """Entries the group has not acknowledged (pending + undelivered), and the age of the
        oldest one in seconds."""
        stream = keys.log(shard)
        groups = await self._groups(stream)
        info = next((g for g in groups if _as_str(g["name"]) == group), None)
        if info is None:
            return ShardBacklog(0, 0.0)
        start = _next_id(info["last-delivered-id"])
        undelivered = await redis_call(lambda: self._r.xrange(stream, min=start, count=1))
        pending, oldest = info["pending"], None
        if pending:  # the list may have emptied since XINFO: XPENDING has the last word
            summary = await redis_call(lambda: self._r.xpending(stream, group))
            pending = summary["pending"]
            oldest = _as_str(summary["min"]) if pending else None
        if oldest is None and undelivered:
            oldest = undelivered[0][0].decode()
        entries = pending + await self._count_from(stream, start)
        return ShardBacklog(entries, _age_s(oldest, await self._now_ms()) if oldest else 0.0)

    async def _groups(self, stream: str) -> list[dict[str, Any]]:
        try:
            return await redis_call(lambda: self._r.xinfo_groups(stream))
        except rexc.ResponseError as e:
            if "no such key" in str(e):  # the stream is gone (Redis lost its data)
                return []
            raise

    async def _count_from(self, stream: str, start: str) -> int:
        """Entries at or after `start`, counted inside Redis (count_from.lua)."""
        return int(await self._scripts.run("count_from", [stream], [start, COUNT_CAP]))

    async def _now_ms(self) -> int:
        seconds, micros = await redis_call(lambda: self._r.time())
        return int(seconds) * 1000 + int(micros) // 1000

    async def dead_letter(self, shard: int, group: str, entry_id: str, error: str) -> bool:
        """Acknowledge the entry for `group` and keep it with its error in the shard's
        dead-letter stream (dead_letter.lua); False if another consumer acknowledged it."""
        moved = await self._scripts.run("dead_letter", [keys.log(shard), keys.dead_letters(shard)],
                                        [group, entry_id, error])
        return bool(moved)

    async def dead_letters(self, shard: int, count: int = 100) -> list[dict[str, str]]:
        rows = await redis_call(lambda: self._r.xrange(keys.dead_letters(shard), count=count))
        return [{"id": i.decode(), **{k.decode(): _text(v) for k, v in f.items()
                                      if k != b"d"}} for i, f in rows]

    async def dead_letter_counts(self, shard: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        if await redis_call(lambda: self._r.xlen(keys.dead_letters(shard))):
            for _, f in await redis_call(lambda: self._r.xrange(keys.dead_letters(shard))):
                group = _as_str(f.get(b"group", b"?"))
                counts[group] = counts.get(group, 0) + 1
        return counts

    async def replay_dead_letters(self, shard: int) -> int:
        """Re-queue every dead letter (after a fix) for the group that gave up on it, and
        remove it from the dead-letter stream, atomically (replay.lua)."""
        if not await redis_call(lambda: self._r.xlen(keys.dead_letters(shard))):
            return 0
        await self._failpoints.hit("before-replay-move")
        return int(await self._scripts.run("replay", [keys.dead_letters(shard), keys.log(shard)],
                                           [REPLAY_MAX]))


async def all_dead_letters(log: WriteLog, limit: int = 100) -> list[dict[str, str]]:
    """The first dead letters of every shard, at most `limit`."""
    out: list[dict[str, str]] = []
    for shard in range(log.shards):
        out += await log.dead_letters(shard, limit)
    return out[:limit]


async def replay_all(log: WriteLog) -> int:
    """Put every shard's dead letters back in its log; how many."""
    total = 0
    for shard in range(log.shards):
        total += await log.replay_dead_letters(shard)
    logger.info("replayed %d dead letters", total)
    return total


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


def _id_key(entry_id: str | bytes) -> tuple[int, int]:
    ms, _, seq = _as_str(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: Any) -> str:
    ms, seq = _id_key(entry_id)
    return f"{ms}-{seq + 1}"


def _age_s(entry_id: str, now_ms: int) -> float:
    return max(0.0, (now_ms - _id_key(entry_id)[0]) / 1000)
