"""Monitor: every few seconds, trims the log safely, measures backlog and lag per sink
(metrics, admission, /v1/status), counts dead letters and removes dead consumers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy import metrics
from proxy.backends import PG, SINKS
from proxy.circuit import Circuit
from proxy.errors import Unavailable
from proxy.reconcile import Reconciler
from proxy.writelog import Backlog, WriteLog

logger = logging.getLogger(__name__)


@dataclass
class SinkStatus:
    circuit: str = "closed"
    backlog: int = 0
    lag_s: float = 0.0
    dead_letters: int = 0


@dataclass
class Snapshot:
    redis: str = "unknown"
    sinks: dict[str, SinkStatus] = field(default_factory=dict)
    measured: bool = False  # a refresh has completed: backlog and lag are real figures
    pg_unreachable: str = ""  # why the last probe of PostgreSQL failed ("" = it answered)


class Monitor:
    def __init__(self, log: WriteLog, circuits: Mapping[str, Circuit], backlog: Backlog,
                 interval_s: float, consumer: str, dead_consumer_idle_ms: int,
                 max_lag_s: float, reconciler: Reconciler | None = None,
                 pg_probe: Callable[[], Awaitable[None]] | None = None) -> None:
        self._log = log
        self._pg_probe = pg_probe
        self._reconciler = reconciler
        self._loss_seen = _total(metrics.REDIS_DATA_LOSS)
        self._max_lag_s = max_lag_s
        self._circuits = circuits
        self._backlog = backlog
        self._interval_s = interval_s
        self._consumer = consumer
        self._dead_idle_ms = dead_consumer_idle_ms
        self.snapshot = Snapshot(sinks={name: SinkStatus() for name in circuits})
        self._stopping = asyncio.Event()
        self._probing: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Refresh every interval until stopped; probe PostgreSQL beside it (a probe that
        hangs on a black-holed server must not hold the measurement back)."""
        try:
            while not self._stopping.is_set():
                if self._pg_probe is not None and (self._probing is None or self._probing.done()):
                    self._probing = asyncio.create_task(self._probe_pg())
                await self._refresh_redis()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval_s):
                        await self._stopping.wait()
        finally:
            if self._probing is not None:
                self._probing.cancel()

    async def _refresh_redis(self) -> None:
        try:
            await self.refresh()
            self.snapshot.redis = "up"
        except Unavailable as e:
            if self.snapshot.redis != "down":
                logger.warning("monitor: redis unavailable: %s", e)
            self.snapshot.redis = "down"

    async def _probe_pg(self) -> None:
        """PostgreSQL answers or not, whether or not there is anything to flush: a circuit
        opens only on failed writes, and an idle (or Redis-starved) flusher makes none — the
        nemesis saw 4-5 s outages that no /v1/status called down."""
        assert self._pg_probe is not None
        try:
            await self._pg_probe()
            if self.snapshot.pg_unreachable:
                logger.info("monitor: postgres answers again")
            self.snapshot.pg_unreachable = ""
        except Exception as e:  # any failure to answer SELECT 1 is the news
            if not self.snapshot.pg_unreachable:
                logger.warning("monitor: postgres unreachable: %r", e)
            self.snapshot.pg_unreachable = repr(e) or type(e).__name__

    def stop(self) -> None:
        """End the loop after the refresh in hand (shutdown need not wait for a cancel)."""
        self._stopping.set()

    async def refresh(self) -> None:
        await self.measure()
        await self._housekeep()

    async def measure(self) -> None:
        """Data loss, backlog and lag per sink, dead letters, memory: what readiness, admission
        and /v1/status need (readiness waits for the first one)."""
        await self._check_data_loss()
        sinks = {name: SinkStatus(circuit=c.state) for name, c in self._circuits.items()}
        for shard in range(self._log.shards):
            for name, st in sinks.items():
                b = await self._log.backlog(shard, name)
                st.backlog += b.entries
                st.lag_s = max(st.lag_s, b.lag_s)
            for group, count in (await self._log.dead_letter_counts(shard)).items():
                if group in sinks:
                    sinks[group].dead_letters += count
        for name, st in sinks.items():
            metrics.BACKLOG.labels(name).set(st.backlog)
            metrics.LAG.labels(name).set(st.lag_s)
        pg = sinks.get(PG.name, SinkStatus())
        self._backlog.entries, self._backlog.lag_s = pg.backlog, pg.lag_s
        self._backlog.memory_ratio = await self._log.memory_ratio()
        metrics.REDIS_MEMORY_RATIO.set(self._backlog.memory_ratio)
        self.snapshot.sinks = sinks
        self.snapshot.measured = True

    async def _housekeep(self) -> None:
        """Trims and dead consumers, after the measurement: a slow trim (a stalled Redis, a
        widened failpoint) must not hold readiness back. The nemesis found a restarted sidecar
        kept unready for a minute that way while Redis kept restarting."""
        for shard in range(self._log.shards):
            await self._log.trim(shard)
            for name in self._circuits:
                await self._log.remove_dead_consumers(shard, name, self._consumer,
                                                      self._dead_idle_ms)

    async def _check_data_loss(self) -> None:
        """Redis lost data it had acknowledged: all of it (its epoch changed), or some (a seq
        or version PostgreSQL already had came back from Redis: see REDIS_DATA_LOSS). Say so,
        recreate what the log needs, and reconcile Redis's counters with PostgreSQL."""
        if await self._log.epoch_changed():
            metrics.REDIS_DATA_LOSS.labels("all").inc()
            lost = self.snapshot.sinks[PG.name].backlog if PG.name in self.snapshot.sinks else 0
            logger.error("redis lost its data (restarted empty, flushed, or failed over to a "
                         "server without it): the ~%d acknowledged writes not yet flushed at "
                         "the last count are gone; recreating the log groups", lost)
            self._log.epoch = None
            await self._log.ensure_groups()
        signals = _total(metrics.REDIS_DATA_LOSS)
        if signals > self._loss_seen and self._reconciler is not None:
            await self._reconciler.run()
        self._loss_seen = signals

    def status(self) -> dict[str, Any]:
        tiers = {"redis": {"state": self.snapshot.redis}}
        for sink in SINKS:
            if sink.name in self._circuits:
                up = self._circuits[sink.name].state == "closed" and not (
                    sink.name == PG.name and self.snapshot.pg_unreachable)
                tiers[sink.tier] = {"state": "up" if up else "down"}
        sinks = {name: {"circuit": self._circuits[name].state, "backlog": st.backlog,
                        "lag_s": round(st.lag_s, 3), "dead_letters": st.dead_letters}
                 for name, st in self.snapshot.sinks.items()}
        return {"tiers": tiers, "sinks": sinks, "degraded": self.degraded()}

    def stuck(self) -> list[str]:
        """Sinks behind by more than flush.max_lag_s although they answer (circuit closed):
        their flushers are not keeping up, which readiness must say."""
        return [f"{name}: oldest unflushed entry {st.lag_s:.0f} s old > flush.max_lag_s"
                for name, st in self.snapshot.sinks.items()
                if st.lag_s > self._max_lag_s and self._circuits[name].state == "closed"]

    def degraded(self) -> list[str]:
        """Everything that is not as it should be, in words (empty: all well)."""
        out = [] if self.snapshot.redis != "down" else ["redis: down"]
        if self.snapshot.pg_unreachable:
            out.append(f"{PG.name}: unreachable ({self.snapshot.pg_unreachable})")
        for name, st in self.snapshot.sinks.items():
            if self._circuits[name].state != "closed":
                out.append(f"{name}: circuit {self._circuits[name].state}")
            if st.lag_s > self._max_lag_s:
                out.append(f"{name}: oldest unflushed entry {st.lag_s:.0f} s old "
                           "> flush.max_lag_s")
            if st.dead_letters:
                out.append(f"{name}: {st.dead_letters} dead letters")
        return out

    @property
    def measured(self) -> bool:
        return self.snapshot.measured

    def load(self) -> Backlog:
        return self._backlog

    def lag_s(self, sink: str) -> float:
        st = self.snapshot.sinks.get(sink)
        return st.lag_s if st is not None else 0.0


def _total(counter: Any) -> float:
    """The sum of a labelled counter's children in this process."""
    return float(sum(sample.value for metric in counter.collect()
                     for sample in metric.samples if sample.name.endswith("_total")))
