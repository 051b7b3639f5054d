"""Flusher: the one batching loop, per shard — read → coalesce → sink.write → ack, with
backoff, a circuit breaker, claims of dead consumers' entries and dead letters for poison.

The PostgreSQL flusher and the ClickHouse streamer are this class pointed at two sinks, each
with its own consumer group."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy import metrics
from proxy.circuit import Circuit
from proxy.errors import Unavailable
from proxy.failpoints import Failpoints
from proxy.sinks import PoisonError, Sink
from proxy.writelog import Entry, WriteLog

logger = logging.getLogger(__name__)
Ack = Callable[[int, list[Entry]], Awaitable[None]]
AFTER_WRITE = {"pg": "after-pg-commit-before-xack", "ch": "after-ch-insert-before-xack"}
BLOCK_MS = 1000  # an idle read returns this often, so a stop request is seen quickly


@dataclass(frozen=True)
class FlushConfig:
    max_batch: int
    max_delay_ms: int
    max_attempts: int
    claim_idle_ms: int
    backoff_base_ms: int
    backoff_max_ms: int


def coalesce(entries: list[Entry]) -> list[Entry]:
    """Keep the highest version of each entity (an upsert batch must not hold an id twice)."""
    latest: dict[tuple[str, str], Entry] = {}
    for e in entries:
        seen = latest.get(e.identity)
        if seen is None or e.version > seen.version:
            latest[e.identity] = e
    return list(latest.values())


def backoff_s(attempt: int, base_ms: int, max_ms: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(max_ms, base_ms * 2 ** min(attempt, 20))) / 1000


class Flusher:
    def __init__(self, log: WriteLog, sink: Sink, circuit: Circuit, cfg: FlushConfig,
                 consumer: str, inflight: asyncio.Semaphore, ack: Ack,
                 failpoints: Failpoints) -> None:
        self._log = log
        self._sink = sink
        self._circuit = circuit
        self._cfg = cfg
        self._consumer = consumer
        self._inflight = inflight
        self._ack = ack
        self._failpoints = failpoints
        self._stopping = asyncio.Event()
        self.name = sink.name

    async def run(self) -> None:
        """Flush every shard until stopped (finishing the batch in hand) or cancelled."""
        async with asyncio.TaskGroup() as tg:
            for shard in range(self._log.shards):
                tg.create_task(self._run_shard(shard), name=f"flush-{self.name}-{shard}")

    def stop(self) -> None:
        """Read no new entries; the batch in hand is still written and acked."""
        self._stopping.set()

    async def _run_shard(self, shard: int) -> None:
        attempt, next_claim = 0, 0.0
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self._cfg.claim_idle_ms / 2000
                    await self._flush(shard, await self._claim(shard))
                await self._flush(shard, await self._collect(shard))
                attempt = 0
            except Unavailable as e:  # Redis trouble: keep the loop alive, back off
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:
                    logger.warning("%s shard %d: %s (attempt %d)", self.name, shard, e, attempt)
                await self._sleep(backoff_s(attempt, self._cfg.backoff_base_ms,
                                            self._cfg.backoff_max_ms))
                await _quietly(self._log.ensure_groups())  # Redis may have lost them

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _claim(self, shard: int) -> list[Entry | tuple[str, str]]:
        claimed = await self._log.claim_idle(shard, self.name, self._consumer,
                                             self._cfg.claim_idle_ms, self._cfg.max_batch)
        if claimed:
            metrics.RECLAIMED.labels(self.name).inc(len(claimed))
            logger.info("%s shard %d: claimed %d idle entries", self.name, shard, len(claimed))
        return claimed

    async def _collect(self, shard: int) -> list[Entry | tuple[str, str]]:
        """A batch closes at max_batch entries or max_delay_ms after its first entry."""
        batch = await self._read(shard, self._cfg.max_batch, BLOCK_MS)
        deadline = time.monotonic() + self._cfg.max_delay_ms / 1000
        while batch and len(batch) < self._cfg.max_batch and not self._stopping.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = await self._read(shard, self._cfg.max_batch - len(batch), left_ms)
            if not more:
                break
            batch += more
        return batch

    async def _read(self, shard: int, count: int, block_ms: int) -> list[Entry | tuple[str, str]]:
        return await self._log.read(shard, self.name, self._consumer, count, block_ms)

    async def _flush(self, shard: int, batch: list[Entry | tuple[str, str]]) -> None:
        if not batch:
            return
        entries = [e for e in batch if isinstance(e, Entry) and e.only in ("", self.name)]
        for item in batch:
            if not isinstance(item, Entry):
                await self._dead_letter(shard, item[0], item[1])
            elif item.only not in ("", self.name):  # another group's replayed dead letter
                await self._log.ack(shard, self.name, [item.entry_id])
        await self._failpoints.hit("after-read")
        unique = coalesce(entries)
        metrics.COALESCED.labels(self.name).inc(len(entries) - len(unique))
        started = time.perf_counter()
        dead = await self._write(shard, unique)
        await self._failpoints.hit(AFTER_WRITE[self.name])
        done = [e for e in entries if e.entry_id not in dead]
        await self._ack(shard, done)
        self._observe(unique, dead, time.perf_counter() - started)

    def _observe(self, unique: list[Entry], dead: set[str], seconds: float) -> None:
        metrics.FLUSH_BATCH.labels(self.name).observe(len(unique))
        metrics.FLUSH_SECONDS.labels(self.name).observe(seconds)
        metrics.FLUSHED_ROWS.labels(self.name).inc(len(unique) - len(dead))
        now_ms = time.time() * 1000
        hist = metrics.ACK_TO_COMMIT.labels(self.name)
        for e in unique:
            hist.observe(max(0.0, now_ms - e.ts_ms) / 1000)
        logger.debug("%s: %d rows in %.1f ms", self.name, len(unique), seconds * 1000)

    async def _write(self, shard: int, unique: list[Entry]) -> set[str]:
        """Write until committed; a sink failure backs off and retries the same batch (never
        acked before). Returns the ids of entries moved to the dead-letter stream."""
        attempt = 0
        while True:
            await asyncio.sleep(self._circuit.wait_s())
            try:
                return await self._try_write(shard, unique)
            except Unavailable:
                raise  # Redis, not the sink: the shard loop handles it
            except Exception as e:  # any sink failure: keep the batch, back off, retry
                self._circuit.failure()
                metrics.CIRCUIT.labels(self.name).set(_CIRCUIT_VALUE[self._circuit.state])
                metrics.RETRIES.labels(self.name).inc()
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:
                    logger.warning("%s shard %d: write failed (%s), attempt %d, circuit %s",
                                   self.name, shard, e, attempt, self._circuit.state)
                await asyncio.sleep(backoff_s(attempt, self._cfg.backoff_base_ms,
                                              self._cfg.backoff_max_ms))

    async def _try_write(self, shard: int, unique: list[Entry]) -> set[str]:
        try:
            async with self._inflight:
                await self._sink.write(unique)
        except PoisonError:
            return await self._isolate(shard, unique)
        self._healthy()
        return set()

    def _healthy(self) -> None:
        self._circuit.success()
        metrics.CIRCUIT.labels(self.name).set(0)

    async def _isolate(self, shard: int, unique: list[Entry]) -> set[str]:
        """Retry entry by entry; one that fails max_attempts times is dead-lettered, so it
        never blocks the rest of the shard."""
        self._healthy()
        dead: set[str] = set()
        for e in unique:
            reason = ""
            for _ in range(self._cfg.max_attempts):
                try:
                    async with self._inflight:
                        await self._sink.write([e])
                    break
                except PoisonError as err:
                    reason = str(err)
            else:
                await self._dead_letter(shard, e.entry_id, reason)
                dead.add(e.entry_id)
        return dead

    async def _dead_letter(self, shard: int, entry_id: str, reason: str) -> None:
        logger.error("%s shard %d: entry %s moved to dead letters: %s", self.name, shard,
                     entry_id, reason)
        await self._log.dead_letter(shard, self.name, entry_id, reason)
        metrics.DEAD_LETTERS.labels(self.name).inc()


_CIRCUIT_VALUE = {"closed": 0, "half_open": 1, "open": 2}


async def _quietly(aw: Awaitable[None]) -> None:
    with contextlib.suppress(Unavailable):
        await aw
