"""The write-behind latency scenario of bench.py: `ack_to_commit`, from a write's
acknowledgement to its row in PostgreSQL and in ClickHouse, at a steady load.

    python loadtests/bench.py --only ack_to_commit

One repetition: appends at 500 req/s, open loop (loadgen.py, as the HTTP scenarios), for
--duration s. Measured from outside, as a reader sees it (these are the table's figures):

- pg visible: 20 of the 500 appends per second come from this process, which polls
  PostgreSQL from the moment it has the 201 until the row is visible (every 2 ms, one SELECT
  for all the ids still awaited, on one connection, so a late flush does not multiply the
  polling);
- ch visible: 2 probes each append a message to a thread of their own and poll its
  /v1/threads/{tid}/stats (answered from ClickHouse) every 100 ms until it counts that
  message, then append the next (so up to 100 ms too high; few samples, but ClickHouse
  batches every clickhouse.interval_ms, so they spread over its cycle).

And from inside: the sidecar's own `tierproxy_ack_to_commit_seconds` histogram per sink (delta
of its buckets over the run, quantiles interpolated inside a bucket as Prometheus'
histogram_quantile does; the buckets are coarse: 50-100 ms, 100-250 ms, 1-2.5 s). It runs from
the write's stamp (taken in the sidecar before its Redis call) to after the commit and the
XACKs, covers every row and the warm-up too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any

import asyncpg
import harness
import observe
from harness import Stack, Target
from loadgen import Spec, percentile

from proxy.client import NO_RETRY, Client, ClientError, NotFound, Unavailable

Figures = dict[str, float]

ACK_RATE = 500.0  # req/s in ack_to_commit (--rate is the HTTP scenarios')
SAMPLE_RATE = 20.0  # of those, appends sent and followed into PostgreSQL by this process
VISIBLE_POLL_S = 0.002
VISIBLE_TIMEOUT_S = 60.0
CH_PROBES = 2
CH_POLL_S = 0.1  # each poll is a ClickHouse query in the sidecar
CH_TIMEOUT_S = 30.0
THREADS = 100
SAMPLE_THREADS = [f"ack-s{i}" for i in range(10)]
LOAD_THREADS = [f"ack-t{i}" for i in range(THREADS)]
PROBE_THREADS = [f"ack-ch{i}" for i in range(CH_PROBES)]


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


async def _sample_one(api: Client, watcher: Watcher, tid: str,
                      message: dict[str, Any]) -> float | None:
    """Append one message and hand it to the watcher: the append's ms, None on failure."""
    started = time.perf_counter()
    try:
        written = await api.append(tid, message["content"], role=message["role"],
                                   metadata=message["metadata"])
    except ClientError:
        return None
    acked = time.perf_counter()
    if written.status != 201:
        return None
    watcher.expect(written.doc["message_id"], acked)
    return (acked - started) * 1000


async def probe(api: Client, tid: str, until: float, out: list[float]) -> None:
    """Until `until`: append to `tid`, poll its /stats (ClickHouse) until it counts the
    message, record the seconds from the 201 (ms in `out`)."""
    count = await _stats_count(api, tid)
    while time.perf_counter() < until:
        try:
            await api.append(tid, "x", role="probe")
        except ClientError as e:
            raise harness.HarnessError(f"probe append to {tid}: {e}") from e
        acked, count = time.perf_counter(), count + 1
        while await _stats_count(api, tid) < count:
            if time.perf_counter() - acked > CH_TIMEOUT_S:
                raise harness.HarnessError(f"{tid}: message {count} not in ClickHouse after "
                                           f"{CH_TIMEOUT_S:g} s")
            await asyncio.sleep(CH_POLL_S)
        out.append((time.perf_counter() - acked) * 1000)


async def _stats_count(api: Client, tid: str) -> int:
    """Messages of `tid` that ClickHouse counts (0 before its first row arrives, or while
    it cannot answer: the probe polls again)."""
    try:
        return int((await api.thread_stats(tid))["messages"])
    except (NotFound, Unavailable):
        return 0


@dataclasses.dataclass
class Sampled:
    load: dict[str, Any]  # harness.run_load's result
    visible_ms: list[float]  # 201 -> visible in PostgreSQL, per sample
    append_ms: list[float]
    failed: int  # appends that failed
    invisible: int  # appended, but not visible in PostgreSQL after VISIBLE_TIMEOUT_S
    bench_cpu_pct: float  # this process while sampling (it is no server, nor the client)
    ch_ms: list[float]  # 201 -> counted by /stats (ClickHouse), per probe append


async def _sample(stack: Stack, spec: Spec, target: Target) -> Sampled:
    """Run the load (loadgen.py, in a thread) and sample appends during its window."""
    assert stack.sidecar is not None
    message = harness.message_body()
    # Connected now, before the load's CPU window: the backend then counts as postgres.
    conn = await asyncpg.connect(stack.postgres_url)
    try:
        watcher, sent = Watcher(conn), asyncio.Event()
        watching = asyncio.create_task(watcher.run(sent))
        # Each call sent once: a repeat would hide a failed append and add its backoff to
        # the append's ms; a failed status read fails the run, as before the client.
        async with target.client(retry=NO_RETRY) as api:
            load = asyncio.get_running_loop().run_in_executor(None, harness.run_load,
                                                              target, spec)
            await asyncio.sleep(spec.warmup_s + 0.3)  # loadgen's start-up and warm-up
            tasks, t_start, n, cpu_start = [], time.perf_counter(), 0, time.process_time()
            ch_ms: list[float] = []
            probes = [asyncio.create_task(probe(api, tid, t_start + spec.duration_s, ch_ms))
                      for tid in PROBE_THREADS]
            while (due := t_start + n / SAMPLE_RATE) < t_start + spec.duration_s:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tid = SAMPLE_THREADS[n % len(SAMPLE_THREADS)]
                tasks.append(asyncio.create_task(_sample_one(api, watcher, tid, message)))
                n += 1
            appends = await asyncio.gather(*tasks)
            await asyncio.gather(*probes)
            sent.set()
            await watching
            bench_pct = 100 * (time.process_time() - cpu_start) / (time.perf_counter() - t_start)
            result = await load
            await observe.wait_flushed(api)
    finally:
        await conn.close()
    ok = [a for a in appends if a is not None]
    return Sampled(result, watcher.visible_ms, ok, len(appends) - len(ok), watcher.timeouts,
                   round(bench_pct, 1), ch_ms)



def _hist_figures(before: str, after: str) -> Figures:
    out: Figures = {}
    name = "tierproxy_ack_to_commit_seconds"
    for sink in ("pg", "ch"):
        b = observe.histogram_buckets(before, name, sink)
        a = observe.histogram_buckets(after, name, sink)
        if not a:
            continue
        out[f"{sink}_hist_count"] = a.get(math.inf, 0.0) - b.get(math.inf, 0.0)
        for q in (0.50, 0.99):
            out[f"{sink}_hist_p{q * 100:.0f}_ms"] = observe.bucket_quantile(b, a, q) * 1000
    return out


def _quantiles(name: str, values: list[float]) -> Figures:
    ordered = sorted(values)
    return {f"{name}_samples": len(ordered), f"{name}_p50_ms": percentile(ordered, 0.50),
            f"{name}_p99_ms": percentile(ordered, 0.99),
            f"{name}_max_ms": ordered[-1] if ordered else 0.0}


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
    before = observe.fetch(stack.metrics_url)
    run = asyncio.run(_sample(stack, spec, sidecar))  # returns once all is flushed
    figures |= _hist_figures(before, observe.fetch(stack.metrics_url))
    result, failed = run.load, run.failed
    http_ms = sorted(run.append_ms)
    figures |= {
        "offered_rps": rate, "rps": result["rps"] + len(http_ms) / duration_s,
        "sidecar_requests": result["requests"] + len(http_ms) + failed,
        "invisible_errors": run.invisible,
        "sidecar_errors": result["errors"] + failed,
        "http_p50_ms": result["p50_ms"], "http_p99_ms": result["p99_ms"],
        "lag_p99_ms": result.get("lag_p99_ms", 0.0),
        **_quantiles("visible", run.visible_ms), **_quantiles("ch_visible", run.ch_ms),
        "sample_http_p50_ms": percentile(http_ms, 0.50),
    }
    cpu = dict(result["cpu_pct"])
    # This process's sampling and polling is CPU too: "bench", not "others".
    cpu["bench"] = run.bench_cpu_pct
    cpu["others"] = max(0.0, cpu.get("others", 0.0) - run.bench_cpu_pct)
    figures |= {f"cpu_{k}_pct": v for k, v in cpu.items()}
    return figures


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
        f"  pg visible to a reader (201 -> SELECT finds it)   {q('visible')}  max "
        f"{f['visible_max_ms']:.1f} ms  ({f['visible_samples']:.0f} samples, "
        f"{f['invisible_errors']:.0f} never seen)",
        f"  ch visible to a reader (201 -> /stats counts it) {q('ch_visible')}  max "
        f"{f['ch_visible_max_ms']:.1f} ms  ({f['ch_visible_samples']:.0f} samples, polled "
        f"every {CH_POLL_S * 1000:.0f} ms)",
    ]
    for sink in ("pg", "ch"):
        if f"{sink}_hist_p50_ms" in f:
            lines.append(f"  {sink}  histogram (in the sidecar, interpolated)     "
                         f"{q(f'{sink}_hist')}  ({f[f'{sink}_hist_count']:.0f} rows)")
    lines.append(f"  CPU % of a core: {cpu}")
    if f.get("cpu_others_pct", 0.0) > 20:
        lines.append(f"  WARNING: processes outside the bench used {f['cpu_others_pct']:.0f}% "
                     "of a core: the machine was busy, the figures are pessimistic")
    return lines


def setup_ack_to_commit(stack: Stack) -> None:
    assert stack.sidecar is not None
    asyncio.run(harness.prepare_threads(stack.sidecar,
                                        LOAD_THREADS + SAMPLE_THREADS + PROBE_THREADS))
