"""WebSocket delivery latency: subscribers spread over two sidecars, writers on both.

    python loadtests/ws_latency.py                      (100 subscribers, 20 threads, 500 writes/s)
    python loadtests/ws_latency.py --subscribers 200 --rate 1000 --duration 20

Starts embedded Redis + PostgreSQL and two sidecar subprocesses (`python -m proxy serve`,
through harness.Service), opens the WebSockets (half on each sidecar, round-robin over the
threads) and appends at a fixed rate, alternating sidecars. Reported:

- `write_ms`: the appends' own latency (POST sent → 201 received);
- `write_to_push_ms`: POST sent → a subscriber receives the frame (client clock);
- `ack_to_push_ms`: 201 received by the writer → frame received by a subscriber (client
  clock; Redis answers the write and publishes in the same script, so this is the push path
  alone, and may be negative: the push can beat the HTTP answer);
- `ts_to_push_ms`: the event's `ts` (stamped by the sidecar just before the write script,
  whole ms) → frame received;
- `server_ack_to_sent_ms_bucket_bound`: the sidecars' `tierproxy_ws_delivery_seconds`
  histogram (`ts` → frame written to the socket), as the bound of the bucket holding p50/p99;

and whether every subscriber got every seq of its thread once and in order.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import harness
import orjson
import psutil

from proxy.embedded import PostgresServer, RedisServer, clickhouse_url, free_port

_BUCKET = re.compile(r'^tierproxy_ws_delivery_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)


@dataclass(frozen=True)
class Options:
    subscribers: int = 100
    threads: int = 20
    rate: float = 500.0
    duration_s: float = 10.0
    warmup_s: float = 2.0


@dataclass
class Sidecar:
    url: str
    metrics_url: str
    pid: int


@dataclass
class Tally:
    """What the subscribers saw, during the measured window only."""

    pushes: list[tuple[str, float, float, int]] = field(default_factory=list)  # mid, t, wall, ts
    sent_at: dict[str, float] = field(default_factory=dict)  # perf_counter at POST start
    acked_at: dict[str, float] = field(default_factory=dict)  # perf_counter at the 201
    out_of_order: int = 0
    write_errors: list[str] = field(default_factory=list)
    write_ms: list[float] = field(default_factory=list)
    ids: Iterator[int] = field(default_factory=itertools.count)
    cpu_pct: list[float] = field(default_factory=list)  # sidecar 1, sidecar 2, this client
    measuring: bool = False


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---- servers


def start_sidecar(exit_stack: ExitStack, root: Path, name: str, redis_url: str,
                  postgres_url: str) -> Sidecar:
    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPROXY_")}
    env.update(TIERPROXY_REDIS_URL=redis_url, TIERPROXY_POSTGRES_URL=postgres_url,
               TIERPROXY_CLICKHOUSE_URL=clickhouse_url(root / name), TIERPROXY_LOG_LEVEL="warning")
    argv = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--metrics-port",
            str(metrics_port), "--data-dir", str(root / name)]
    service = harness.Service(name, argv, root / f"{name}.log", f"{url}/readyz", env)
    service.start()
    exit_stack.callback(service.stop)
    return Sidecar(url, f"http://127.0.0.1:{metrics_port}/metrics", service.pid)


def start_servers(exit_stack: ExitStack, root: Path) -> list[Sidecar]:
    redis = RedisServer(root / "redis")
    redis.start()
    exit_stack.callback(redis.stop)
    postgres = PostgresServer(root / "postgres")
    postgres.start()
    exit_stack.callback(postgres.stop)
    return [start_sidecar(exit_stack, root, f"sidecar{i}", redis.url, postgres.url)
            for i in (1, 2)]


def delivery_buckets(sidecars: Sequence[Sidecar]) -> dict[float, float]:
    """The cumulative delivery-latency buckets, summed over the sidecars."""
    total: dict[float, float] = {}
    for sidecar in sidecars:
        with urllib.request.urlopen(sidecar.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        for le, count in _BUCKET.findall(text):
            total[float(le)] = total.get(float(le), 0.0) + float(count)
    return total


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound (ms) of the bucket holding quantile q of what was observed in between."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * counts[-1]:
            return bound * 1000
    return float("inf")


# ---- the load


class Subscriber:
    def __init__(self, tid: str, sent_at: dict[str, float], tally: Tally) -> None:
        self.tid, self._sent_at, self._tally = tid, sent_at, tally
        self.last_seq = 0

    async def run(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await ws.send_str(orjson.dumps({"op": "subscribe", "thread_id": self.tid}).decode())
        async for msg in ws:
            self.on_frame(orjson.loads(msg.data), time.perf_counter(), time.time())

    def on_frame(self, ev: dict[str, Any], now: float, wall: float) -> None:
        if ev["type"] == "subscribed":
            self.last_seq = ev["last_seq"]
        if ev["type"] != "message.created":
            return
        if ev["seq"] != self.last_seq + 1:
            self._tally.out_of_order += 1
        self.last_seq = ev["seq"]
        if self._tally.measuring:
            self._tally.pushes.append((ev["message"]["message_id"], now, wall, ev["ts"]))


async def write_at_rate(session: aiohttp.ClientSession, sidecars: Sequence[Sidecar],
                        tids: Sequence[str], rate: float, until: float,
                        sent_at: dict[str, float], tally: Tally) -> int:
    """Open loop: one append every 1/rate s, round-robin over threads and sidecars."""
    pending: set[asyncio.Task[None]] = set()
    targets = itertools.cycle([(s, t) for t in tids for s in sidecars])
    start, n = time.perf_counter(), 0
    while time.perf_counter() < until:
        sidecar, tid = next(targets)
        mid = f"lt{next(tally.ids)}"
        task = asyncio.create_task(append(session, sidecar, tid, mid, sent_at, tally))
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
    await asyncio.gather(*pending)
    return n


async def append(session: aiohttp.ClientSession, sidecar: Sidecar, tid: str, mid: str,
                 sent_at: dict[str, float], tally: Tally) -> None:
    """One append; a failure is counted (and the first few kept), not raised."""
    body = {"message_id": mid, "role": "user", "content": "x" * 200}
    sent_at[mid] = time.perf_counter()
    try:
        async with session.post(f"{sidecar.url}/v1/threads/{tid}/messages", json=body) as resp:
            if resp.status != 201:
                tally.write_errors.append(f"{resp.status} {(await resp.text())[:200]}")
            else:
                tally.acked_at[mid] = time.perf_counter()
                if tally.measuring:
                    tally.write_ms.append((tally.acked_at[mid] - sent_at[mid]) * 1000)
    except aiohttp.ClientError as e:
        tally.write_errors.append(repr(e))


async def measure(o: Options, sidecars: Sequence[Sidecar]) -> dict[str, Any]:
    tids = [f"wslat-{i}" for i in range(o.threads)]
    await harness.prepare_threads(harness.Target("sidecar", sidecars[0].url, {}), tids)
    tally = Tally()
    sent_at = tally.sent_at
    subs = [Subscriber(tids[i % o.threads], sent_at, tally) for i in range(o.subscribers)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        sockets = [await session.ws_connect(f"{sidecars[i % 2].url}/v1/ws")
                   for i in range(o.subscribers)]
        readers = [asyncio.create_task(sub.run(ws)) for sub, ws in zip(subs, sockets, strict=True)]
        try:
            written, before, after = await timed_writes(o, session, sidecars, tids, sent_at, tally)
            await wait_delivered(subs, tids, sidecars, session)
        finally:
            for ws in sockets:
                await ws.close()
            await asyncio.gather(*readers, return_exceptions=True)
    return report(o, tally, written, before, after)


async def timed_writes(o: Options, session: aiohttp.ClientSession, sidecars: Sequence[Sidecar],
                       tids: Sequence[str], sent_at: dict[str, float],
                       tally: Tally) -> tuple[int, dict[float, float], dict[float, float]]:
    await write_at_rate(session, sidecars, tids, o.rate, time.perf_counter() + o.warmup_s,
                        sent_at, tally)
    before = await asyncio.to_thread(delivery_buckets, sidecars)
    cpu = [psutil.Process(s.pid) for s in sidecars] + [psutil.Process()]
    cpu_before = [p.cpu_times() for p in cpu]
    tally.measuring = True
    written = await write_at_rate(session, sidecars, tids, o.rate,
                                  time.perf_counter() + o.duration_s, sent_at, tally)
    tally.measuring = False
    tally.cpu_pct = [round(100 * (a.user + a.system - b.user - b.system) / o.duration_s, 1)
                     for a, b in zip((p.cpu_times() for p in cpu), cpu_before, strict=True)]
    after = await asyncio.to_thread(delivery_buckets, sidecars)
    return written, before, after


async def wait_delivered(subs: Sequence[Subscriber], tids: Sequence[str],
                         sidecars: Sequence[Sidecar], session: aiohttp.ClientSession) -> None:
    """Until every subscriber has its thread's last seq (or 10 s)."""
    last = {}
    for tid in tids:
        async with session.get(f"{sidecars[0].url}/v1/threads/{tid}") as resp:
            last[tid] = (await resp.json())["last_seq"]
    deadline = time.monotonic() + 10
    while any(s.last_seq < last[s.tid] for s in subs) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def report(o: Options, tally: Tally, written: int, before: dict[float, float],
           after: dict[float, float]) -> dict[str, Any]:
    w2p = [(t - tally.sent_at[mid]) * 1000 for mid, t, _, _ in tally.pushes]
    a2p = [(t - tally.acked_at[mid]) * 1000 for mid, t, _, _ in tally.pushes
           if mid in tally.acked_at]
    ts2p = [wall * 1000 - ts for _, _, wall, ts in tally.pushes]
    return {
        "subscribers": o.subscribers, "threads": o.threads, "sidecars": 2,
        "cpu_pct_of_a_core": dict(zip(("sidecar1", "sidecar2", "client"), tally.cpu_pct,
                                      strict=False)),
        "load_average_1m": round(os.getloadavg()[0], 2), "cores": os.cpu_count(),
        "writes": written, "writes_per_s": round(written / o.duration_s, 1),
        "write_errors": len(tally.write_errors), "first_errors": tally.write_errors[:3],
        "frames_received": len(w2p), "out_of_order_or_missing": tally.out_of_order,
        "write_ms": {"p50": round(percentile(tally.write_ms, 0.5), 3),
                     "p99": round(percentile(tally.write_ms, 0.99), 3)},
        "write_to_push_ms": {"p50": round(percentile(w2p, 0.5), 3),
                             "p99": round(percentile(w2p, 0.99), 3),
                             "max": round(max(w2p, default=float("nan")), 3)},
        "ack_to_push_ms": {"p50": round(percentile(a2p, 0.5), 3),
                           "p99": round(percentile(a2p, 0.99), 3)},
        "ts_to_push_ms": {"p50": round(percentile(ts2p, 0.5), 3),
                          "p99": round(percentile(ts2p, 0.99), 3)},
        "server_ack_to_sent_ms_bucket_bound": {"p50": bucket_quantile(before, after, 0.5),
                                               "p99": bucket_quantile(before, after, 0.99)},
    }


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=Options.subscribers)
    p.add_argument("--threads", type=int, default=Options.threads)
    p.add_argument("--rate", type=float, default=Options.rate, help="appends per second")
    p.add_argument("--duration", type=float, default=Options.duration_s, help="seconds")
    p.add_argument("--warmup", type=float, default=Options.warmup_s, help="seconds")
    a = p.parse_args(argv)
    return Options(a.subscribers, a.threads, a.rate, a.duration, a.warmup)


def main(argv: Sequence[str] | None = None) -> int:
    o = parse_args(argv)
    harness.stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="tierproxy-ws-", ignore_cleanup_errors=True) as tmp, \
            ExitStack() as exit_stack:
        sidecars = start_servers(exit_stack, Path(tmp))
        result = asyncio.run(measure(o, sidecars))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    ok = result["out_of_order_or_missing"] == 0 and result["write_errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
