"""Failover (redis.write_through): while Redis is down, an API process serves from PostgreSQL
alone — writes committed there before they are answered (X-Tier: postgres, X-Durability:
persisted), reads from it. Redis counts as down after circuit.failure_threshold calls in a row
found it unreachable; a write switches over at once only if its call never left (no
connection), since one lost in flight may have run. On recovery (a PING answers), what Redis
holds behind PostgreSQL is dropped (read through again) once its unflushed writes are flushed
(proxy.reconcile, mode "drop"); a last pass runs while new requests wait and the writes in
PostgreSQL finish; only then does write-behind resume.

Sidecars resume together: while any API process writes through, none serves write-behind,
for its writes to Redis would race the other's to PostgreSQL (the same version or seq handed
out twice, a delete answered below a version acknowledged before). Each process in
write-through holds a lease in PostgreSQL (`Leases`, renewed each PROBE_S, running out
LEASE_S after a process dies or stops): "down" while Redis does not answer it, "up" once it
does (still serving from PostgreSQL), "held" while it holds its requests to resume. A process
in write-behind that sees another's "down" or "up" lease — at startup, then every CHECK_S —
switches to write-through too; one whose Redis answers starts to resume only when no lease
says "down", and resumes only when every other lease says "held". A process whose Redis
answers while it is "up" also marks Redis (`Recovering`, keys.RECOVERING), so that one
starting while PostgreSQL is unreachable still learns that Redis is behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from proxy import metrics
from proxy.errors import RedisDown, Unavailable
from proxy.keys import RECOVERING as RECOVERING_KEY

logger = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_S = 0.2  # how often a down Redis is asked whether it is back
RESUME_WAIT_S = 5.0  # a request waits at most this long for the last reconciliation pass
DRAIN_S = 30.0  # how long recovery waits for unflushed writes behind PostgreSQL to flush
LEASE_S = 3.0  # a write-through lease runs out this long after its last renewal
CHECK_S = 0.5  # how often a process in write-behind looks for another's lease
OTHERS_S = DRAIN_S + 10.0  # a resume waits this long at most for the others to stop writing


class Leases(Protocol):
    """Which API processes write through now (proxy.backends.postgres.writethrough.Leases)."""

    async def hold(self, state: str) -> None: ...
    async def release(self) -> None: ...
    async def others(self, states: tuple[str, ...]) -> bool: ...


class Recovering:
    """The same in Redis, for the state "up" only: a process starting while PostgreSQL is
    unreachable cannot read the leases, but Redis tells it that Redis is behind (keys.
    RECOVERING: holder -> until, in ms)."""

    def __init__(self, client: Any, holder: str) -> None:
        self._r = client
        self._holder = holder

    async def mark(self, on: bool) -> None:
        if on:
            until = int((time.time() + LEASE_S) * 1000)
            await self._r.hset(RECOVERING_KEY, self._holder, until)
            await self._r.pexpire(RECOVERING_KEY, int(2 * LEASE_S * 1000))
        else:
            await self._r.hdel(RECOVERING_KEY, self._holder)

    async def others(self) -> bool:
        now = time.time() * 1000
        return any(holder.decode() != self._holder and int(until) > now
                   for holder, until in (await self._r.hgetall(RECOVERING_KEY)).items())


WRITING = ("down", "up")  # lease states of a process that serves from PostgreSQL alone


class Failover:
    def __init__(self, threshold: int, settle_s: float, ping: Callable[[], Awaitable[Any]],
                 reconcile: Callable[[bool], Awaitable[int]], leases: Leases,
                 recovering: Recovering) -> None:
        """`reconcile(final)` drops what Redis holds behind PostgreSQL and is clean, and
        returns how many such entities still have unflushed changes; `final` also raises
        their counters to PostgreSQL's (so no seq or version is handed out twice)."""
        self._threshold = threshold
        self._settle_s = settle_s
        self._settled_at = 0.0
        self._ping = ping
        self._reconcile = reconcile
        self._leases = leases
        self._recovering = recovering
        self._failures = 0
        self.down = False  # serving from PostgreSQL alone
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._through = 0  # requests in PostgreSQL now
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()

    @property
    def mode(self) -> str:
        return "write-through" if self.down else "write-behind"

    async def serve(self, hot: Callable[[], Awaitable[T]], below: Callable[[], Awaitable[T]],
                    write: bool) -> T:
        """`hot()` on Redis, or `below()` on PostgreSQL while Redis is down."""
        await self._wait_resumed()
        if not self.down:
            try:
                result = await hot()
            except RedisDown as e:
                self._failed(e)
                if not (self.down and (not write or not e.sent)):
                    raise
            else:
                self._failures = 0
                return result
        async with self._in_postgres():
            if write:  # the first ones let the flushes in hand commit first (see below)
                await asyncio.sleep(max(0.0, self._settled_at - time.monotonic()))
            return await below()

    def _failed(self, e: RedisDown) -> None:
        self._failures += 1
        if self._failures >= self._threshold and not self.down:
            self._switch(f"redis is down ({e})")

    def _switch(self, why: str) -> None:
        self.down = True
        self._settled_at = time.monotonic() + self._settle_s
        metrics.WRITE_THROUGH.set(1)
        logger.warning("%s: serving from postgres alone (write-through) until redis answers "
                       "and no sidecar writes through", why)

    async def _wait_resumed(self) -> None:
        if not self._resumed.is_set():
            try:
                async with asyncio.timeout(RESUME_WAIT_S):
                    await self._resumed.wait()
            except TimeoutError:
                raise Unavailable("redis is back and being reconciled with postgres; "
                                  "try again") from None

    @contextlib.asynccontextmanager
    async def _in_postgres(self) -> AsyncIterator[None]:
        self._through += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._through -= 1
            if not self._through:
                self._idle.set()

    async def follow(self) -> None:
        """At startup, before the first request: into write-through if another process
        writes through (a sidecar restarted during a recovery must not serve Redis)."""
        if await self._others_writing():
            self._switch("another sidecar serves from postgres alone")

    async def run(self) -> None:
        """While down: renew the lease and probe; once Redis answers, hold new requests, let
        the ones in PostgreSQL finish, reconcile, resume write-behind. While up: follow
        another process into write-through."""
        checked = time.monotonic()  # follow() looked at startup
        while not self._stopping.is_set():
            if self.down:
                answers = await self._answers()
                await self._lease("up" if answers else "down")
                if answers:
                    await self._mark(True)
                if answers and not await self._others(("down",)):
                    await self._resume()
            elif time.monotonic() >= checked + CHECK_S:
                checked = time.monotonic()
                if await self._others_writing():
                    self._switch("another sidecar serves from postgres alone")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_S):
                    await self._stopping.wait()

    def stop(self) -> None:
        self._stopping.set()

    @staticmethod
    async def _quietly(call: Callable[[], Awaitable[T]], failed: T) -> T:
        """A lease or mark call that must not stall the loop: `failed` if it does not answer
        within LEASE_S / 3 (PostgreSQL or Redis down: a lease or mark runs out by itself, and
        a process that cannot reach them finds out on its own)."""
        try:
            async with asyncio.timeout(LEASE_S / 3):
                return await call()
        except Exception as e:
            logger.debug("write-through lease or mark call failed: %r", e)
            return failed

    async def _lease(self, state: str) -> None:
        await self._quietly(lambda: self._leases.hold(state), None)

    async def _mark(self, on: bool) -> None:
        await self._quietly(lambda: self._recovering.mark(on), None)

    async def _others(self, states: tuple[str, ...]) -> bool:
        return await self._quietly(lambda: self._leases.others(states), False)

    async def _others_writing(self) -> bool:
        """Another process writes through: its lease in PostgreSQL says so, or (PostgreSQL
        unreachable) its mark in Redis."""
        return (await self._others(WRITING)
                or await self._quietly(self._recovering.others, False))

    async def _wait_for_others(self) -> None:
        """Requests held (they wait RESUME_WAIT_S, then 503): wait until every other process
        that writes through holds its requests too. If Redis went down for one meanwhile, this
        resume is off (RuntimeError: serving from PostgreSQL again); one that does not hold
        within OTHERS_S is not waited for (logged: the race with it is FAULTS.md 30's)."""
        deadline = time.monotonic() + OTHERS_S
        await self._mark(False)
        while True:
            await self._leases.hold("held")
            if await self._leases.others(("down",)):
                raise RuntimeError("redis is down for another sidecar")
            if not (await self._leases.others(("up",)) or await self._recovering.others()):
                return
            if time.monotonic() > deadline:
                logger.error("another sidecar still writes through after %.0f s: write-behind "
                             "resumes beside it (edits may race, see RELIABILITY.md)", OTHERS_S)
                return
            await asyncio.sleep(PROBE_S)  # polling the others' leases

    async def _release(self) -> None:
        try:
            await self._leases.release()
        except Exception as e:  # it runs out by itself
            logger.warning("write-through lease not released (runs out in %.0f s): %r",
                           LEASE_S, e)

    async def _answers(self) -> bool:
        try:
            await self._ping()
        except Exception:  # any failure: still down
            return False
        return True

    async def _resume(self) -> None:
        """Redis answers: first, still serving from PostgreSQL, drop what Redis holds behind
        it once clean (writes it had not flushed are being flushed now); then hold new
        requests, let the ones in PostgreSQL finish, drop once more, resume."""
        started = time.monotonic()
        try:
            while await self._reconcile(False) and time.monotonic() < started + DRAIN_S:
                await self._lease("up")  # still serving from PostgreSQL
                await self._mark(True)
                await asyncio.sleep(PROBE_S)
            self._resumed.clear()
            await self._idle.wait()
            await self._wait_for_others()
            if pending := await self._reconcile(True):
                logger.error("%d entities behind postgres still had unflushed changes after "
                             "%.0f s (counters raised); write-behind resumes: their messages "
                             "may land at new seqs, their edits lose to what was written "
                             "through", pending, DRAIN_S)
        except Exception as e:  # Redis or PostgreSQL failed again: stay down, try again
            logger.warning("redis answers, but resuming write-behind failed (%r); still "
                           "serving from postgres alone", e)
            self._resumed.set()
            return
        self.down, self._failures = False, 0
        self._resumed.set()
        await self._release()
        metrics.WRITE_THROUGH.set(0)
        logger.warning("%6.2fs redis is back and reconciled with postgres: write-behind "
                       "resumes", time.monotonic() - started)
