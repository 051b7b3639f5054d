"""WebSocket delivery latency: subscribers spread over two sidecars, writers on both.

    python loadtests/ws_latency.py                      (100 subscribers, 20 threads, 500 writes/s)
    python loadtests/ws_latency.py --subscribers 200 --rate 1000 --duration 20

Starts embedded Redis + PostgreSQL and two sidecar subprocesses (`python -m proxy serve`,
through harness.Stack), opens the WebSockets (half on each sidecar, round-robin over the
threads) and appends at a fixed rate, alternating sidecars. bench.py runs the same as its
`ws_delivery` scenario, on its own stack (`delivery`). Reported:

- `write_ms`: the appends' own latency (POST sent → 201 received);
- `write_to_push_ms`: POST sent → a subscriber receives the frame (client clock);
- `ack_to_push_ms`: 201 received by the writer → frame received by a subscriber (client
  clock; Redis answers the write and publishes in the same script, so this is the push path
  alone, and may be negative: the push can beat the HTTP answer);
- `ts_to_push_ms`: the event's `ts` (stamped by the sidecar just before the write script,
  whole ms) → frame received;
- `server_ack_to_sent_ms_bucket_bound`: the sidecars' `tierproxy_ws_delivery_seconds`
  histogram (`ts` → frame written to the socket), as the bound of the bucket holding p50/p99;

and whether every subscriber got every seq of its thread once and in order (the writes start
once every subscription is confirmed; a seq still missing 10 s after the last write counts
as out of order or missing).

Writes and subscriptions go through proxy.client. Each append is sent once (NO_RETRY): a
repeat would hide a failed write and add its backoff to `write_ms`. A subscription resumes
by itself after its socket ends (and the resume's backfill would fill the gap a dropped
socket leaves): every resume is counted in `resubscribed` and fails the run, and the
backfilled frames are no pushes (they carry no `ts`) so they are not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import harness
import observe
import orjson
from harness import Sidecar, Stack
from procs import TreeMeter

from proxy.client import NO_RETRY, Client, ClientError, Event, Subscription

SUBSCRIBE_TIMEOUT_S = 30.0
DELIVERY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Options:
    subscribers: int = 100
    threads: int = 20
    rate: float = 500.0
    duration_s: float = 10.0
    warmup_s: float = 2.0


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
    run: str = field(default_factory=lambda: f"{time.time_ns():x}")  # ids unique per run
    cpu_pct: dict[str, float] = field(default_factory=dict)  # each sidecar's tree, this client
    measuring: bool = False


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---- servers


def delivery_buckets(sidecars: Sequence[Sidecar]) -> dict[float, float]:
    """The cumulative delivery-latency buckets, summed over the sidecars."""
    total: dict[float, float] = {}
    for sidecar in sidecars:
        for le, count in observe.histogram_buckets(observe.fetch(sidecar.metrics_url),
                                                   "tierproxy_ws_delivery_seconds").items():
            total[le] = total.get(le, 0.0) + count
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
    """One subscription (its own socket) to one thread, checking the seqs it gets."""

    def __init__(self, api: Client, tid: str, tally: Tally) -> None:
        self.tid, self._tally = tid, tally
        self.sub: Subscription = api.subscribe(tid)
        self.last_seq = 0

    async def connect(self) -> None:
        """Returns once subscribed: from then on every write to the thread is pushed."""
        await self.sub.connect()
        self.last_seq = self.sub.positions[self.tid] or 0

    async def run(self) -> None:
        async for event in self.sub:
            self.on_event(event, time.perf_counter(), time.time())

    def on_event(self, ev: Event, now: float, wall: float) -> None:
        if ev.type != "message.created" or ev.seq is None or ev.message is None:
            return
        if ev.seq != self.last_seq + 1:
            self._tally.out_of_order += 1
        self.last_seq = ev.seq
        if self._tally.measuring and ev.ts_ms is not None:  # not a resume's backfill
            self._tally.pushes.append((ev.message["message_id"], now, wall, ev.ts_ms))

    @property
    def resubscribed(self) -> int:
        return max(0, self.sub.connects - 1)


async def write_at_rate(apis: Sequence[Client], tids: Sequence[str], rate: float, until: float,
                        tally: Tally) -> int:
    """Open loop: one append every 1/rate s, round-robin over threads and sidecars."""
    pending: set[asyncio.Task[None]] = set()
    targets = itertools.cycle([(api, t) for t in tids for api in apis])
    start, n = time.perf_counter(), 0
    while time.perf_counter() < until:
        api, tid = next(targets)
        mid = f"lt{tally.run}-{next(tally.ids)}"
        task = asyncio.create_task(timed_append(api, tid, mid, tally))
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
    await asyncio.gather(*pending)
    return n


async def timed_append(api: Client, tid: str, mid: str, tally: Tally) -> None:
    """One append, sent once; a failure is counted (and the first few kept), not raised."""
    tally.sent_at[mid] = time.perf_counter()
    try:
        written = await api.append(tid, "x" * 200, message_id=mid)
    except ClientError as e:
        tally.write_errors.append(str(e)[:200])
        return
    if written.status != 201:
        tally.write_errors.append(f"{written.status} {written.doc}"[:200])
        return
    tally.acked_at[mid] = time.perf_counter()
    if tally.measuring:
        tally.write_ms.append((tally.acked_at[mid] - tally.sent_at[mid]) * 1000)


def clients(sidecars: Sequence[Sidecar], token: str) -> list[Client]:
    """One client per sidecar, for its writes and subscriptions: appends sent once, no bound
    on connections (each subscription holds one)."""
    return [Client(s.url, token=token or None, retry=NO_RETRY, connections=0)
            for s in sidecars]


async def measure(o: Options, sidecars: Sequence[Sidecar], token: str) -> dict[str, Any]:
    tids = [f"wslat-{i}" for i in range(o.threads)]
    await harness.prepare_threads(harness.Target("sidecar", sidecars[0].url, {}, token), tids)
    tally = Tally()
    apis = clients(sidecars, token)
    subs = [Subscriber(apis[i % len(apis)], tids[i % o.threads], tally)
            for i in range(o.subscribers)]
    readers: list[asyncio.Task[None]] = []
    try:
        # Delivery to established subscriptions is what is measured: all of them first.
        await asyncio.wait_for(asyncio.gather(*(s.connect() for s in subs)),
                               SUBSCRIBE_TIMEOUT_S)
        readers = [asyncio.create_task(sub.run()) for sub in subs]
        written, before, after = await timed_writes(o, apis, sidecars, tids, tally)
        tally.out_of_order += await wait_delivered(subs, tids, apis[0])
    finally:
        for sub in subs:
            await sub.sub.close()
        await asyncio.gather(*readers, return_exceptions=True)
        for api in apis:
            await api.close()
    return report(o, tally, written, before, after, sum(s.resubscribed for s in subs))


async def timed_writes(o: Options, apis: Sequence[Client], sidecars: Sequence[Sidecar],
                       tids: Sequence[str],
                       tally: Tally) -> tuple[int, dict[float, float], dict[float, float]]:
    await write_at_rate(apis, tids, o.rate, time.perf_counter() + o.warmup_s, tally)
    before = await asyncio.to_thread(delivery_buckets, sidecars)
    meter = TreeMeter({s.name: s.pid for s in sidecars} | {"client": os.getpid()})
    meter.start()
    tally.measuring = True
    written = await write_at_rate(apis, tids, o.rate, time.perf_counter() + o.duration_s,
                                  tally)
    tally.measuring = False
    cpu = meter.stop()
    tally.cpu_pct = {k: v for k, v in cpu.items() if k != "machine"}
    after = await asyncio.to_thread(delivery_buckets, sidecars)
    return written, before, after


async def wait_delivered(subs: Sequence[Subscriber], tids: Sequence[str], api: Client) -> int:
    """Until every subscriber has its thread's last seq (or DELIVERY_TIMEOUT_S); returns
    how many seqs are still missing then (summed over the subscribers)."""
    last = {tid: int((await api.get_thread(tid)).doc["last_seq"]) for tid in tids}
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while any(s.last_seq < last[s.tid] for s in subs) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return sum(max(0, last[s.tid] - s.last_seq) for s in subs)


def report(o: Options, tally: Tally, written: int, before: dict[float, float],
           after: dict[float, float], resubscribed: int) -> dict[str, Any]:
    w2p = [(t - tally.sent_at[mid]) * 1000 for mid, t, _, _ in tally.pushes]
    a2p = [(t - tally.acked_at[mid]) * 1000 for mid, t, _, _ in tally.pushes
           if mid in tally.acked_at]
    ts2p = [wall * 1000 - ts for _, _, wall, ts in tally.pushes]
    return {
        "subscribers": o.subscribers, "threads": o.threads, "sidecars": 2,
        "cpu_pct_of_a_core": tally.cpu_pct,
        "load_average_1m": round(os.getloadavg()[0], 2), "cores": os.cpu_count(),
        "writes": written, "writes_per_s": round(written / o.duration_s, 1),
        "write_errors": len(tally.write_errors), "first_errors": tally.write_errors[:3],
        "frames_received": len(w2p), "out_of_order_or_missing": tally.out_of_order,
        "resubscribed": resubscribed,
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


def figures(result: dict[str, Any]) -> dict[str, float]:
    """report()'s numbers as flat bench figures: `ack_to_push_p99_ms`, `cpu_client_pct`..."""
    out: dict[str, float] = {"write_errors": result["write_errors"],
                             "order_errors": result["out_of_order_or_missing"],
                             "resubscribe_errors": result["resubscribed"]}
    for key, value in result.items():
        if key == "cpu_pct_of_a_core":
            out |= {f"cpu_{name}_pct": pct for name, pct in value.items()}
        elif isinstance(value, dict):
            stem = key.removesuffix("_bucket_bound").removesuffix("_ms")
            out |= {f"{stem}_{q}_ms": float(v) for q, v in value.items()}
        elif isinstance(value, int | float) and key not in (
                "write_errors", "out_of_order_or_missing", "resubscribed"):
            out[key] = float(value)
    return out


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=Options.subscribers)
    p.add_argument("--threads", type=int, default=Options.threads)
    p.add_argument("--rate", type=float, default=Options.rate, help="appends per second")
    p.add_argument("--duration", type=float, default=Options.duration_s, help="seconds")
    p.add_argument("--warmup", type=float, default=Options.warmup_s, help="seconds")
    a = p.parse_args(argv)
    return Options(a.subscribers, a.threads, a.rate, a.duration, a.warmup)


def delivery(stack: Stack, o: Options) -> dict[str, Any]:
    """The measurement on `stack`: its main sidecar and a second one started for it."""
    with stack.extra_sidecar("sidecar2") as second:
        return asyncio.run(measure(o, [stack.main_sidecar(), second], stack.token))


def main(argv: Sequence[str] | None = None) -> int:
    o = parse_args(argv)
    harness.stop_on_sigterm()
    with harness.temporary_stack(baselines=False) as stack:
        result = delivery(stack, o)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    ok = not (result["out_of_order_or_missing"] or result["write_errors"]
              or result["resubscribed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
