"""Where Redis spends its time per append: the commands and the scripts, at a fixed rate.

    python loadtests/redis_profile.py                      (1,000 appends/s for 8 s)
    python loadtests/redis_profile.py --rate 300 --duration 20

Starts embedded Redis + PostgreSQL and one sidecar (harness.Stack), creates the bench's 100
threads, then sends appends open loop at --rate until both sinks have flushed them. Redis's
statistics are reset just before: `INFO commandstats` gives every command's calls and time
(commands inside a script are counted twice: alone and in their EVALSHA), `SLOWLOG` with a 0 µs
threshold splits the EVALSHAs by script, and `INFO cpu` gives the process's CPU. Everything is
per acknowledged append. The slow log itself costs Redis a little; compare scripts with each
other, not with a run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import bench
import harness
import observe
import redis
from loadgen import Spec

from proxy import luascripts

SLOWLOG_LEN = 1_000_000


def measure(stack: harness.Stack, rate: float, duration_s: float) -> dict[str, Any]:
    target = stack.sidecar
    assert target is not None
    asyncio.run(harness.prepare_threads(target, bench.BENCH_THREADS))
    r = redis.Redis.from_url(stack.redis_url)
    try:
        time.sleep(1.0)  # the setup's flushes settle
        r.config_set("slowlog-log-slower-than", 0)
        r.config_set("slowlog-max-len", SLOWLOG_LEN)
        r.slowlog_reset()
        r.config_resetstat()
        cpu0 = _cpu_s(r)
        spec = Spec(base_url="", method="POST", path=bench.APPEND_PATH,
                    keys=len(bench.BENCH_THREADS), body=bench.APPEND,
                    id_prefix=f"rp-{time.time_ns():x}", mode="open", concurrency=256,
                    rate=rate, duration_s=duration_s, warmup_s=0.0)
        load = harness.run_load(target, spec)
        observe.flushed(target)
        cpu_s = _cpu_s(r) - cpu0
        commands = r.info("commandstats")
        log = r.slowlog_get(SLOWLOG_LEN)
    finally:
        r.close()
    appends = max(load["requests"] - load["errors"], 1)
    return {"appends": appends, "errors": load["errors"], "cpu_us": cpu_s * 1e6 / appends,
            "commands": commands, "scripts": _by_script(log), "logged": len(log)}


def _cpu_s(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def _by_script(log: list[dict[str, Any]]) -> dict[str, list[int]]:
    """{name: [calls, µs]} from the slow log: EVALSHAs by script, other commands by name."""
    names = {hashlib.sha1(src.encode()).hexdigest(): name
             for name, src in luascripts.scripts().items()}
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for entry in log:
        argv = entry["command"].split()
        name = argv[0].decode().lower()
        if name == "evalsha" and len(argv) > 1:
            name = f"{names.get(argv[1].decode(), argv[1].decode()[:12])}.lua"
        out[name][0] += 1
        out[name][1] += int(entry["duration"])
    return out


def report(got: dict[str, Any], top: int = 15) -> str:
    n = got["appends"]
    lines = [f"{n} appends ({got['errors']} errors); Redis CPU {got['cpu_us']:.0f} µs per append",
             "", f"{'command (commandstats)':<28} {'calls/append':>12} {'µs/append':>10} "
             f"{'µs/call':>8}"]
    stats = sorted(got["commands"].items(), key=lambda kv: -kv[1]["usec"])[:top]
    for name, st in stats:
        lines.append(f"{name.removeprefix('cmdstat_'):<28} {st['calls'] / n:>12.3f} "
                     f"{st['usec'] / n:>10.1f} {st['usec_per_call']:>8.1f}")
    lines += ["", f"{'script or command (slow log)':<28} {'calls/append':>12} {'µs/append':>10} "
              f"{'µs/call':>8}"]
    for name, (calls, us) in sorted(got["scripts"].items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{name:<28} {calls / n:>12.3f} {us / n:>10.1f} {us / calls:>8.1f}")
    if got["logged"] >= SLOWLOG_LEN:
        lines.append(f"(the slow log filled up at {SLOWLOG_LEN} entries: a shorter run counts all)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="appends per second")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load")
    o = p.parse_args(argv)
    with harness.temporary_stack(baselines=False) as stack:
        got = measure(stack, o.rate, o.duration)
    print(report(got))
    return 0 if got["errors"] == 0 else 1


if __name__ == "__main__":
    harness.stop_on_sigterm()
    sys.exit(main())
