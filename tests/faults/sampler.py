"""Samples of Redis and PostgreSQL taken during the nemesis run, for the invariants that no
client answer shows until much later (or never):

- 4, no unflushed data with a TTL: an atomic snapshot (one Lua script) of every cache key with
  its TTL and the versions it holds; PostgreSQL is read right after. A key that had a TTL and
  held a version PostgreSQL does not have even later was unflushed when it had the TTL
  (PostgreSQL versions only grow). No false positive whatever `pend` says.
- 8, no refill installs an older version or seq: the same snapshot against what PostgreSQL held
  before it. Every version reaches Redis before PostgreSQL, so Redis holding less than
  PostgreSQL already had (a thread's last_seq, a message's or state entry's version, a cold
  cache doc that would be served) means a stale refill replaced a newer one.
- 2, no regression in PostgreSQL: a version or last_seq lower than an earlier sample's.
- 3, the log is trimmed only below every group's unacknowledged entries: atomically per
  shard, every pending entry of every group still exists, and the oldest undelivered entry
  of the previous sample still exists while the group has not read past it.

A sample taken while Redis or PostgreSQL is down is skipped. With write-through on, 8 is not
checked here: while Redis is down PostgreSQL gets the writes first, and Redis holds older
copies until reconciliation drops them (the history checker holds the answers to 8).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis import exceptions as rexc

from proxy import keys

# Every cache key: {letter, key, pttl, fields...}. t: v seq; m: m|<mid> values; c: the cold
# docs (mid, doc, ...); k: v. Atomic: TTLs and versions are of one instant.
CACHE_SNAPSHOT = """
local out = {}
for _, k in ipairs(redis.call('KEYS', 'tp:{*}:*')) do
  local letter = string.match(k, '^tp:{%d+}:(%a):')
  local row
  if letter == 't' then
    row = redis.call('HMGET', k, 'v', 'seq')
  elseif letter == 'k' then
    row = redis.call('HMGET', k, 'v')
  elseif letter == 'c' then
    row = redis.call('HGETALL', k)
  elseif letter == 'm' then
    row = {}
    for _, f in ipairs(redis.call('HKEYS', k)) do
      if string.sub(f, 1, 2) == 'm|' then
        row[#row + 1] = string.sub(f, 3)
        row[#row + 1] = redis.call('HGET', k, f)
      end
    end
  end
  if row then out[#out + 1] = {letter, k, redis.call('PTTL', k), row} end
end
return out
"""
# Per group of one stream: {name, last-delivered-id, oldest undelivered ('' none), pending ids
# whose entry is gone, whether ARGV's previous oldest undelivered of that group still exists}.
LOG_SNAPSHOT = """
local out = {}
if redis.call('EXISTS', KEYS[1]) == 0 then return out end
local previous = {}
for i = 1, #ARGV, 2 do previous[ARGV[i]] = ARGV[i + 1] end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local name, last = info['name'], info['last-delivered-id']
  local gone = {}
  for _, p in ipairs(redis.call('XPENDING', KEYS[1], name, '-', '+', 100000)) do
    if #redis.call('XRANGE', KEYS[1], p[1], p[1]) == 0 then gone[#gone + 1] = p[1] end
  end
  local nxt = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
  local prev, exists = previous[name], -1
  if prev and prev ~= '' then exists = #redis.call('XRANGE', KEYS[1], prev, prev) end
  out[#out + 1] = {name, last, nxt[1] and nxt[1][1] or '', gone, exists}
end
return out
"""
KEY_RE = re.compile(r"^tp:\{(\d+)\}:([tmck]):(.*)$")
Entity = tuple[str, str]  # ("t", thread id) | ("m", message id) | ("s", state key)
Report = Callable[[str, str], None]  # (invariant label, message)


@dataclass
class CacheRow:
    entity: Entity
    ttl: bool
    version: int
    last_seq: int = -1  # threads only
    thread_id: str = ""  # messages only


@dataclass
class Snapshot:
    at: float
    rows: list[CacheRow] = field(default_factory=list)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_cache(raw: list[Any], at: float) -> Snapshot:
    snap = Snapshot(at)
    for letter_b, key_b, pttl, row in raw:
        match = KEY_RE.match(_text(key_b))
        if match is None:
            continue
        letter, name, ttl = _text(letter_b), match.group(3), int(pttl) > 0
        if letter == "t" and row[0] is not None:
            snap.rows.append(CacheRow(("t", name), ttl, int(row[0]), int(row[1] or 0)))
        elif letter == "k" and row[0] is not None:
            snap.rows.append(CacheRow(("s", name), ttl, int(row[0])))
        elif letter == "m":
            snap.rows += [CacheRow(("m", _text(mid)), ttl, int(_text(meta).split(",")[0]),
                                   thread_id=name)
                          for mid, meta in zip(row[::2], row[1::2], strict=True)]
        elif letter == "c":
            snap.rows += [CacheRow(("c", _text(mid)), ttl, int(orjson.loads(doc)["version"]))
                          for mid, doc in zip(row[::2], row[1::2], strict=True)]
    return snap


def served(snap: Snapshot) -> list[CacheRow]:
    """The rows a read would be served: cold docs only where the hash holds no doc."""
    in_hash = {r.entity[1] for r in snap.rows if r.entity[0] == "m"}
    return [CacheRow(("m", r.entity[1]), r.ttl, r.version) if r.entity[0] == "c" else r
            for r in snap.rows if r.entity[0] != "c" or r.entity[1] not in in_hash]


@dataclass
class PgVersions:
    at: float
    versions: dict[Entity, int]
    last_seq: dict[str, int]


async def read_pg(conn: asyncpg.Connection, mids: list[str]) -> PgVersions:
    at = time.monotonic()
    threads = await conn.fetch("SELECT thread_id, version, last_seq FROM threads")
    messages = await conn.fetch("SELECT message_id, version FROM messages"
                                " WHERE message_id = ANY($1)", mids)
    state = await conn.fetch("SELECT key, version FROM state_entries")
    versions: dict[Entity, int] = {("t", r["thread_id"]): r["version"] for r in threads}
    versions.update({("m", r["message_id"]): r["version"] for r in messages})
    versions.update({("s", r["key"]): r["version"] for r in state})
    return PgVersions(at, versions, {r["thread_id"]: r["last_seq"] for r in threads})


class Sampler:
    """Samples every `interval_s` until stopped; violations go to `report`."""

    def __init__(self, redis_url: str, pg_url: str, shards: int, report: Report,
                 interval_s: float = 0.25, *, write_through: bool = False) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=2.0,
                                              socket_connect_timeout=1.0)
        self._pg_url = pg_url
        self._shards = shards
        self._report = report
        self._interval_s = interval_s
        self._write_through = write_through
        self._seen: dict[Entity, int] = {}  # the highest version PostgreSQL showed so far
        self._seen_seq: dict[str, int] = {}
        self._undelivered: dict[int, dict[str, str]] = {}  # shard -> group -> oldest id
        self.samples = 0
        # (thread id, finding): a message of a thread erased meanwhile may have a TTL without
        # reaching PostgreSQL (the erase removes its unflushed log entries and dead letters)
        self.unflushed_messages: list[tuple[str, str]] = []
        self.skipped: Counter[str] = Counter()  # why samples were skipped (a dependency down)
        self.seconds = 0.0  # spent sampling
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nemesis-sampler")

    async def stop(self) -> None:
        """Stop sampling and close the Redis client (a second call does nothing)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not self._closed:
            self._closed = True
            await self._redis.aclose()

    async def _run(self) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while True:
                started = time.monotonic()
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self._pg_url, timeout=2)
                    await self.sample(conn)
                except (rexc.RedisError, OSError, asyncpg.PostgresError,
                        asyncpg.InterfaceError, TimeoutError) as e:
                    self.skipped[type(e).__name__] += 1  # a dependency is down
                    if conn is not None:
                        conn.terminate()
                    conn = None
                self.seconds += time.monotonic() - started
                await asyncio.sleep(self._interval_s)  # the sampling period
        finally:
            if conn is not None:
                conn.terminate()

    async def sample(self, conn: asyncpg.Connection) -> None:
        """One round: the log of every shard, the cache, then PostgreSQL."""
        for shard in range(self._shards):
            await self._check_log(shard)
        snap = parse_cache(await self._redis.eval(CACHE_SNAPSHOT, 0), time.monotonic())
        rows = served(snap)
        pg = await read_pg(conn, sorted({r.entity[1] for r in rows if r.entity[0] == "m"}))
        self._check_stale(rows)
        self._check_ttls(rows, pg)
        self._merge(pg)
        self.samples += 1

    async def _check_log(self, shard: int) -> None:
        previous = self._undelivered.get(shard, {})
        args = [x for group, oldest in previous.items() for x in (group, oldest)]
        groups = await self._redis.eval(LOG_SNAPSHOT, 1, keys.log(shard), *args)
        now: dict[str, str] = {}
        for name_b, last_b, oldest_b, gone, exists in groups:
            name, last, oldest = _text(name_b), _text(last_b), _text(oldest_b)
            for entry in gone:
                self._report("3", f"shard {shard} group {name}: pending entry {_text(entry)} "
                             "was trimmed from the log")
            prev = previous.get(name, "")
            if prev and exists == 0 and _id(last) < _id(prev):
                self._report("3", f"shard {shard} group {name}: entry {prev} was trimmed "
                             f"before the group read it (last delivered {last})")
            now[name] = oldest
        self._undelivered[shard] = now

    def _check_stale(self, rows: list[CacheRow]) -> None:
        if self._write_through:  # PostgreSQL gets writes first then; answers are checked
            return
        for r in rows:
            known = self._seen.get(r.entity)
            if known is not None and r.version < known:
                self._report("8", f"redis holds {_name(r.entity)} at v{r.version}, postgres "
                             f"already had v{known}: a refill installed an older version")
            seq = self._seen_seq.get(r.entity[1], 0) if r.entity[0] == "t" else 0
            if r.entity[0] == "t" and r.last_seq < seq:
                self._report("8", f"redis holds thread {r.entity[1]} at last_seq {r.last_seq},"
                             f" postgres already had {seq}: a refill took last_seq back")

    def _check_ttls(self, rows: list[CacheRow], pg: PgVersions) -> None:
        for r in rows:
            if not r.ttl:
                continue
            have = pg.versions.get(r.entity, 0)
            if r.version > have:
                finding = (f"redis gave {_name(r.entity)} a TTL at v{r.version}, which "
                           f"postgres does not have (v{have} even later): unflushed data")
                if r.thread_id:  # judged at the end: its thread's erase may have dropped it
                    self.unflushed_messages.append((r.thread_id, finding))
                else:
                    self._report("4", finding)
            if r.entity[0] == "t" and r.last_seq > pg.last_seq.get(r.entity[1], 0):
                self._report("4", f"redis gave thread {r.entity[1]} a TTL at last_seq "
                             f"{r.last_seq}; postgres has {pg.last_seq.get(r.entity[1], 0)}"
                             " even later: unflushed messages")

    def _merge(self, pg: PgVersions) -> None:
        for entity, version in pg.versions.items():
            if version < self._seen.get(entity, 0):
                self._report("2", f"postgres took {_name(entity)} back from "
                             f"v{self._seen[entity]} to v{version}")
            self._seen[entity] = max(version, self._seen.get(entity, 0))
        for tid, seq in pg.last_seq.items():
            if seq < self._seen_seq.get(tid, 0):
                self._report("2", f"postgres took thread {tid} last_seq back from "
                             f"{self._seen_seq[tid]} to {seq}")
            self._seen_seq[tid] = max(seq, self._seen_seq.get(tid, 0))


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _name(entity: Entity) -> str:
    return {"t": "thread", "m": "message", "s": "state"}[entity[0]] + " " + entity[1]
