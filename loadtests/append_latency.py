"""First look at append latency: p50/p99 of POST /v1/threads/{tid}/messages at N concurrent
clients (closed loop), against a running sidecar or one this script starts.

    python loadtests/append_latency.py --url http://127.0.0.1:8750      (a running sidecar)
    python loadtests/append_latency.py --start                          (its own, embedded)

With --url, the token comes from --token or TIERPROXY_API_TOKEN. The full harness, with a
bare-aiohttp baseline and repetitions, is bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

import harness
from harness import Target
from loadgen import Spec

THREADS = 100


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="append_latency.py", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8750", help="a running sidecar")
    where.add_argument("--start", action="store_true",
                       help="start embedded Redis + PostgreSQL and a sidecar, stop them after")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    p.add_argument("--token", default=os.environ.get("TIERPROXY_API_TOKEN", ""),
                   help="API token (default: $TIERPROXY_API_TOKEN)")
    return p.parse_args(argv)


def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    threads = [f"latency-t{i}" for i in range(THREADS)]
    asyncio.run(harness.prepare_threads(target, threads))
    spec = Spec(base_url=target.url, method="POST", path="/v1/threads/latency-t{k}/messages",
                keys=THREADS, body=harness.json_text(harness.message_body()),
                concurrency=args.concurrency, duration_s=args.duration, warmup_s=args.warmup)
    return harness.run_load(target, spec)


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    cpu = ", ".join(f"{name} {pct:.0f}%" for name, pct in r["cpu_pct"].items())
    return (f"append at {args.concurrency} concurrent clients for {args.duration:g} s: "
            f"{r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, "
            f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.1f} ms; {r['requests']} requests, "
            f"{r['errors']} errors {r['error_kinds'] or ''}\nCPU (% of one core): {cpu}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.start:
        with harness.temporary_stack(token=args.token, baselines=False) as stack:
            assert stack.sidecar is not None
            result = measure(stack.sidecar, args)
    else:
        target = Target("sidecar", args.url.rstrip("/"), {}, args.token)
        result = measure(target, args)
    print(report(result, args))
    return result


if __name__ == "__main__":
    harness.stop_on_sigterm()
    sys.exit(0 if main()["errors"] == 0 else 1)
