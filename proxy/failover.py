"""Failover (redis.write_through): while Redis is down, an API process serves from PostgreSQL
alone — writes committed there before they are answered (X-Tier: postgres, X-Durability:
persisted), reads from it. Redis counts as down after circuit.failure_threshold calls in a row
found it unreachable; a write switches over at once only if its call never left (no
connection), since one lost in flight may have run. On recovery (a PING answers), what Redis
holds behind PostgreSQL is dropped (read through again) once its unflushed writes are flushed
(proxy.reconcile, mode "drop"); a last pass runs while new requests wait and the writes in
PostgreSQL finish; only then does write-behind resume.

A message acknowledged by Redis and not yet flushed when Redis went down, whose seq a message
written through meanwhile took, lands after it (the flush moves it: postgres/sql.py
RESEQUENCE). An edit or state write acknowledged by Redis and not yet flushed, on an entity
whose next version was written through meanwhile, was the earlier write: PostgreSQL keeps the
written-through one, the other is counted and logged (version_taken). What it cannot make safe:
sidecars that still reach a Redis the others cannot (FAULTS.md 30) may acknowledge the later
edit there, and it loses just the same. To make these rare, the first writes through wait
`settle_s` after the switch: the flushers commit the batches they had read."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from proxy import metrics
from proxy.errors import RedisDown, Unavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_S = 0.2  # how often a down Redis is asked whether it is back
RESUME_WAIT_S = 5.0  # a request waits at most this long for the last reconciliation pass
DRAIN_S = 30.0  # how long recovery waits for unflushed writes behind PostgreSQL to flush


class Failover:
    def __init__(self, threshold: int, settle_s: float, ping: Callable[[], Awaitable[Any]],
                 reconcile: Callable[[bool], Awaitable[int]]) -> None:
        """`reconcile(final)` drops what Redis holds behind PostgreSQL and is clean, and
        returns how many such entities still have unflushed changes; `final` also raises
        their counters to PostgreSQL's (so no seq or version is handed out twice)."""
        self._threshold = threshold
        self._settle_s = settle_s
        self._settled_at = 0.0
        self._ping = ping
        self._reconcile = reconcile
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
            self.down = True
            self._settled_at = time.monotonic() + self._settle_s
            metrics.WRITE_THROUGH.set(1)
            logger.warning("redis is down (%s): serving from postgres alone (write-through) "
                           "until it answers again", e)

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

    async def run(self) -> None:
        """While down: probe; once Redis answers, hold new requests, let the ones in
        PostgreSQL finish, reconcile, resume write-behind."""
        while not self._stopping.is_set():
            if self.down and await self._answers():
                await self._resume()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_S):
                    await self._stopping.wait()

    def stop(self) -> None:
        self._stopping.set()

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
                await asyncio.sleep(PROBE_S)
            self._resumed.clear()
            await self._idle.wait()
            if pending := await self._reconcile(True):
                logger.error("%d entities behind postgres still had unflushed changes after "
                             "%.0f s (counters raised); write-behind resumes: their messages "
                             "may land at new seqs, their edits lose to what was written "
                             "through", pending, DRAIN_S)
        except Exception as e:  # Redis or PostgreSQL failed again: stay down, try again
            logger.warning("redis answers, but reconciling with postgres failed (%r); still "
                           "serving from postgres alone", e)
            self._resumed.set()
            return
        self.down, self._failures = False, 0
        self._resumed.set()
        metrics.WRITE_THROUGH.set(0)
        logger.warning("%6.2fs redis is back and reconciled with postgres: write-behind "
                       "resumes", time.monotonic() - started)
