"""Ephemeral event latency: a publisher on one sidecar, a subscriber on another.

    python loadtests/ephemeral_latency.py                  (20 threads, 400 events/s, 10 s)
    python loadtests/ephemeral_latency.py --threads 50 --rate 1000 --duration 20

Starts embedded Redis + PostgreSQL and two sidecar subprocesses (harness.Stack), subscribes to
every thread on sidecar A (one socket, proxy.client) and publishes `POST /v1/threads/{tid}/
events` on sidecar B at a fixed rate, round-robin over the threads (each thread stays under the
default ephemeral.rate_per_s, 50/s, at the default figures). Reported: `publish_ms` (POST sent
→ 202), `publish_to_push_ms` (POST sent → the subscriber has the frame, one client clock),
and how many events never arrived (`missing`, counted 5 s after the last publish) or were
refused (`refused`). Each publish is sent once (NO_RETRY).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

import harness
import orjson
from harness import Sidecar

from proxy.client import NO_RETRY, Client, ClientError, Subscription

SETTLE_S = 5.0


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def receive(sub: Subscription, sent: dict[int, float], pushed: dict[int, float]) -> None:
    async for event in sub:
        if event.type == "ephemeral" and event.ephemeral is not None:
            i = event.ephemeral["data"]["i"]
            pushed[i] = (time.perf_counter() - sent[i]) * 1000


async def measure(a: Sidecar, b: Sidecar, threads: int, rate: float,
                  duration_s: float) -> dict[str, Any]:
    tids = [f"eph-{n}" for n in range(threads)]
    sent: dict[int, float] = {}
    pushed: dict[int, float] = {}
    publish_ms: list[float] = []
    refused: list[str] = []
    async with Client(a.url, retry=NO_RETRY) as ca, Client(b.url, retry=NO_RETRY) as cb:
        for tid in tids:
            await cb.put_thread(tid)
        async with ca.subscribe(*tids) as sub:
            receiver = asyncio.ensure_future(receive(sub, sent, pushed))
            start, total = time.perf_counter(), int(rate * duration_s)
            for i in range(total):
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                sent[i] = time.perf_counter()
                try:
                    await cb.publish_event(tids[i % threads], "reply.delta", {"i": i})
                    publish_ms.append((time.perf_counter() - sent[i]) * 1000)
                except ClientError as e:
                    refused.append(str(e))
            deadline = time.perf_counter() + SETTLE_S
            while len(pushed) < len(publish_ms) and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
    latencies = list(pushed.values())
    return {"threads": threads, "events": len(sent), "per_s": rate, "sidecars": 2,
            "refused": len(refused), "first_refusals": refused[:3],
            "missing": len(publish_ms) - len(pushed),
            "publish_ms": {"p50": round(percentile(publish_ms, 0.5), 3),
                           "p99": round(percentile(publish_ms, 0.99), 3)},
            "publish_to_push_ms": {"p50": round(percentile(latencies, 0.5), 3),
                                   "p99": round(percentile(latencies, 0.99), 3),
                                   "max": round(max(latencies, default=float("nan")), 3)}}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=20)
    p.add_argument("--rate", type=float, default=400.0, help="events per second, all threads")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    a = p.parse_args(argv)
    harness.stop_on_sigterm()
    with harness.temporary_stack(baselines=False) as stack, \
            stack.extra_sidecar("sidecar2") as second:
        result = asyncio.run(measure(stack.main_sidecar(), second, a.threads, a.rate,
                                     a.duration))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0 if not (result["missing"] or result["refused"]) else 1


if __name__ == "__main__":
    sys.exit(main())
