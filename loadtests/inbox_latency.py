"""Inbox page latency (GET /v1/threads?owner_id=) for an owner with many threads, warm and cold.

    python loadtests/inbox_latency.py                      (10,000 threads, embedded servers)
    python loadtests/inbox_latency.py --threads 2000 --limit 20

It starts embedded Redis + PostgreSQL and a sidecar (cache.ttl_s 120 s), creates `--threads`
threads for one owner and 1,000 and 100 for two others (a message each for every tenth), then
walks every page of each inbox with the cursor, one request at a time, timing each:

- warm: every thread still in Redis (its hash and index entry), once the setup's writes are
  flushed; the merge with PostgreSQL's rows answers from Redis's docs;
- cold: once every thread hash was flushed and expired from Redis; the first walk also drops
  the index entries left over (cold, first), the second reads PostgreSQL's index alone.

The cost of a page is bounded by shards x limit candidates whatever the owner's thread count;
an owner with more threads than that reaches the bound, so compare the large owner with the
1,000-thread one. Sequential requests: latency, not throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import asyncpg
import harness
import redis.asyncio as aioredis
from harness import Stack, Target

TTL_S = 120  # long enough that every thread is still in Redis for the warm walk


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inbox_latency.py", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=10_000, help="threads of the large owner")
    p.add_argument("--limit", type=int, default=50, help="page size")
    return p.parse_args(argv)


async def create(target: Target, owners: dict[str, int]) -> None:
    sem = asyncio.Semaphore(32)
    async with target.client(connections=32) as c:

        async def one(owner: str, i: int) -> None:
            async with sem:
                await c.put_thread(f"{owner}-t{i}", title=f"thread {i}", owner_id=owner)
                if i % 10 == 0:
                    await c.append(f"{owner}-t{i}", "hello", role="user")

        await asyncio.gather(*(one(o, i) for o, n in owners.items() for i in range(n)))


async def walk(target: Target, owner: str, limit: int) -> tuple[list[float], int, list[str]]:
    """Every page of the owner's inbox in order: each request's ms, threads seen, X-Tiers."""
    times: list[float] = []
    seen, tiers = 0, []
    query: dict[str, Any] = {"owner_id": owner, "limit": limit}
    async with aiohttp.ClientSession(f"{target.url}", headers=target.headers) as s:
        while True:
            started = time.perf_counter()
            async with s.get("/v1/threads", params=query) as resp:
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            times.append((time.perf_counter() - started) * 1000)
            seen += len(page["items"])
            tiers.append(resp.headers["X-Tier"])
            if page["next_cursor"] is None:
                return times, seen, tiers
            query["before"] = page["next_cursor"]


async def drained(target: Target) -> None:
    """Wait until the write-behind is idle (the flush and ClickHouse inserts of the setup
    share the cores with what is measured), twice in a row a monitor period apart."""
    quiet = 0
    async with aiohttp.ClientSession(target.url, headers=target.headers) as s:
        while quiet < 2:
            async with s.get("/v1/status") as resp:
                sinks = (await resp.json())["sinks"]
            quiet = quiet + 1 if all(v["backlog"] == 0 for v in sinks.values()) else 0
            await asyncio.sleep(2.0)


async def cold(redis_url: str) -> None:
    """Wait until every thread hash left Redis (flushed, then expired after the cache TTL)."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        while [k async for k in r.scan_iter(match="tp:{*}:t:*", count=1000)]:
            await asyncio.sleep(1.0)
    finally:
        await r.aclose()


async def plan(postgres_url: str) -> str:
    """How PostgreSQL answers a page below a cursor (it should be one range of threads_inbox)."""
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch(
            "EXPLAIN SELECT thread_id FROM threads WHERE owner_id = 'big' AND NOT deleted"
            " AND version > 0 AND (last_activity_at, thread_id) < (now(), 'x')"
            " ORDER BY last_activity_at DESC, thread_id DESC LIMIT 50")
        return " | ".join(r[0].strip() for r in rows[:3])
    finally:
        await conn.close()


def line(what: str, owner: str, threads: int, r: tuple[list[float], int, list[str]]) -> str:
    times, seen, tiers = r
    q = statistics.quantiles(times, n=100) if len(times) > 1 else times * 99
    return (f"{what:<12} {owner:<6} {threads:>6} threads  {len(times):>4} pages ({seen} "
            f"threads, X-Tier {', '.join(f'{t} {tiers.count(t)}' for t in sorted(set(tiers)))}"
            f"): p50 {statistics.median(times):6.2f} ms  "
            f"p99 {q[98]:6.2f} ms  first page {times[0]:6.2f} ms")


async def measure(stack: Stack, args: argparse.Namespace) -> list[str]:
    assert stack.sidecar is not None
    target, owners = stack.sidecar, {"big": args.threads, "mid": 1000, "small": 100}
    await create(target, owners)
    await drained(target)
    out = [f"postgres plan: {await plan(stack.postgres_url)}"]
    print(out[0], flush=True)
    for phase in ("warm", "cold, first", "cold"):
        if phase == "cold, first":
            await cold(stack.redis_url)
        for owner, n in owners.items():
            out.append(line(phase, owner, n, await walk(target, owner, args.limit)))
            print(out[-1], flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with harness.temporary_stack(baselines=False) as stack:
        stack.restart_sidecar({"TIERPROXY_CACHE_TTL_S": str(TTL_S)})
        asyncio.run(measure(stack, args))
        print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    harness.stop_on_sigterm()
    sys.exit(main())
