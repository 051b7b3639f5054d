"""The PostgreSQL write-behind scenarios of bench.py: `pg_flush` and `ack_to_commit`.

    python loadtests/bench.py --only pg_flush
    python loadtests/bench.py --only ack_to_commit

pg_flush, one repetition:

- insert: the baseline, one INSERT per row: asyncpg, autocommit, one statement per message row
  (the same columns and sizes as the sidecar's rows) into bench.messages, a copy of the
  `messages` layout (LIKE messages INCLUDING ALL: same keys and indexes), for --duration s;
- upsert: a ceiling, PostgresStore.upsert (the flusher's own statements) called from this
  process in batches of 1000 rows, one at a time, into bench.* (search_path): no Redis, no HTTP;
- drain: the real flusher. PostgreSQL is stopped, N = 5000 x --duration messages are appended
  through the API (acknowledged into Redis: the `pg` backlog grows), PostgreSQL is started
  again, and from then on the sidecar's `tierproxy_flushed_rows_total{sink="pg"}` is polled
  every 100 ms (at 20/s the metrics page alone took ~10% of the sidecar's CPU), then /v1/status
  every 50 ms until its `sinks.pg.backlog` is 0. A count in PostgreSQL then
  checks that every acknowledged message is there (`missing_errors`). Figures:
  `first_progress_s` restart → first committed batch (the circuit's open_s and each writer's
  retry backoff, up to flush.backoff_max_ms, idle the flusher after an outage); `drain_s`
  restart → all N committed; `status_zero_s` restart → /v1/status backlog 0 (the monitor
  refreshes it every flush.trim_interval_s, so it trails drain_s);
  drain_rows_per_s = N / drain_s, nothing subtracted; flowing_rows_per_s = rows after the first
  batch / (drain_s - first_progress_s), which still holds the wait for a writer whose backoff
  ends later than the others' (its shard does not flow until then); peak_rows_per_s, the best
  1 s of the polled series: the batching's throughput while the shards flow.
  CPU us per row (each process's CPU time in a phase / rows) is steadier than rows/s on a busy
  machine: a process starved of CPU waits, it does not burn more.

ack_to_commit, one repetition: appends at 500 req/s, open loop (loadgen.py, as the HTTP
scenarios), for --duration s. Two figures for the time from acknowledgement to commit:

- hist: the sidecar's own `tierproxy_ack_to_commit_seconds` histogram (delta of its buckets
  over the run, quantiles interpolated inside a bucket as Prometheus' histogram_quantile does;
  buckets are coarse: 50-100 ms, 100-250 ms), for sink pg and, if present, ch. It runs from
  the write's stamp (taken in the sidecar before its Redis call) to after the commit and the
  XACKs, and covers the warm-up too;
- visible: 20 of the 500 appends per second come from this process, which polls PostgreSQL
  from the moment it has the 201 until the row is visible (every 2 ms, one SELECT for all the
  ids still awaited, on one connection, so a late flush does not multiply the polling). This
  is what a client sees; the histogram is measured inside the sidecar.

The CPU figures (% of one core) include `others`, what processes outside the bench used: on a
shared 2-core machine that is the noise in every figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import re
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import harness
import orjson
import psutil
from harness import Stack, Target
from loadgen import Spec, percentile

from proxy.failpoints import Failpoints
from proxy.sinks.postgres import PostgresStore
from proxy.writelog import Entry

Figures = dict[str, float]

BACKLOG_ROWS_PER_S = 5000  # drain: N = this x --duration messages (10 s: 50,000)
MIN_ROWS = 1000
CEILING_BATCH = 1000  # the flusher's default flush.max_batch
THREADS = 100
WRITE_CONCURRENCY = 32
POLL_S = 0.05  # /v1/status
COUNTER_POLL_S = 0.1  # the metrics page: rendering it costs the sidecar ~2 ms of CPU
PEAK_WINDOW_S = 1.0
IDLE_TIMEOUT_S = 180.0
ACK_RATE = 500.0  # req/s in ack_to_commit (--rate is the HTTP scenarios')
SAMPLE_RATE = 20.0  # of those, appends sent and followed into PostgreSQL by this process
VISIBLE_POLL_S = 0.002
VISIBLE_TIMEOUT_S = 60.0
SAMPLE_THREADS = [f"ack-s{i}" for i in range(10)]
LOAD_THREADS = [f"ack-t{i}" for i in range(THREADS)]

_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_INSERT_ONE = """
INSERT INTO bench.messages (message_id, thread_id, seq, role, content, metadata, created_at,
                            updated_at, version, deleted)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10)
"""
_BENCH_SCHEMA = """
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.threads (LIKE public.threads INCLUDING ALL);
CREATE TABLE bench.messages (LIKE public.messages INCLUDING ALL);
CREATE TABLE bench.state_entries (LIKE public.state_entries INCLUDING ALL);
"""


# ---- measuring helpers


class TreeCpu:
    """CPU of process trees and of the machine between start() and stop(), in % of one core.
    Children are looked up again at stop(), so PostgreSQL backends opened meanwhile (the pool
    reconnecting after a restart) count; `others` is the machine less the trees."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._roots = pids
        self._start: dict[tuple[int, float], float] = {}
        self._t0 = self._busy0 = 0.0

    def _trees(self) -> dict[str, list[psutil.Process]]:
        trees: dict[str, list[psutil.Process]] = {}
        for name, pid in self._roots.items():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                trees[name] = [root, *root.children(recursive=True)]
        return trees

    @staticmethod
    def _busy() -> float:
        m = psutil.cpu_times()
        return float(m.user + m.nice + m.system + m.irq + m.softirq + getattr(m, "steal", 0.0))

    @staticmethod
    def _cpu(proc: psutil.Process) -> tuple[tuple[int, float], float] | None:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            return (proc.pid, proc.create_time()), t.user + t.system
        return None

    def start(self) -> None:
        self._start = {}
        for procs in self._trees().values():
            for proc in procs:
                if (got := self._cpu(proc)) is not None:
                    self._start[got[0]] = got[1]
        self._t0, self._busy0 = time.perf_counter(), self._busy()

    def stop(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self._t0, 1e-9)
        out: dict[str, float] = {}
        for name, procs in self._trees().items():
            used = 0.0
            for proc in procs:
                if (got := self._cpu(proc)) is not None:
                    used += got[1] - self._start.get(got[0], 0.0)
            out[name] = 100.0 * used / wall
        out["others"] = max(0.0, 100.0 * (self._busy() - self._busy0) / wall - sum(out.values()))
        return {k: round(v, 1) for k, v in out.items()}


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` in a Prometheus text exposition."""
    return [(dict(_LABEL.findall(labels)), float(value))
            for metric, labels, value in _SAMPLE.findall(text) if metric == name]


def counter_value(text: str, name: str, sink: str) -> float:
    return sum(v for labels, v in metric_samples(text, name) if labels.get("sink") == sink)


def histogram_buckets(text: str, name: str, sink: str) -> dict[float, float]:
    """Cumulative bucket counts by upper bound (+Inf included) of one sink's histogram."""
    return {float(labels["le"]): v for labels, v in metric_samples(text, f"{name}_bucket")
            if labels.get("sink") == sink and "le" in labels}


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Quantile q of what was observed between two readings of cumulative buckets, linearly
    interpolated inside its bucket (Prometheus' histogram_quantile); nan if nothing was."""
    bounds = sorted(after)
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    if not cum or cum[-1] <= 0:
        return math.nan
    rank = q * cum[-1]
    low, low_cum = 0.0, 0.0
    for bound, count in zip(bounds, cum, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return low  # above the last finite bucket: its bound is all we know
            if count == low_cum:
                return bound
            return low + (bound - low) * (rank - low_cum) / (count - low_cum)
        low, low_cum = bound, count
    return low


async def _get(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.get(url) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise harness.HarnessError(f"GET {url}: {resp.status} {body[:300]!r}")
        return body


async def sinks_status(http: aiohttp.ClientSession, target: Target) -> dict[str, Any]:
    """`sinks` of the sidecar's /v1/status: per sink backlog, lag_s, circuit, dead_letters."""
    status = orjson.loads(await _get(http, f"{target.url}/v1/status"))
    sinks: dict[str, Any] = status["sinks"]
    return sinks


def _backlog(sinks: dict[str, Any], name: str) -> int:
    return int(sinks.get(name, {}).get("backlog", 0))


async def wait_status(http: aiohttp.ClientSession, target: Target,
                      done: Callable[[dict[str, Any]], bool], what: str,
                      timeout_s: float = IDLE_TIMEOUT_S) -> float:
    """Poll /v1/status until `done(sinks)`; return the seconds waited."""
    started = time.monotonic()
    while not done(sinks := await sinks_status(http, target)):
        if time.monotonic() - started > timeout_s:
            raise harness.HarnessError(f"{what}: not reached in {timeout_s:g} s; sinks {sinks}")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started


async def wait_flushed(http: aiohttp.ClientSession, target: Target) -> None:
    """Until every sink has flushed everything. The status is the monitor's last refresh
    (every flush.trim_interval_s): wait out one refresh first, so it postdates our writes."""
    await asyncio.sleep(1.5)
    await wait_status(http, target, lambda s: all(_backlog(s, n) == 0 for n in s),
                      "every sink's backlog at 0")


# ---- test rows


def _now() -> datetime:
    return datetime.now(UTC)


def _row(tag: str, i: int, content: str, at: datetime) -> tuple[Any, ...]:
    """A message row like the flusher's: a ~26-character id, 200 characters of content."""
    return (f"{tag}{i:015d}", f"{tag}-t{i % THREADS}", i // THREADS + 1,
            "user", content, '{"source": "bench"}', at, at, 1, False)


def _entry(tag: str, i: int, content: str, ms: int) -> Entry:
    """The same message as the write log carries it, for PostgresStore.upsert."""
    mid, tid, seq = f"{tag}{i:015d}", f"{tag}-t{i % THREADS}", i // THREADS + 1
    stamp = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    doc = {"seq": seq, "version": 1, "message_id": mid, "thread_id": tid, "role": "user",
           "content": content, "metadata": {"source": "bench"}, "created_at": stamp,
           "updated_at": stamp, "deleted": False}
    return Entry(0, f"{ms}-{i}", "m", mid, tid, 1, "created", ms, orjson.dumps(doc))


# ---- pg_flush


async def one_insert_per_row(url: str, duration_s: float, tag: str,
                             pids: dict[str, int]) -> Figures:
    """The baseline: sequential single-row INSERTs, each its own (autocommit) transaction."""
    content = harness.message_body()["content"]
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(_BENCH_SCHEMA)
        meter = TreeCpu(pids)
        meter.start()
        started, rows = time.perf_counter(), 0
        deadline = started + duration_s
        while rows < 200 or time.perf_counter() < deadline:
            await conn.execute(_INSERT_ONE, *_row(tag, rows, content, _now()))
            rows += 1
        seconds = time.perf_counter() - started
        cpu = meter.stop()
        stored = await conn.fetchval("SELECT count(*) FROM bench.messages")
    finally:
        await conn.close()
    if stored != rows:
        raise harness.HarnessError(f"one INSERT per row: {stored} rows stored of {rows}")
    return {"insert_rows": rows, "insert_rows_per_s": rows / seconds,
            **{f"insert_cpu_{k}_pct": v for k, v in cpu.items()}}


async def upsert_batches(url: str, rows: int, tag: str, pids: dict[str, int]) -> Figures:
    """The ceiling: PostgresStore.upsert in batches of CEILING_BATCH, one after the other."""
    content = harness.message_body()["content"]
    ms = time.time_ns() // 1_000_000
    entries = [_entry(tag, i, content, ms) for i in range(rows)]
    batches = [entries[i:i + CEILING_BATCH] for i in range(0, rows, CEILING_BATCH)]
    conn = await asyncpg.connect(url)
    await conn.execute(_BENCH_SCHEMA)
    await conn.close()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1,
                                     server_settings={"search_path": "bench"})
    try:
        store = PostgresStore(pool, Failpoints(""))
        meter = TreeCpu(pids)
        meter.start()
        started = time.perf_counter()
        for batch in batches:
            await store.upsert(batch)
        seconds = time.perf_counter() - started
        cpu = meter.stop()
        stored = await pool.fetchval("SELECT count(*) FROM bench.messages")
    finally:
        await pool.close()
    if stored != rows:
        raise harness.HarnessError(f"upsert ceiling: {stored} rows stored of {rows}")
    return {"upsert_rows": rows, "upsert_rows_per_s": rows / seconds,
            **{f"upsert_cpu_{k}_pct": v for k, v in cpu.items()}}


async def append_many(http: aiohttp.ClientSession, target: Target, tids: Sequence[str],
                      n: int) -> tuple[list[str], int]:
    """Append n messages round-robin over tids at WRITE_CONCURRENCY; (ids acked, failures)."""
    body = harness.json_text(harness.message_body()).encode()
    headers = {"Content-Type": "application/json"}
    todo = iter(range(n))
    acked: list[str] = []
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for i in todo:
            url = f"{target.url}/v1/threads/{tids[i % len(tids)]}/messages"
            try:
                async with http.post(url, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    if resp.status == 201:
                        acked.append(orjson.loads(answer)["message_id"])
                    else:
                        failed += 1
            except (aiohttp.ClientError, TimeoutError):
                failed += 1

    await asyncio.gather(*(worker() for _ in range(WRITE_CONCURRENCY)))
    return acked, failed


@dataclasses.dataclass
class DrainClock:
    """What the poller saw after the restart (seconds since it; None: not yet)."""

    first_s: float | None = None
    first_rows: float = 0.0
    done_s: float | None = None
    status_zero_s: float | None = None
    cpu: dict[str, float] = dataclasses.field(default_factory=dict)
    series: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (s, rows)

    def peak_rate(self, window_s: float = PEAK_WINDOW_S) -> float:
        """The best rate over any window_s of the polled series (the whole drain if shorter):
        the batching's throughput while every shard flows."""
        best, points = 0.0, self.series
        for i, (t_i, n_i) in enumerate(points):
            j = next((j for j in range(i + 1, len(points)) if points[j][0] - t_i >= window_s),
                     None)
            if j is not None:
                best = max(best, (points[j][1] - n_i) / (points[j][0] - t_i))
        if best == 0.0 and len(points) > 1 and points[-1][0] > points[0][0]:
            best = (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
        return best


async def _poll_drain(http: aiohttp.ClientSession, stack: Stack, rows: int, base: float,
                      t0: float) -> DrainClock:
    """Every COUNTER_POLL_S the flushed-rows counter until all rows are committed, then /v1/status
    until it shows backlog 0 (it cannot before: the monitor counts acked entries, acks follow
    the commit; polling it during the drain would only cost the sidecar CPU)."""
    target = stack.sidecar
    assert target is not None
    clock, meter = DrainClock(), TreeCpu(dict(target.cpu_pids))
    meter.start()
    flushed = 0.0
    while clock.done_s is None:
        text = (await _get(http, stack.metrics_url)).decode()
        now = time.perf_counter() - t0
        flushed = counter_value(text, "tierproxy_flushed_rows_total", "pg") - base
        clock.series.append((now, flushed))
        if clock.first_s is None and flushed > 0:
            clock.first_s, clock.first_rows = now, flushed
        if flushed >= rows:
            clock.done_s, clock.cpu = now, meter.stop()
        elif now > IDLE_TIMEOUT_S:
            raise harness.HarnessError(f"pg backlog not drained {now:.0f} s after the restart: "
                                       f"{flushed:.0f} of {rows} rows flushed")
        else:
            await asyncio.sleep(COUNTER_POLL_S)
    waited = await wait_status(http, target, lambda s: _backlog(s, "pg") == 0,
                               "pg backlog at 0 in /v1/status")
    clock.status_zero_s = time.perf_counter() - t0 if waited else clock.done_s
    return clock


async def _count_present(url: str, ids: list[str]) -> int:
    conn = await asyncpg.connect(url)
    try:
        found: int = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE message_id = ANY($1::text[])", ids)
    finally:
        await conn.close()
    return found


async def drain_backlog(stack: Stack, rows: int, tag: str) -> Figures:
    """Stop PostgreSQL, append `rows` messages, start it again, time the flusher's drain."""
    target = stack.sidecar
    assert target is not None
    tids = [f"{tag}-t{i}" for i in range(THREADS)]
    await harness.prepare_threads(target, tids)
    async with aiohttp.ClientSession(headers=target.headers) as http:
        await wait_flushed(http, target)  # the threads are in PostgreSQL, ch is idle
        stack.stop_postgres()
        outage = time.perf_counter()
        try:
            acked, failed = await append_many(http, target, tids, rows)
            write_s = time.perf_counter() - outage
            # The backlog is all there, and ch (chDB, inside the sidecar) is done with it, so
            # the drain has the sidecar's CPU to itself.
            await wait_status(http, target, lambda s: _backlog(s, "pg") >= len(acked) and
                              _backlog(s, "ch") == 0, "pg backlog complete, ch idle")
            base = counter_value((await _get(http, stack.metrics_url)).decode(),
                                 "tierproxy_flushed_rows_total", "pg")
        finally:
            restart = time.perf_counter()
            stack.start_postgres()
        t0 = time.perf_counter()
        clock = await _poll_drain(http, stack, len(acked), base, t0)
    assert clock.first_s is not None and clock.done_s is not None
    present = await _count_present(stack.postgres_url, acked)
    flowing_s = max(clock.done_s - clock.first_s, 1e-9)
    return {
        "drain_rows": len(acked), "drain_write_errors": failed,
        "missing_errors": len(acked) - present, "write_rows_per_s": len(acked) / write_s,
        "outage_s": restart - outage, "restart_s": t0 - restart,
        "first_progress_s": clock.first_s, "drain_s": clock.done_s,
        "status_zero_s": clock.status_zero_s or 0.0,
        "drain_rows_per_s": len(acked) / clock.done_s,
        "peak_rows_per_s": clock.peak_rate(),
        "flowing_rows_per_s": ((len(acked) - clock.first_rows) / flowing_s
                               if clock.done_s > clock.first_s else len(acked) / clock.done_s),
        **{f"drain_cpu_{k}_pct": v for k, v in clock.cpu.items()},
    }


def pg_flush(stack: Stack, duration_s: float, repetition_tag: str = "") -> Figures:
    """One repetition of pg_flush (see the module doc)."""
    target = stack.sidecar
    assert target is not None
    tag = repetition_tag or f"f{time.time_ns() // 1_000_000 % 10**9}"
    rows = max(MIN_ROWS, int(BACKLOG_ROWS_PER_S * duration_s))
    figures: Figures = {}
    figures["settle_s"] = harness.settle(stack.server_pids)
    pids = {**target.cpu_pids, "bench": os.getpid()}
    figures |= asyncio.run(one_insert_per_row(stack.postgres_url, duration_s, f"{tag}i", pids))
    figures |= asyncio.run(upsert_batches(stack.postgres_url, rows, f"{tag}u", pids))
    figures |= asyncio.run(drain_backlog(stack, rows, f"{tag}d"))
    base = figures["insert_rows_per_s"]
    figures |= _cpu_per_row(figures)
    figures["upsert_speedup"] = figures["upsert_rows_per_s"] / base
    figures["drain_speedup"] = figures["drain_rows_per_s"] / base
    figures["flowing_speedup"] = figures["flowing_rows_per_s"] / base
    figures["peak_speedup"] = figures["peak_rows_per_s"] / base
    return figures


def _cpu_per_row(f: Figures) -> Figures:
    """CPU microseconds per row of each process in each phase: steadier than rows/s when
    other jobs take the cores (a starved process waits, it does not burn more CPU)."""
    seconds = {"insert": f["insert_rows"] / f["insert_rows_per_s"],
               "upsert": f["upsert_rows"] / f["upsert_rows_per_s"], "drain": f["drain_s"]}
    rows = {"insert": f["insert_rows"], "upsert": f["upsert_rows"], "drain": f["drain_rows"]}
    out: Figures = {}
    for phase in seconds:
        for proc in ("sidecar", "redis", "postgres", "bench"):
            pct = f.get(f"{phase}_cpu_{proc}_pct")
            if pct is not None and rows[phase]:
                out[f"{phase}_us_per_row_{proc}"] = pct * 1e4 * seconds[phase] / rows[phase]
    return out


def _per_row(f: Figures, phase: str) -> str:
    prefix = f"{phase}_us_per_row_"
    return ", ".join(f"{k.removeprefix(prefix)} {v:.0f}" for k, v in f.items()
                     if k.startswith(prefix) and v >= 0.5)


def _cpu(f: Figures, phase: str) -> str:
    prefix = f"{phase}_cpu_"
    return ", ".join(f"{k.removeprefix(prefix)[:-4]} {v:.0f}" for k, v in f.items()
                     if k.startswith(prefix) and k.endswith("_pct"))


def pg_flush_report(f: Figures) -> list[str]:
    head = f"  {'':<38} {'rows/s':>8} {'x base':>7} {'rows':>7}"
    lines = [f"{head}  CPU % of a core / CPU us per row"]
    for label, phase, rate, speedup, rows in (
            ("one INSERT per row (baseline)", "insert", "insert_rows_per_s", "", "insert_rows"),
            (f"PostgresStore.upsert x{CEILING_BATCH} (ceiling)", "upsert", "upsert_rows_per_s",
             "upsert_speedup", "upsert_rows"),
            ("flusher drain, from the restart", "drain", "drain_rows_per_s", "drain_speedup",
             "drain_rows"),
            ("flusher drain, once flowing", "", "flowing_rows_per_s", "flowing_speedup", ""),
            (f"flusher drain, best {PEAK_WINDOW_S:g} s", "", "peak_rows_per_s", "peak_speedup",
             "")):
        x = f[speedup] if speedup else 1.0
        n = f"{f[rows]:>7.0f}" if rows else " " * 7
        cpu = f"{_cpu(f, phase)} / {_per_row(f, phase)}" if phase else ""
        lines.append(f"  {label:<38} {f[rate]:>8.0f} {x:>7.1f} {n}  {cpu}".rstrip())
    lines += [
        f"  first batch committed {f['first_progress_s']:.2f} s after the restart (circuit "
        f"open / retry backoff), all {f['drain_s']:.2f} s; /v1/status backlog 0 after "
        f"{f['status_zero_s']:.2f} s",
        f"  PostgreSQL down {f['outage_s']:.0f} s (restart {f['restart_s']:.2f} s); appends "
        f"while down {f['write_rows_per_s']:.0f}/s, {f['drain_write_errors']:.0f} errors; "
        f"acknowledged but missing in PostgreSQL: {f['missing_errors']:.0f}",
    ]
    others = max(f.get(f"{p}_cpu_others_pct", 0.0) for p in ("insert", "upsert", "drain"))
    if others > 20:
        lines.append(f"  WARNING: processes outside the bench used up to {others:.0f}% of a core: "
                     "the machine was busy, the figures are pessimistic (CPU us/row less so)")
    return lines


# ---- ack_to_commit


class Watcher:
    """Polls PostgreSQL for every appended-but-not-yet-seen message in one query, every
    VISIBLE_POLL_S, on one connection: its load on PostgreSQL stays bounded however late the
    flush (a poller per sample would add load just when the flusher falls behind)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._waiting: dict[str, float] = {}  # message id -> when its 201 arrived
        self.visible_ms: list[float] = []
        self.timeouts = 0

    def expect(self, mid: str, acked: float) -> None:
        self._waiting[mid] = acked

    async def run(self, until: asyncio.Event) -> None:
        """Until `until` is set and nothing is awaited any more."""
        while not until.is_set() or self._waiting:
            if self._waiting:
                await self._poll()
            await asyncio.sleep(VISIBLE_POLL_S)

    async def _poll(self) -> None:
        asked = time.perf_counter()  # a row found was visible to this statement's snapshot
        found = await self._conn.fetch(
            "SELECT message_id FROM messages WHERE message_id = ANY($1::text[])",
            list(self._waiting))
        for row in found:
            self.visible_ms.append((asked - self._waiting.pop(row["message_id"])) * 1000)
        for mid, acked in list(self._waiting.items()):
            if asked - acked > VISIBLE_TIMEOUT_S:
                del self._waiting[mid]
                self.timeouts += 1


async def _sample_one(http: aiohttp.ClientSession, watcher: Watcher, target: Target,
                      tid: str, body: bytes) -> float | None:
    """Append one message and hand it to the watcher: the append's ms, None on failure."""
    started = time.perf_counter()
    try:
        async with http.post(f"{target.url}/v1/threads/{tid}/messages", data=body,
                             headers={"Content-Type": "application/json"}) as resp:
            answer = await resp.read()
            if resp.status != 201:
                return None
    except (aiohttp.ClientError, TimeoutError):
        return None
    acked = time.perf_counter()
    watcher.expect(orjson.loads(answer)["message_id"], acked)
    return (acked - started) * 1000


@dataclasses.dataclass
class Sampled:
    load: dict[str, Any]  # harness.run_load's result
    visible_ms: list[float]  # 201 -> visible in PostgreSQL, per sample
    append_ms: list[float]
    failed: int  # appends that failed
    invisible: int  # appended, but not visible in PostgreSQL after VISIBLE_TIMEOUT_S
    bench_cpu_pct: float  # this process while sampling (it is no server, nor the client)


async def _sample(stack: Stack, spec: Spec, target: Target) -> Sampled:
    """Run the load (loadgen.py, in a thread) and sample appends during its window."""
    assert stack.sidecar is not None
    body = harness.json_text(harness.message_body()).encode()
    # Connected now, before the load's CPU window: the backend then counts as postgres.
    conn = await asyncpg.connect(stack.postgres_url)
    try:
        watcher, sent = Watcher(conn), asyncio.Event()
        watching = asyncio.create_task(watcher.run(sent))
        async with aiohttp.ClientSession(headers=target.headers) as http:
            load = asyncio.get_running_loop().run_in_executor(None, harness.run_load,
                                                              target, spec)
            await asyncio.sleep(spec.warmup_s + 0.3)  # loadgen's start-up and warm-up
            tasks, t_start, n, cpu_start = [], time.perf_counter(), 0, time.process_time()
            while (due := t_start + n / SAMPLE_RATE) < t_start + spec.duration_s:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tid = SAMPLE_THREADS[n % len(SAMPLE_THREADS)]
                tasks.append(asyncio.create_task(_sample_one(http, watcher, stack.sidecar,
                                                             tid, body)))
                n += 1
            appends = await asyncio.gather(*tasks)
            sent.set()
            await watching
            bench_pct = 100 * (time.process_time() - cpu_start) / (time.perf_counter() - t_start)
            result = await load
            await wait_flushed(http, stack.sidecar)
    finally:
        await conn.close()
    ok = [a for a in appends if a is not None]
    return Sampled(result, watcher.visible_ms, ok, len(appends) - len(ok), watcher.timeouts,
                   round(bench_pct, 1))


def _hist_figures(before: str, after: str) -> Figures:
    out: Figures = {}
    name = "tierproxy_ack_to_commit_seconds"
    for sink in ("pg", "ch"):
        b, a = histogram_buckets(before, name, sink), histogram_buckets(after, name, sink)
        if not a:
            continue
        out[f"{sink}_hist_count"] = a.get(math.inf, 0.0) - b.get(math.inf, 0.0)
        for q in (0.50, 0.99):
            out[f"{sink}_hist_p{q * 100:.0f}_ms"] = bucket_quantile(b, a, q) * 1000
    return out


def ack_to_commit(stack: Stack, duration_s: float, warmup_s: float,
                  rate: float = ACK_RATE) -> Figures:
    """One repetition of ack_to_commit (see the module doc)."""
    sidecar = stack.sidecar
    assert sidecar is not None
    spec = Spec(base_url="", method="POST", path="/v1/threads/ack-t{k}/messages",
                body=harness.json_text(harness.message_body()), keys=len(LOAD_THREADS),
                mode="open", concurrency=256, rate=rate - SAMPLE_RATE, duration_s=duration_s,
                warmup_s=warmup_s)
    figures: Figures = {"settle_s": harness.settle(stack.server_pids)}
    before = _fetch(stack.metrics_url)
    run = asyncio.run(_sample(stack, spec, sidecar))  # returns once all is flushed
    figures |= _hist_figures(before, _fetch(stack.metrics_url))
    result, failed = run.load, run.failed
    visible, http_ms = sorted(run.visible_ms), sorted(run.append_ms)
    figures |= {
        "offered_rps": rate, "rps": result["rps"] + len(http_ms) / duration_s,
        "sidecar_requests": result["requests"] + len(http_ms) + failed,
        "invisible_errors": run.invisible,
        "sidecar_errors": result["errors"] + failed,
        "http_p50_ms": result["p50_ms"], "http_p99_ms": result["p99_ms"],
        "lag_p99_ms": result.get("lag_p99_ms", 0.0),
        "visible_samples": len(visible),
        "visible_p50_ms": percentile(visible, 0.50), "visible_p99_ms": percentile(visible, 0.99),
        "visible_max_ms": visible[-1] if visible else 0.0,
        "sample_http_p50_ms": percentile(http_ms, 0.50),
    }
    cpu = dict(result["cpu_pct"])
    # This process's sampling and polling is CPU too: "bench", not "others".
    cpu["bench"] = run.bench_cpu_pct
    cpu["others"] = max(0.0, cpu.get("others", 0.0) - run.bench_cpu_pct)
    figures |= {f"cpu_{k}_pct": v for k, v in cpu.items()}
    return figures


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def ack_to_commit_report(f: Figures) -> list[str]:
    def q(prefix: str) -> str:
        return f"p50 {f[f'{prefix}_p50_ms']:7.1f} ms  p99 {f[f'{prefix}_p99_ms']:7.1f} ms"

    cpu = ", ".join(f"{k[4:-4]} {v:.0f}" for k, v in f.items()
                    if k.startswith("cpu_") and k.endswith("_pct"))
    lines = [
        f"  appends: offered {f['offered_rps']:.0f}/s, answered {f['rps']:.0f}/s, "
        f"{f['sidecar_requests']:.0f} requests, {f['sidecar_errors']:.0f} errors; HTTP p50 "
        f"{f['http_p50_ms']:.2f} ms, p99 {f['http_p99_ms']:.2f} ms; client lag p99 "
        f"{f['lag_p99_ms']:.2f} ms",
        f"  pg visible to a reader (201 -> SELECT finds it)  {q('visible')}  max "
        f"{f['visible_max_ms']:.1f} ms  ({f['visible_samples']:.0f} samples, "
        f"{f['invisible_errors']:.0f} never seen)",
    ]
    if "pg_hist_p50_ms" in f:
        lines.append(f"  pg  histogram (in the sidecar, interpolated)    {q('pg_hist')}  "
                     f"({f['pg_hist_count']:.0f} rows)")
    if "ch_hist_p50_ms" in f:
        lines.append(f"  ch  histogram (in the sidecar, interpolated)    {q('ch_hist')}  "
                     f"({f['ch_hist_count']:.0f} rows)")
    lines.append(f"  CPU % of a core: {cpu}")
    if f.get("cpu_others_pct", 0.0) > 20:
        lines.append(f"  WARNING: processes outside the bench used {f['cpu_others_pct']:.0f}% "
                     "of a core: the machine was busy, the figures are pessimistic")
    return lines


def setup_ack_to_commit(stack: Stack) -> None:
    assert stack.sidecar is not None
    asyncio.run(harness.prepare_threads(stack.sidecar, LOAD_THREADS + SAMPLE_THREADS))
