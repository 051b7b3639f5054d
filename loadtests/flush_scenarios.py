"""The PostgreSQL flush scenario of bench.py: `pg_flush`, the flusher draining a backlog.

    python loadtests/bench.py --only pg_flush

One repetition (the bench runs it once whatever --repetitions says: it takes a while):

- insert: the baseline, one INSERT per row: asyncpg, autocommit, one statement per message row
  (the same columns and sizes as the sidecar's rows) into bench.messages, a copy of the
  `messages` layout (LIKE messages INCLUDING ALL: same keys and indexes), for --duration s;
- copy: what PostgreSQL itself takes at best, for scale: the same rows by COPY into an empty
  bench.messages (no upsert, no Redis, no HTTP);
- drain: the real flusher draining a 100,000-entry backlog. The main sidecar is replaced by
  one that flushes nothing (flush.sinks = "": the write-behind log grows, nothing is read or
  acknowledged), and 100,000 appends go to 100 threads through the API (wrk, as fast as the
  sidecar answers). Then it is replaced by a sidecar with the default settings, which drains
  the backlog (and stays, for the scenarios that follow). Once it is ready, its
  `tierproxy_flushed_rows_total` counters are polled every 100 ms until each has reached the
  backlog the first sidecar's /v1/status counted for its sink.
  drain_rows_per_s = rows flushed to PostgreSQL between the first poll and the first poll that
  saw the last one, over that time (what it flushed while starting up, before the first poll,
  is out of both); peak_rows_per_s is the best 1 s of that series. ClickHouse drains its own
  copy of the backlog at the same time in the same sidecar (ch_drain_rows_per_s): after an
  outage of the background worker both compete for its CPU, as here. missing_errors counts
  acknowledged appends not in PostgreSQL afterwards.

The CPU figures (% of one core) include `others`, what processes outside the bench used: on
a shared 2-core machine that is the noise in every figure; CPU us per row is steadier.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import harness
import observe
import wrkload
from harness import Stack, Target
from procs import TreeMeter
from wrkload import WrkSpec

Figures = dict[str, float]

BACKLOG = 100_000
THREADS = 100
COUNTER_POLL_S = 0.1  # the metrics page: rendering it costs the sidecar ~2 ms of CPU
PEAK_WINDOW_S = 1.0
DRAIN_TIMEOUT_S = 300.0
PAUSED = {"TIERPROXY_FLUSH_SINKS": ""}  # a sidecar that flushes nothing: the backlog grows
_COLUMNS = ("message_id", "thread_id", "seq", "role", "content", "metadata", "created_at",
            "updated_at", "version", "deleted")
_INSERT_ONE = f"""
INSERT INTO bench.messages ({", ".join(_COLUMNS)})
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10)
"""
_BENCH_SCHEMA = """
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.messages (LIKE public.messages INCLUDING ALL);
"""


def _row(tag: str, i: int, content: str, at: datetime) -> tuple[Any, ...]:
    """A message row like the flusher's: a ~26-character id, 200 characters of content."""
    return (f"{tag}{i:015d}", f"{tag}-t{i % THREADS}", i // THREADS + 1,
            "user", content, '{"source": "bench"}', at, at, 1, False)


# ---- the baseline and the ceiling


async def one_insert_per_row(url: str, duration_s: float, tag: str,
                             pids: dict[str, int]) -> Figures:
    """The baseline: sequential single-row INSERTs, each its own (autocommit) transaction."""
    content = harness.message_body()["content"]
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(_BENCH_SCHEMA)
        meter = TreeMeter(pids)
        meter.start()
        started, rows = time.perf_counter(), 0
        deadline = started + duration_s
        while rows < 200 or time.perf_counter() < deadline:
            await conn.execute(_INSERT_ONE, *_row(tag, rows, content, datetime.now(UTC)))
            rows += 1
        seconds = time.perf_counter() - started
        cpu = harness.with_others(meter.stop())
        stored = await conn.fetchval("SELECT count(*) FROM bench.messages")
    finally:
        await conn.close()
    if stored != rows:
        raise harness.HarnessError(f"one INSERT per row: {stored} rows stored of {rows}")
    return {"insert_rows": rows, "insert_rows_per_s": rows / seconds,
            **{f"insert_cpu_{k}_pct": v for k, v in cpu.items()}}


async def copy_rows(url: str, rows: int, tag: str) -> Figures:
    """PostgreSQL's own ceiling: COPY of `rows` message rows into an empty table."""
    content, at = harness.message_body()["content"], datetime.now(UTC)
    records = [_row(tag, i, content, at) for i in range(rows)]
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(_BENCH_SCHEMA)
        started = time.perf_counter()
        await conn.copy_records_to_table("messages", schema_name="bench", columns=_COLUMNS,
                                         records=records)
        seconds = time.perf_counter() - started
        await conn.execute("DROP SCHEMA bench CASCADE")
    finally:
        await conn.close()
    return {"copy_rows": rows, "copy_rows_per_s": rows / seconds}


# ---- the drain


@dataclass
class Drain:
    """What the poller saw after the draining sidecar was ready: (s since, pg rows, ch rows)."""

    series: list[tuple[float, float, float]] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)

    def done(self, col: int) -> tuple[float, float]:
        """(rows, seconds): the last count, and when it was first seen."""
        final = self.series[-1][col]
        return final, next(p[0] for p in self.series if p[col] >= final)

    def rate(self, col: int) -> float:
        """Rows per second from the first poll to the one that saw the last row."""
        final, at = self.done(col)
        t0, n0 = self.series[0][0], self.series[0][col]
        return (final - n0) / (at - t0) if at > t0 else 0.0

    def peak(self, col: int, window_s: float = PEAK_WINDOW_S) -> float:
        """The best rate over any window_s of the series (the whole drain if shorter)."""
        best, points = 0.0, self.series
        for i, p in enumerate(points):
            j = next((j for j in range(i + 1, len(points)) if points[j][0] - p[0] >= window_s),
                     None)
            if j is not None:
                best = max(best, (points[j][col] - p[col]) / (points[j][0] - p[0]))
        return best or self.rate(col)


async def _counters(http: aiohttp.ClientSession, metrics_url: str) -> tuple[float, float]:
    text = (await observe.get(http, metrics_url)).decode()
    return (observe.counter_value(text, "tierproxy_flushed_rows_total", "pg"),
            observe.counter_value(text, "tierproxy_flushed_rows_total", "ch"))


async def poll_drain(stack: Stack, backlog: dict[str, int]) -> Drain:
    """Poll the main sidecar's flushed-rows counters (they start at 0 with it) until each
    sink's reaches its `backlog`: every entry is a row of its own (new threads, new messages;
    nothing to coalesce). Not /v1/status: a sidecar that just started reports a backlog of
    0 until its monitor's first pass."""
    target = stack.sidecar
    assert target is not None
    drain, meter = Drain(), TreeMeter(target.cpu_pids)
    meter.start()
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(headers=target.headers) as http:
        while time.perf_counter() - t0 < DRAIN_TIMEOUT_S:
            pg, ch = await _counters(http, stack.metrics_url)
            drain.series.append((time.perf_counter() - t0, pg, ch))
            if pg >= backlog["pg"] and ch >= backlog["ch"]:
                drain.cpu, drain.cpu_s = harness.with_others(meter.stop()), meter.cpu_s
                return drain
            await asyncio.sleep(COUNTER_POLL_S)
    raise harness.HarnessError(f"backlog {backlog} not drained {DRAIN_TIMEOUT_S:g} s after the "
                               f"restart: last counters (s, pg, ch) {drain.series[-1]}")


async def _backlog(target: Target, entries: int) -> dict[str, int]:
    """Each sink's backlog once the monitor has counted at least `entries` in it."""
    async with observe.status_client(target) as api:
        await observe.wait_status(api, lambda s: all(
            observe.backlog(s, n) >= entries for n in ("pg", "ch")), f"a backlog of {entries}")
        sinks = await observe.sinks_status(api)
    return {name: observe.backlog(sinks, name) for name in ("pg", "ch")}


async def _count_present(url: str, tids: list[str]) -> int:
    conn = await asyncpg.connect(url)
    try:
        found: int = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE thread_id = ANY($1::text[])", tids)
    finally:
        await conn.close()
    return found


def write_backlog(target: Target, tag: str, rows: int, connections: int) -> Figures:
    """`rows` appends over THREADS new threads, as fast as the sidecar answers (wrk)."""
    tids = [f"{tag}-t{i}" for i in range(THREADS)]
    asyncio.run(harness.prepare_threads(target, tids))
    body = harness.json_text({"message_id": "{n}", **harness.message_body()})
    spec = WrkSpec("POST", f"/v1/threads/{tag}-t{{k}}/messages", THREADS, body, connections)
    wrote = wrkload.write_backlog(target, spec, rows)
    return {"backlog_requests": wrote["requests"], "backlog_errors": wrote["errors"],
            "backlog_write_rps": wrote["rps"]}


def drain_backlog(stack: Stack, rows: int, tag: str, connections: int) -> Figures:
    """Write `rows` appends with no flusher running, then time a new sidecar's drain."""
    stack.restart_sidecar(PAUSED)
    try:
        assert stack.sidecar is not None
        figures = write_backlog(stack.sidecar, tag, rows, connections)
        acked = figures["backlog_requests"] - figures["backlog_errors"]
        backlog = asyncio.run(_backlog(stack.sidecar, int(acked) + THREADS))
    finally:
        stack.restart_sidecar()  # default settings: it drains, and stays for what follows
    drain = asyncio.run(poll_drain(stack, backlog))
    present = asyncio.run(_count_present(stack.postgres_url,
                                         [f"{tag}-t{i}" for i in range(THREADS)]))
    pg_rows, pg_s = drain.done(1)
    ch_rows, ch_s = drain.done(2)
    figures |= {
        "drain_rows": pg_rows, "drain_s": pg_s, "drain_rows_per_s": drain.rate(1),
        "peak_rows_per_s": drain.peak(1), "ch_drain_rows": ch_rows, "ch_drain_s": ch_s,
        "ch_drain_rows_per_s": drain.rate(2), "missing_errors": max(0.0, acked - present),
        **{f"drain_cpu_{k}_pct": v for k, v in drain.cpu.items()},
    }
    for tree, seconds in drain.cpu_s.items():  # both sinks' work, per backlog entry
        figures[f"drain_us_per_row_{tree}"] = seconds * 1e6 / max(pg_rows, 1.0)
    return figures


def pg_flush(stack: Stack, duration_s: float, connections: int = 32,
             rows: int = BACKLOG) -> Figures:
    """One repetition of pg_flush (see the module doc)."""
    assert stack.sidecar is not None
    tag = f"f{time.time_ns() // 1_000_000 % 10**9}"
    figures: Figures = {"settle_s": harness.settle(stack.server_pids)}
    pids = {**stack.sidecar.cpu_pids, "bench": os.getpid()}
    figures |= asyncio.run(one_insert_per_row(stack.postgres_url, duration_s, f"{tag}i", pids))
    figures |= asyncio.run(copy_rows(stack.postgres_url, rows, f"{tag}c"))
    figures |= drain_backlog(stack, rows, f"{tag}d", connections)
    base = figures["insert_rows_per_s"]
    figures["drain_speedup"] = figures["drain_rows_per_s"] / base
    figures["peak_speedup"] = figures["peak_rows_per_s"] / base
    figures["copy_speedup"] = figures["copy_rows_per_s"] / base
    figures["insert_us_per_row_postgres"] = (figures.get("insert_cpu_postgres_pct", 0.0) * 1e4
                                             / base)
    return figures


def pg_flush_report(f: Figures) -> list[str]:
    def cpu(prefix: str) -> str:
        return ", ".join(f"{k.removeprefix(prefix)[:-4]} {v:.0f}" for k, v in f.items()
                         if k.startswith(prefix) and k.endswith("_pct"))

    per_row = ", ".join(f"{k.removeprefix('drain_us_per_row_')} {v:.0f}" for k, v in f.items()
                        if k.startswith("drain_us_per_row_"))
    lines = [
        f"  {'':<42} {'rows/s':>8} {'x base':>7}",
        f"  {'one INSERT per row (baseline)':<42} {f['insert_rows_per_s']:>8.0f} {1:>7.1f}"
        f"  CPU % of a core: {cpu('insert_cpu_')}",
        f"  {'COPY into an empty table (PostgreSQL max)':<42} {f['copy_rows_per_s']:>8.0f} "
        f"{f['copy_speedup']:>7.1f}",
        f"  {'flusher draining the backlog':<42} {f['drain_rows_per_s']:>8.0f} "
        f"{f['drain_speedup']:>7.1f}  CPU % of a core: {cpu('drain_cpu_')}",
        f"  {f'flusher draining, best {PEAK_WINDOW_S:g} s':<42} {f['peak_rows_per_s']:>8.0f} "
        f"{f['peak_speedup']:>7.1f}",
        f"  {'ClickHouse streamer, meanwhile':<42} {f['ch_drain_rows_per_s']:>8.0f}",
        f"  backlog: {f['backlog_requests']:.0f} appends at {f['backlog_write_rps']:.0f}/s with "
        f"the flushers paused, {f['backlog_errors']:.0f} errors; drained to PostgreSQL "
        f"{f['drain_s']:.1f} s and to ClickHouse {f['ch_drain_s']:.1f} s after the new "
        f"sidecar was ready; CPU us per backlog entry: {per_row}",
        f"  acknowledged but missing in PostgreSQL: {f['missing_errors']:.0f}",
    ]
    others = max(f.get("insert_cpu_others_pct", 0.0), f.get("drain_cpu_others_pct", 0.0))
    if others > 20:
        lines.append(f"  WARNING: processes outside the bench used up to {others:.0f}% of a core: "
                     "the machine was busy, the figures are pessimistic (CPU us/row less so)")
    return lines
