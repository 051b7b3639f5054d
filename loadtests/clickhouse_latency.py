"""ClickHouse streaming under a steady write load: rows/s inserted and ack→visible latency.

    python loadtests/clickhouse_latency.py                      (1,000 appends/s for 30 s)
    python loadtests/clickhouse_latency.py --rate 2000 --duration 60

Starts embedded Redis + PostgreSQL and a sidecar subprocess (default settings: ClickHouse
batches of up to clickhouse.max_batch rows every clickhouse.interval_ms, chDB under the run's
temporary directory), and measures three things:

1. ack→visible, end to end: a few probe clients append a message, then poll the thread's
   /v1/threads/{tid}/stats (answered from ClickHouse) until it counts that message.
2. ack→visible for every row of the load: once the sidecar is stopped, its chDB directory is
   opened here and `inserted_at - event_time` is read for each row (event_time is the change's
   time, taken just before its acknowledgement; inserted_at is set when ClickHouse writes it).
3. Insert capacity: ClickHouseSink.write of 10,000-row batches (row building + one columnar
   insert) into the same chDB, back to back: rows per second of inserting.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
import observe
import orjson
from harness import Stack, Target
from loadgen import Spec, percentile

from proxy.backends.clickhouse import ClickHouseSink, ClickHouseStore
from proxy.client import NO_RETRY, Client, ClientError, NotFound, Unavailable
from proxy.embedded import clickhouse_url
from proxy.failpoints import Failpoints
from proxy.model import Change

THREADS = 100
PROBES = 2
POLL_S = 0.05


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clickhouse_latency.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=1000.0, help="appends per second (open loop)")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before")
    p.add_argument("--batches", type=int, default=10, help="10k-row batches of the capacity run")
    return p.parse_args(argv)


# ---- 1. end-to-end probes through the API


async def probe(target: Target, n: int, until: float, out: list[float]) -> None:
    """Append, poll /stats until it counts the message, record the seconds from the 201.
    Each append is sent once: a failed one ends the run (a retry would hide it)."""
    tid = f"chlat-probe-{n}"
    async with target.client(retry=NO_RETRY) as api:
        await api.put_thread(tid, title="probe")
        count = 0
        while time.monotonic() < until:
            try:
                await api.append(tid, "x", role="probe")
            except ClientError as e:
                raise harness.HarnessError(f"probe append to {tid}: {e}") from e
            acked, count = time.monotonic(), count + 1
            while not await _counted(api, tid, count):
                await asyncio.sleep(POLL_S)
            out.append(time.monotonic() - acked)


async def _counted(api: Client, tid: str, count: int) -> bool:
    """Whether ClickHouse counts `count` messages of `tid` (not yet: no row of it, or
    ClickHouse cannot answer now)."""
    try:
        return int((await api.thread_stats(tid))["messages"]) >= count
    except (NotFound, Unavailable):
        return False


async def drained(target: Target, timeout_s: float = 60.0) -> None:
    """Wait for the ch group's backlog to be empty (all rows inserted)."""
    async with observe.status_client(target) as api:
        await observe.wait_status(api, lambda sinks: observe.backlog(sinks, "ch") == 0,
                                  "the ch backlog at 0", timeout_s)


async def load_and_probe(target: Target, a: argparse.Namespace) -> dict[str, Any]:
    threads = [f"chlat-{i}" for i in range(THREADS)]
    await harness.prepare_threads(target, threads)
    spec = Spec(base_url=target.url, method="POST", path="/v1/threads/chlat-{k}/messages",
                keys=THREADS, body=harness.json_text(harness.message_body()), mode="open",
                concurrency=64, rate=a.rate, duration_s=a.duration, warmup_s=a.warmup)
    started = time.time()
    load = asyncio.create_task(asyncio.to_thread(harness.run_load, target, spec))
    probes: list[float] = []
    until = time.monotonic() + a.warmup + a.duration
    await asyncio.sleep(a.warmup)
    await asyncio.gather(*(probe(target, n, until, probes) for n in range(PROBES)))
    result = await load
    await drained(target)
    return {"load": result, "probes": probes,
            "window_ms": ((started + a.warmup) * 1000, (started + a.warmup + a.duration) * 1000)}


# ---- 2. and 3. in the sidecar's chDB, once it is stopped


VISIBLE = """
SELECT count() AS rows, quantiles(0.5, 0.99)(lag) AS q, max(lag) AS worst
FROM (SELECT toUnixTimestamp64Milli(inserted_at) - toUnixTimestamp64Milli(event_time) AS lag
      FROM events FINAL
      WHERE startsWith(thread_id, 'chlat-') AND NOT startsWith(thread_id, 'chlat-probe')
        AND message_id != ''
        AND toUnixTimestamp64Milli(event_time) BETWEEN {lo:Int64} AND {hi:Int64})
"""


def entries(batch: int, size: int = 10_000) -> list[Change]:
    text = harness.message_body()["content"]
    out = []
    for i in range(size):
        mid = f"cap-{batch}-{i}"
        doc = {"seq": i + 1, "version": 1, "message_id": mid, "thread_id": f"cap-{i % 100}",
               "role": "user", "content": text, "metadata": {"source": "bench"},
               "created_at": "2026-01-01T00:00:00.000Z", "updated_at": "2026-01-01T00:00:00.000Z",
               "deleted": False}
        out.append(Change(0, f"{batch}-{i}", "m", mid, f"cap-{i % 100}", 1, "message.created",
                         0, orjson.dumps(doc)))
    return out


async def in_clickhouse(url: str, window_ms: tuple[float, float], batches: int) -> dict[str, Any]:
    store = ClickHouseStore(url)
    try:
        lo, hi = (int(t) for t in window_ms)
        seen = (await store.query(VISIBLE, {"lo": lo, "hi": hi}))[0]
        sink = ClickHouseSink(store, "bench", True, Failpoints(""))
        spent = 0.0
        for b in range(batches):
            batch = entries(b)
            t0 = time.perf_counter()
            await sink.write(batch)
            spent += time.perf_counter() - t0
        return {"rows": seen["rows"], "p50_ms": seen["q"][0], "p99_ms": seen["q"][1],
                "max_ms": seen["worst"], "capacity_rows_s": batches * 10_000 / spent}
    finally:
        await store.close()


def report(a: argparse.Namespace, run: dict[str, Any], ch: dict[str, Any]) -> str:
    load, probes = run["load"], run["probes"]
    return "\n".join([
        f"load: {load['rps']:.0f} appends/s offered for {a.duration:g} s (open loop), "
        f"append p99 {load['p99_ms']:.1f} ms, {load['errors']} errors; CPU (% of one core): "
        + ", ".join(f"{name} {v:.0f}%" for name, v in load["cpu_pct"].items()),
        f"rows inserted in the window: {ch['rows']} ({ch['rows'] / a.duration:.0f} rows/s)",
        f"ack→visible, every row (inserted_at - event_time): p50 {ch['p50_ms']:.0f} ms, "
        f"p99 {ch['p99_ms']:.0f} ms, max {ch['max_ms']:.0f} ms",
        f"ack→visible, {len(probes)} probes through /stats (poll {POLL_S * 1000:.0f} ms): "
        f"p50 {percentile(sorted(probes), 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(sorted(probes), 0.99) * 1000:.0f} ms",
        f"insert capacity (10k-row batches, row building + insert): "
        f"{ch['capacity_rows_s']:.0f} rows/s",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tierproxy-chlat-", ignore_cleanup_errors=True) as d:
        root = Path(d)
        with Stack(root, baselines=False) as stack:  # stopped on exit: chDB is one process per dir
            assert stack.sidecar is not None
            run = asyncio.run(load_and_probe(stack.sidecar, a))
        ch = asyncio.run(in_clickhouse(clickhouse_url(root), run["window_ms"], a.batches))
    print(report(a, run, ch))
    return 0 if run["load"]["errors"] == 0 else 1


if __name__ == "__main__":
    harness.stop_on_sigterm()
    sys.exit(main())
