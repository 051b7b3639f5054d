"""What every room of the hot tier shares: the Redis scripts, the shard of an id, admission
under backpressure, reads below Redis, and the one retry ladder of a script call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy import autopipe, keys, metrics, tracing
from proxy.backends import Backing
from proxy.errors import BackingDown, Backpressure, Unavailable
from proxy.failpoints import Failpoints
from proxy.flights import SingleFlight
from proxy.hot.owners import OwnerHints
from proxy.redisconn import RedisClient
from proxy.settings import Settings
from proxy.writelog import Backlog

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_ATTEMPTS = 5
FENCE_MS = 60_000  # a read-through's fill comes within this of its load, or is refused


# X-Durability: in the Redis primary; also on redis.ack_replicas replicas; also committed in
# PostgreSQL (each level answered only once reached: else 202 with the level reached).
ACKNOWLEDGED, REPLICATED, PERSISTED = "acknowledged", "replicated", "persisted"
LEVELS = (ACKNOWLEDGED, REPLICATED, PERSISTED)


@dataclass
class Fence:
    token: str
    held: bool = False  # set when the fenced block ends


@dataclass(frozen=True)
class Result:
    """A doc and the tier that served it; `created` tells 201 from 200 on writes, and
    `durability` the level a write reached (X-Durability)."""

    doc: bytes
    tier: str = "redis"
    created: bool = False
    durability: str = ACKNOWLEDGED


class Core:
    def __init__(self, client: RedisClient, settings: Settings, backing: Backing,
                 backlog: Backlog, degraded: Backing | None, failpoints: Failpoints) -> None:
        self.failpoints = failpoints
        self._pipe = autopipe.for_client(settings, client)
        self.settings = settings
        self.backing = backing
        self.degraded = degraded  # read-only, when the backing is down
        self.backlog = backlog
        self.flights = SingleFlight()
        self.owners = OwnerHints()  # inbox: the owner index key each thread write needs

    async def run(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        """One script call, auto-pipelined with the other requests' calls of this tick."""
        with tracing.redis_span(name):
            return await self._pipe.script(name, keys_, args)

    async def call(self, key: str, *command: Any) -> Any:
        """One plain command on `key`'s server, auto-pipelined."""
        return await self._pipe.call(key, *command)

    async def aclose(self) -> None:
        await self._pipe.aclose()

    def shard(self, entity_id: str) -> int:
        return keys.shard_of(entity_id, self.settings.redis.shards)

    def fence_key(self, kind: str, entity_id: str) -> str:
        """The load fence of a thread ('t', with its messages) or a state key ('k')."""
        return keys.fence(self.shard(entity_id), kind, entity_id)

    @contextlib.asynccontextmanager
    async def fenced(self, kind: str, entity_id: str) -> AsyncIterator[Fence]:
        """Around a load from below and what is written into Redis based on it: the token the
        fill (or the write) must present, registered before the load (see keys.py). After the
        block, `held` says whether it still was: False means the entity was released since
        the load began, so what it read may be older than what was flushed meanwhile."""
        key, fence = self.fence_key(kind, entity_id), Fence(os.urandom(8).hex())
        await self.run("load_fence", [key], [fence.token, FENCE_MS])
        try:
            yield fence
        finally:
            with contextlib.suppress(Unavailable):  # else it expires with the set
                fence.held = bool(await self.call(key, "SREM", key, fence.token))

    async def fresh(self, kind: str, entity_id: str,
                    load: Callable[[str], Awaitable[T]]) -> T:
        """`load(token)` under a fence, again until no release of the entity happened while
        it ran: its result is then at least as new as every write acknowledged before it
        began, for the caller and for everyone who joined the same single-flight load."""
        for _ in range(MAX_ATTEMPTS):
            async with self.fenced(kind, entity_id) as fence:
                result = await load(fence.token)
            if fence.held:
                return result
        raise Unavailable(f"{kind} {entity_id}: changed during every read-through, try again")

    def thread_keys(self, tid: str) -> list[str]:
        """thread, messages, window, log: the keys of the thread scripts, in that order."""
        s = self.shard(tid)
        return [keys.thread(s, tid), keys.messages(s, tid), keys.window(s, tid), keys.log(s)]

    def inbox_key(self, tid: str, owner: str) -> str:
        """The inbox index of `owner` on the shard of thread `tid`."""
        return keys.inbox(self.shard(tid), owner)

    def changes_key(self, tid: str) -> str:
        return keys.changes(self.shard(tid), tid)

    def recent_key(self, tid: str) -> str:
        return keys.recent(self.shard(tid), tid)

    def overlay_key(self, tid: str) -> str:
        return keys.overlay(self.shard(tid), tid)

    @property
    def ttl_ms(self) -> int:
        return self.settings.cache.ttl_s * 1000

    def admit(self) -> None:
        """Refuse a write while the write-behind backlog, its age or Redis's memory use is
        over its bound (reads go on; the monitor's next measurement lifts it)."""
        b, s = self.backlog, self.settings
        if b.entries >= s.flush.max_backlog:
            _refuse("backlog", f"write-behind backlog is full ({b.entries} entries, "
                               f"flush.max_backlog {s.flush.max_backlog})")
        if b.lag_s > s.flush.max_lag_s:
            _refuse("lag", f"write-behind is {b.lag_s:.0f} s behind (flush.max_lag_s "
                           f"{s.flush.max_lag_s:g})")
        if b.memory_ratio > s.redis.max_memory_ratio:
            _refuse("memory", f"redis memory is {b.memory_ratio:.0%} of maxmemory "
                              f"(redis.max_memory_ratio {s.redis.max_memory_ratio:g})")

    async def stored(self, kind: str, entity_id: str, doc: bytes, durability: str,
                     created: bool = False, fingerprint: str = "",
                     erased: bool = False) -> Result:
        """A write of the entity that happened in Redis (or was found there: a repeat),
        answered at the level it reaches: `replicated` once WAIT saw it on
        redis.ack_replicas replicas in time; `persisted` once also committed in PostgreSQL.
        A level not reached in time is answered as acknowledged (never an error: the write
        happened, and its flush will still bring it to PostgreSQL). `erased`: an erasure's
        tombstone, persisted with its erasure."""
        if durability == REPLICATED:
            return Result(doc, created=created, durability=await self._replicated(entity_id))
        if durability != PERSISTED:
            return Result(doc, created=created)
        try:
            await _within(self.backing.persist(kind, doc, fingerprint, erased),
                          self.settings.api.request_timeout_s / 2)
        except Exception as e:  # any failure: the answer says what happened
            logger.warning("%s write-through not confirmed (%r): answered as acknowledged",
                           kind, e)
            return Result(doc, created=created)
        return Result(doc, created=created, durability=PERSISTED)

    async def _replicated(self, entity_id: str) -> str:
        wanted = max(1, self.settings.redis.ack_replicas)
        try:
            replicas = await self._pipe.replicas(keys.wait_mark(self.shard(entity_id)), wanted,
                                                 self.settings.redis.ack_timeout_ms)
        except Unavailable as e:  # the write happened: say only what is known
            logger.warning("replication of a write not confirmed (%s): acknowledged", e)
            replicas = 0
        if replicas >= wanted:
            metrics.REPLICATION_WAITS.labels("confirmed").inc()
            return REPLICATED
        metrics.REPLICATION_WAITS.labels("short").inc()
        return ACKNOWLEDGED

    async def below(self, load: Callable[[], Awaitable[T]],
                    degraded: Callable[[Backing], Awaitable[T]] | None) -> tuple[T, str]:
        """A read below Redis: from the backing (which caches it again), else, while the
        backing is unavailable, from the degraded tier, read-only (never cached: it may be
        stale, and writes must not build on it). Only the backing being down counts: Redis
        failing during the read-through (its fence or fill) is a 503 — ClickHouse lags, so
        its answer could be a 404 for a live message. `degraded` None: a write's read, which
        must not build on it."""
        try:
            return await load(), self.backing.tier
        except BackingDown:
            if self.degraded is None or degraded is None:
                raise
            return await degraded(self.degraded), self.degraded.tier


async def _within(work: Awaitable[None], seconds: float) -> None:
    """Await `work` for at most `seconds`, then give up on it without waiting for its
    cancellation to finish: asyncpg's cleanup of a query on a black-holed PostgreSQL (a cancel
    request on a new connection, the pool's reset) can take longer than the request timeout,
    whose 503 would hide that the write happened."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    finally:
        if not task.done():  # timed out, or the request itself was cancelled
            task.cancel()
            task.add_done_callback(_consume)
    if not done:
        raise TimeoutError(f"not confirmed within {seconds} s")
    task.result()


def _consume(task: asyncio.Future[None]) -> None:
    """Retrieve a given-up task's outcome (no "exception was never retrieved" noise)."""
    if not task.cancelled():
        task.exception()


def _refuse(bound: str, why: str) -> None:
    metrics.BACKPRESSURE.labels(bound).inc()
    raise Backpressure(why, retry_after_s=1.0)


async def settle(what: str, attempt: Callable[[], Awaitable[T | None]]) -> T:
    """Call `attempt` until it returns a result. None means "again": the script found Redis
    without what it needs (and the attempt filled it in), or lost a race it may retry."""
    for _ in range(MAX_ATTEMPTS):
        result = await attempt()
        if result is not None:
            return result
    raise Unavailable(f"{what}: gave up after {MAX_ATTEMPTS} attempts")
