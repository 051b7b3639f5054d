"""Flusher: the one batching loop — read (per shard) → coalesce → sink.write → ack, with
backoff, a circuit breaker, claims of dead consumers' entries and dead letters for poison.

The PostgreSQL flusher and the ClickHouse streamer are this class pointed at two sinks, each
with its own consumer group."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from proxy import metrics, tracing
from proxy.backends import PoisonError, Sink
from proxy.backoff import Backoff
from proxy.circuit import Circuit
from proxy.errors import Unavailable
from proxy.failpoints import Failpoints
from proxy.model import Change
from proxy.writelog import Delivery, Unreadable, WriteLog

logger = logging.getLogger(__name__)
# The acknowledgement of changes committed to a sink: (group, shard, changes).
Ack = Callable[[str, int, list[Change]], Awaitable[None]]
BLOCK_MS = 1000  # an idle read returns this often, so a stop request is seen quickly
MERGE_WINDOW_S = 0.002  # shards' readers of one tick hand over within this of each other


@dataclass(frozen=True)
class FlushConfig:
    max_batch: int
    max_delay_ms: int
    max_attempts: int
    claim_idle_ms: int
    backoff_base_ms: int
    backoff_max_ms: int

    def backoff(self) -> Backoff:
        return Backoff(self.backoff_base_ms / 1000, self.backoff_max_ms / 1000)


def coalesce(entries: list[Change]) -> list[Change]:
    """Keep the highest version of each entity (an upsert batch must not hold an id twice)."""
    latest: dict[tuple[str, str, str], Change] = {}
    for e in entries:
        seen = latest.get(e.identity)
        if seen is None or e.version > seen.version:
            latest[e.identity] = e
    return list(latest.values())


def folded(entries: list[Change], kept: list[Change]) -> dict[tuple[str, str, str],
                                                             list[Change]]:
    """The older versions coalescing folded into each kept entry, newest first: should the
    kept one be dead-lettered, they are what may still be written."""
    ids = {e.entry_id for e in kept}
    out: dict[tuple[str, str, str], list[Change]] = {}
    for e in sorted(entries, key=lambda e: e.version, reverse=True):
        if e.entry_id not in ids:
            out.setdefault(e.identity, []).append(e)
    return out


def distinct(entries: list[Change]) -> list[Change]:
    """Drop repeats of one entity version (a duplicate log entry), keep every version."""
    return list({(*e.identity, e.version): e for e in entries}.values())


@dataclass
class Handoff:
    """What one shard's reader read. The reader waits for `done` (set once a writer acked the
    entries, or gave up and left them pending to be claimed) before it reads again, so every
    read takes all that arrived meanwhile and a shard never has two batches in flight."""

    shard: int
    deliveries: list[Delivery]
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Flusher:
    """One reader per shard hands batches to `writers` writer tasks. A reader that got an
    entry waits for the next tick of the max_delay_ms clock, then takes what arrived meanwhile
    (one batch: versions of one entity coalesce); all shards' readers wake on the same ticks,
    so a writer merges their batches into one sink write (up to max_batch)."""

    def __init__(self, log: WriteLog, sink: Sink, circuit: Circuit, cfg: FlushConfig,
                 consumer: str, writers: int, ack: Ack, failpoints: Failpoints) -> None:
        self._log = log
        self._sink = sink
        self._circuit = circuit
        self._cfg = cfg
        self._consumer = consumer
        self._writers = writers
        self._ack = ack
        self._failpoints = failpoints
        self._stopping = asyncio.Event()
        self._queue: asyncio.Queue[Handoff | None] = asyncio.Queue()
        self._recovered = asyncio.Event()
        self.name = sink.info.name
        metrics.sink_series(self.name)

    async def run(self) -> None:
        """Flush until stopped (the batches in hand are finished) or cancelled."""
        async with asyncio.TaskGroup() as tg:
            for i in range(self._writers):
                tg.create_task(self._write_loop(), name=f"flush-{self.name}-writer-{i}")
            readers = [tg.create_task(self._read_loop(shard), name=f"flush-{self.name}-{shard}")
                       for shard in range(self._log.shards)]
            await asyncio.gather(*readers)
            for _ in range(self._writers):
                self._queue.put_nowait(None)  # writers finish what is queued, then exit

    def stop(self) -> None:
        """Finish: flush what the log holds now (the batches in hand, then what was written
        up to this call), then end. The owner cancels past its deadline."""
        self._stopping.set()

    async def _read_loop(self, shard: int) -> None:
        backoff, next_claim = self._cfg.backoff(), 0.0
        while not self._stopping.is_set():
            try:
                batch: list[Delivery] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self._cfg.claim_idle_ms / 2000
                    batch = await self._claim(shard)
                if not batch:
                    batch = await self._collect(shard)
                await self._hand_off(shard, batch)
                backoff.reset()
            except Unavailable as e:  # Redis trouble: keep the loop alive, back off
                delay = backoff.failed()
                if backoff.should_log:
                    logger.warning("%s shard %d: %s (attempt %d)", self.name, shard, e,
                                   backoff.attempt)
                await self._sleep(delay)
                await _quietly(self._log.ensure_groups())  # Redis may have lost them
            except Exception:  # a bug or a reply we do not know: log, count, go on
                self._unexpected(f"reader of shard {shard}", backoff)
                await self._sleep(backoff.delay_s())
        with contextlib.suppress(Unavailable):  # the final flush: no wait for new entries
            while batch := await self._log.read(shard, self.name, self._consumer,
                                                self._cfg.max_batch, None):
                await self._hand_off(shard, batch)

    async def _hand_off(self, shard: int, batch: list[Delivery]) -> None:
        """Queue a batch for the writers and wait until it was acked (or left pending)."""
        if batch:
            handoff = Handoff(shard, batch)
            self._queue.put_nowait(handoff)
            await handoff.done.wait()

    async def _collect(self, shard: int) -> list[Delivery]:
        """Wait for an entry, then until the next tick, then take the rest (two reads)."""
        batch = await self._log.read(shard, self.name, self._consumer, self._cfg.max_batch,
                                     BLOCK_MS)
        if batch and len(batch) < self._cfg.max_batch:
            delay = self._cfg.max_delay_ms / 1000
            await self._sleep(delay - time.monotonic() % delay)
            batch += await self._log.read(shard, self.name, self._consumer,
                                          self._cfg.max_batch - len(batch), None)
        return batch

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on stop. asyncio.timeout, not wait_for: on Python 3.11
        wait_for may swallow a cancellation (gh-86296), and the task would not end."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    def _unexpected(self, where: str, backoff: Backoff) -> None:
        """An error no branch expected: counted always, logged with its traceback (at the
        backoff's pace, so a persistent one cannot flood the log)."""
        metrics.WORKER_ERRORS.labels(f"flusher-{self.name}").inc()
        backoff.failed()
        if backoff.should_log:
            logger.exception("%s %s: unexpected error (attempt %d); the entries stay pending",
                             self.name, where, backoff.attempt)

    async def _claim(self, shard: int) -> list[Delivery]:
        claimed = await self._log.claim_idle(shard, self.name, self._consumer,
                                             self._cfg.claim_idle_ms, self._cfg.max_batch)
        if claimed:
            metrics.RECLAIMED.labels(self.name).inc(len(claimed))
            logger.info("%s shard %d: claimed %d idle entries", self.name, shard, len(claimed))
        return claimed

    async def _write_loop(self) -> None:
        backoff = self._cfg.backoff()
        while (first := await self._queue.get()) is not None:
            handoffs, last = await self._gather(first)
            try:
                await self._flush(handoffs)
                backoff.reset()
            except Unavailable as e:  # acks failed: the entries stay pending and are claimed
                logger.warning("%s: could not acknowledge a batch (%s); it will be claimed",
                               self.name, e)
            except Exception:  # not acked: the entries stay pending and are claimed
                self._unexpected("writer", backoff)
                await self._sleep(backoff.delay_s())
            finally:
                for h in handoffs:
                    h.done.set()
            if last:
                return

    async def _gather(self, first: Handoff) -> tuple[list[Handoff], bool]:
        """The other shards' batches of the same tick (up to max_batch entries)."""
        handoffs, size = [first], len(first.deliveries)
        await asyncio.sleep(MERGE_WINDOW_S)
        while size < self._cfg.max_batch and not self._queue.empty():
            more = self._queue.get_nowait()
            if more is None:
                return handoffs, True
            handoffs.append(more)
            size += len(more.deliveries)
        return handoffs, False

    async def _flush(self, handoffs: list[Handoff]) -> None:
        entries: list[Change] = []
        for h in handoffs:
            entries += await self._sort_out(h)
        if not entries:
            return
        await self._failpoints.hit("after-read")
        unique = coalesce(entries) if self._sink.info.coalesce else distinct(entries)
        metrics.COALESCED.labels(self.name).inc(len(entries) - len(unique))
        started = time.perf_counter()
        with tracing.flush_span(self.name, rows=len(unique), shards=len(handoffs)):
            dead = await self._write(unique, folded(entries, unique))
            await self._failpoints.hit(self._sink.info.after_write)
            for shard, done in _by_shard(e for e in entries if e.entry_id not in dead).items():
                await self._ack(self.name, shard, done)
        self._observe(unique, dead, time.perf_counter() - started)

    async def _sort_out(self, h: Handoff) -> list[Change]:
        """This group's readable entries; other groups' replayed dead letters are acked and
        unreadable entries dead-lettered."""
        mine = [d for d in h.deliveries if d.only in ("", self.name)]
        await self._log.ack(h.shard, self.name,
                            [d.entry_id for d in h.deliveries if d.only not in ("", self.name)])
        for bad in mine:
            if isinstance(bad, Unreadable):
                await self._dead_letter(h.shard, bad.entry_id, bad.error)
        return [e for e in mine if isinstance(e, Change)]

    def _observe(self, unique: list[Change], dead: set[str], seconds: float) -> None:
        metrics.FLUSH_BATCH.labels(self.name).observe(len(unique))
        metrics.FLUSH_SECONDS.labels(self.name).observe(seconds)
        metrics.FLUSHED_ROWS.labels(self.name).inc(sum(e.entry_id not in dead for e in unique))
        now_ms = time.time() * 1000
        hist = metrics.ACK_TO_COMMIT.labels(self.name)
        for e in unique:
            hist.observe(max(0.0, now_ms - e.ts_ms) / 1000)
        logger.debug("%s: %d rows in %.1f ms", self.name, len(unique), seconds * 1000)

    async def _write(self, unique: list[Change],
                     older: dict[tuple[str, str, str], list[Change]]) -> set[str]:
        """Write until committed; a sink failure backs off and retries the same batch (never
        acked before). Returns the ids of entries moved to the dead-letter stream."""
        backoff = self._cfg.backoff()
        while True:
            held = self._circuit.wait_s()
            await self._pause(held)
            # Held a while (a sink outage): what an erasure deleted from the log meanwhile
            # must not be written now (issue 12.4).
            if (held > 0 or backoff.attempt) and not (unique := await self._log.still_pending(
                    self.name, self._consumer, unique)):
                return set()
            try:
                return await self._try_write(unique, older)
            except Unavailable:
                raise  # Redis, not the sink: the entries stay pending and are claimed
            except Exception as e:  # any sink failure: keep the batch, back off, retry
                self._circuit.failure()
                metrics.CIRCUIT.labels(self.name).set(_CIRCUIT_VALUE[self._circuit.state])
                metrics.RETRIES.labels(self.name).inc()
                delay = backoff.failed()
                if backoff.should_log:
                    logger.warning("%s: write of %d rows failed (%r), attempt %d, circuit %s",
                                   self.name, len(unique), e, backoff.attempt,
                                   self._circuit.state)
                await self._pause(delay)

    async def _pause(self, seconds: float) -> None:
        """Sleep before a retry, but wake as soon as another writer got through: the sink is
        back, and the batches held by the other writers should not wait out their backoff."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._recovered.wait()

    async def _try_write(self, unique: list[Change],
                         older: dict[tuple[str, str, str], list[Change]]) -> set[str]:
        try:
            await self._sink.write(unique)
        except PoisonError:
            return await self._isolate(unique, older)
        self._healthy()
        return set()

    def _healthy(self) -> None:
        self._recovered.set()  # wakes the writers backing off; later waits get a fresh event
        self._recovered = asyncio.Event()
        self._circuit.success()
        metrics.CIRCUIT.labels(self.name).set(0)

    async def _isolate(self, unique: list[Change],
                       older: dict[tuple[str, str, str], list[Change]]) -> set[str]:
        """Retry entry by entry; one that fails max_attempts times is dead-lettered, so it
        never blocks the rest of the shard, and the next older version of its entity folded
        into it is tried instead (a rejected edit must not take the message with it)."""
        self._healthy()
        dead: set[str] = set()
        for e in unique:
            for candidate in [e, *older.get(e.identity, [])]:
                reason = await self._attempts(candidate)
                if reason is None:
                    break
                await self._dead_letter(candidate.shard, candidate.entry_id, reason)
                dead.add(candidate.entry_id)
        return dead

    async def _attempts(self, change: Change) -> str | None:
        """Write one change alone, up to max_attempts times; the last error, or None."""
        reason = ""
        for _ in range(self._cfg.max_attempts):
            try:
                await self._sink.write([change])
                return None
            except PoisonError as err:
                reason = str(err)
        return reason

    async def _dead_letter(self, shard: int, entry_id: str, reason: str) -> None:
        if await self._log.dead_letter(shard, self.name, entry_id, reason):
            logger.error("%s shard %d: entry %s moved to dead letters: %s", self.name, shard,
                         entry_id, reason)
            metrics.DEAD_LETTERS.labels(self.name).inc()


_CIRCUIT_VALUE = {"closed": 0, "half_open": 1, "open": 2}


def _by_shard(entries: Iterable[Change]) -> dict[int, list[Change]]:
    out: dict[int, list[Change]] = {}
    for e in entries:
        out.setdefault(e.shard, []).append(e)
    return out


async def _quietly(aw: Awaitable[None]) -> None:
    with contextlib.suppress(Unavailable):
        await aw
