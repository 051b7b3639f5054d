"""tierproxy benchmark: the product's performance targets, each against a baseline of the same run.

    make bench                                   (= python loadtests/bench.py)
    python loadtests/bench.py --duration 5 --only append --only append_fixed_rate
    python loadtests/bench.py --list

It starts embedded Redis + PostgreSQL under a temporary directory, a tierproxy sidecar (with
chDB in-process, as in the embedded default) and the baselines: a bare aiohttp + uvloop
server (loadtests/bare_server.py, the ceiling) and the old way (loadtests/oldway_server.py:
each append one synchronous PostgreSQL transaction) on the local PostgreSQL and on one that
takes 20 ms per transaction. It runs each scenario `--repetitions` times, prints each one's
details and then one Markdown table of the headline figures (value, baseline, ratio, target,
pass/fail), and writes .bench/results.md (the table) and .bench/results.json (everything).
Before each run it waits until the sidecar, Redis and PostgreSQL are idle, so flushing left
over from one run does not slow the next.

Throughput is measured with wrk (saturation at --concurrency connections, a client far
cheaper than the server); latency with loadgen.py at fixed rates, open loop, from each
request's scheduled send time (a slow answer does not delay the next request). Every target
gets the same requests from the same client. On a 2-core machine the client, the server and
Redis share the cores: the CPU columns (% of one core, per process tree, during the measured
window) show who was the limit, and "others" is CPU used by processes the bench did not
start (another job on the machine makes every figure pessimistic). "us CPU/req" is the
server's CPU per answer (every process of its tree), steadier than req/s on a busy machine.

Adding a scenario: write `def run(ctx: Context) -> Figures` (one repetition; figures are
named numbers) and `register(Scenario(...))` it, with `checks` for its targets and `table`
for its rows in the results table. The runner repeats it, takes the median of each figure
(sums for *_requests and *_errors), prints and stores it. Example: pg_flush, in
loadtests/flush_scenarios.py, returns {"drain_rows_per_s": ..., "insert_rows_per_s": ...,
"drain_speedup": ...} with Check("drain_speedup", ">=", 20, "flush >= 20x one INSERT per row").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ack_latency
import aiohttp
import flush_scenarios
import harness
import observe
import orjson
import table
import wrkload
import ws_latency
from harness import Stack, Target
from loadgen import Spec
from procs import TreeMeter
from table import Check, Line
from wrkload import WrkSpec

Figures = dict[str, float]
DEFAULT_OUT = harness.REPO / ".bench" / "results.json"
SATURATED_P50_MS = 50.0  # open loop: a median this high means the server fell behind the rate
NOISY_PCT = 20.0  # CPU % of a core used by processes we did not start: a warning above it
SLOW_PG_RATE = 300.0  # appends/s against the old way on the 20 ms PostgreSQL
HALF = 0.5  # the second fixed rate: this share of the sidecar's saturation throughput


@dataclass(frozen=True)
class Options:
    duration_s: float = 5.0
    warmup_s: float = 1.0
    repetitions: int = 1
    concurrency: int = 32
    rate: float = 1000.0
    only: tuple[str, ...] = ()
    out: Path = DEFAULT_OUT
    token: str = ""
    redis_url: str = ""
    postgres_url: str = ""
    clickhouse_url: str = ""
    keep: bool = False
    strict: bool = False
    backlog: int = flush_scenarios.BACKLOG


@dataclass(frozen=True)
class Context:
    """What a scenario gets: the running servers, the options, and the medians of the
    scenarios run before it (the fixed-rate scenarios read the saturation throughput)."""

    stack: Stack
    options: Options
    results: dict[str, Figures] = field(default_factory=dict)

    def target(self, name: str) -> Target:
        target = getattr(self.stack, name)
        if target is None:
            raise harness.HarnessError(f"target {name} is not running")
        return target  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[Context], Figures]  # one repetition
    setup: Callable[[Context], None] | None = None  # once, before the repetitions
    checks: tuple[Check, ...] = ()
    report: Callable[[Figures], list[str]] | None = None  # detail lines; default: key = value
    table: Callable[[Figures], list[Line]] | None = None  # rows of the results table
    max_repetitions: int | None = None  # a long scenario runs at most this often


SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    if scenario.name in SCENARIOS:
        raise ValueError(f"scenario {scenario.name!r} registered twice")
    SCENARIOS[scenario.name] = scenario
    return scenario


# ---- the runner


def combine(runs: Sequence[Figures]) -> Figures:
    """Median of each figure over the repetitions; totals for counts of requests and errors."""
    out: Figures = {}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        total = key.endswith(("_requests", "_errors"))
        out[key] = sum(values) if total else statistics.median(values)
    return out


def run_scenario(scenario: Scenario, ctx: Context) -> dict[str, Any]:
    started = time.monotonic()
    if scenario.setup:
        scenario.setup(ctx)
    repetitions = min(ctx.options.repetitions, scenario.max_repetitions or sys.maxsize)
    runs = []
    for i in range(repetitions):
        runs.append(scenario.run(ctx))
        _progress(f"{scenario.name}: repetition {i + 1}/{repetitions} done")
    median = combine(runs)
    ctx.results[scenario.name] = median
    checks = [{"label": c.label, "figure": c.figure, "op": c.op, "limit": c.limit,
               "value": median.get(c.figure), "pass": c.passes(median)}
              for c in scenario.checks]
    return {"summary": scenario.summary, "median": median, "runs": runs, "checks": checks,
            "seconds": round(time.monotonic() - started, 1)}


def _progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ---- HTTP scenarios: the same requests to the baseline(s) and to the sidecar

Runner = Callable[[Target], dict[str, Any]]  # one measured run against a target


def measure(ctx: Context, run: Runner, targets: Sequence[str], prefix: str = "") -> Figures:
    """Each target in turn, once the servers are idle; figures named <prefix><target>_..."""
    figures: Figures = {}
    for name in targets:
        settle_s = harness.settle(ctx.stack.server_pids)
        result = run(ctx.target(name))
        figures |= {f"{prefix}{name}_{k}": v for k, v in _target_figures(name, result).items()}
        figures[f"{prefix}{name}_settle_s"] = settle_s
    return figures


def _target_figures(name: str, result: dict[str, Any]) -> Figures:
    keep = ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "requests", "errors",
            "lag_p99_ms")
    out = {k: float(result[k]) for k in keep if k in result}
    out |= {f"cpu_{proc}_pct": pct for proc, pct in result["cpu_pct"].items()}
    answers = max(result["rps"] * result.get("duration_s", 1.0), 1.0)
    # CPU of the server per answer: less sensitive to a busy machine than req/s. `all`: the
    # server's tree and the databases it uses (the sidecar's Redis and PostgreSQL work).
    out["cpu_us_per_req"] = result["cpu_s"].get(name, 0.0) * 1e6 / answers
    out["all_us_per_req"] = sum(result["cpu_s"].values()) * 1e6 / answers
    return out


def _ratios(f: Figures, prefix: str, over: str, base: str) -> Figures:
    """Throughput ratio and added latency of target `over` against target `base`."""
    out = {f"{prefix}ratio": f[f"{prefix}{over}_rps"] / max(f[f"{prefix}{base}_rps"], 1e-9)}
    for q in ("p50", "p99", "p999"):
        if f"{prefix}{over}_{q}_ms" in f:
            out[f"{prefix}added_{q}_ms"] = f[f"{prefix}{over}_{q}_ms"] - f[f"{prefix}{base}_{q}_ms"]
    return out


def http_report(figures: Figures, targets: Sequence[str], prefix: str = "") -> list[str]:
    """One line per target measured under `prefix`."""
    lines = [f"  {'target':<12} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} "
             f"{'max ms':>7} {'reqs':>7} {'errors':>6} {'us CPU/req':>10}  CPU % of a core"]
    others = 0.0
    for name in targets:
        f = {k.removeprefix(f"{prefix}{name}_"): v for k, v in figures.items()
             if k.startswith(f"{prefix}{name}_")}
        cpu = ", ".join(f"{k[4:-4]} {v:.0f}" for k, v in f.items()
                        if k.startswith("cpu_") and k.endswith("_pct"))
        others = max(others, f.get("cpu_others_pct", 0.0))
        lines.append(f"  {name:<12} {f['rps']:>8.0f} {f['p50_ms']:>7.2f} {f['p99_ms']:>7.2f} "
                     f"{f.get('p999_ms', 0.0):>8.2f} {f['max_ms']:>7.1f} {f['requests']:>7.0f} "
                     f"{f['errors']:>6.0f} {f['cpu_us_per_req']:>10.0f}  {cpu}")
        if f.get("lag_p99_ms", 0.0) > 2.0:
            lines.append(f"  {'':<12} the client sent requests up to {f['lag_p99_ms']:.1f} ms "
                         "late (p99): short of CPU, so these latencies are pessimistic")
        if "lag_p99_ms" in f and f["p50_ms"] > SATURATED_P50_MS:
            lines.append(f"  {'':<12} did not keep up with this rate: requests queued, so "
                         "these latencies are mostly queueing")
    if others > NOISY_PCT:
        lines.append(f"  WARNING: processes outside the bench used up to {others:.0f}% of a core "
                     f"during these runs: the machine was busy, the figures are pessimistic")
    return lines


def _report(*targets: str) -> Callable[[Figures], list[str]]:
    return lambda f: http_report(f, targets)


BENCH_THREADS = [f"bench-t{i}" for i in range(100)]
PAGE_THREADS = [f"bench-p{i}" for i in range(20)]
PAGE_SIZE = 50
APPEND = harness.json_text({"message_id": "{n}", **harness.message_body()})  # unique ids
APPEND_PATH = "/v1/threads/bench-t{k}/messages"
PAGE_PATH = f"/v1/threads/bench-p{{k}}/messages?limit={PAGE_SIZE}"


def _setup_threads(thread_ids: list[str], messages: int = 0,
                   targets: Sequence[str] = ("sidecar",)) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        for name in targets:
            asyncio.run(harness.prepare_threads(ctx.target(name), thread_ids, messages))

    return setup


def _wrk(ctx: Context, method: str, path: str, keys: int, body: str = "") -> Runner:
    o = ctx.options
    spec = WrkSpec(method, path, keys, body, o.concurrency, duration_s=o.duration_s,
                   warmup_s=o.warmup_s)
    return lambda target: wrkload.run_wrk(target, spec)


def _open_loop(ctx: Context, method: str, path: str, keys: int, rate: float,
               body: str | None = None) -> Runner:
    o = ctx.options

    def run(target: Target) -> dict[str, Any]:
        spec = Spec(base_url="", method=method, path=path, keys=keys, body=body,
                    id_prefix=f"{target.name}-{time.time_ns():x}", mode="open",
                    concurrency=256, rate=rate, duration_s=o.duration_s, warmup_s=o.warmup_s)
        return harness.run_load(target, spec)

    return run


# -- saturation (wrk)

OLDWAYS = ("oldway", "oldway_slow")


def _append(ctx: Context) -> Figures:
    f = measure(ctx, _wrk(ctx, "POST", APPEND_PATH, len(BENCH_THREADS), APPEND),
                ("bare", "sidecar", *OLDWAYS))
    f |= _ratios(f, "", "sidecar", "bare")
    for old in OLDWAYS:
        f[f"{old}_ratio"] = f["sidecar_rps"] / max(f[f"{old}_rps"], 1e-9)
    return f


def _append_table(f: Figures) -> list[Line]:
    return [
        Line("append throughput (wrk)", "sidecar_rps", "req/s", "bare_rps", "ceiling", "ratio"),
        Line("append throughput vs the old way", "sidecar_rps", "req/s", "oldway_rps",
             "old way, local PostgreSQL", "oldway_ratio"),
        Line("append throughput vs the old way, 20 ms PostgreSQL", "sidecar_rps", "req/s",
             "oldway_slow_rps", "old way, 20 ms PostgreSQL", "oldway_slow_ratio"),
        Line("append CPU per answer at saturation, sidecar processes", "sidecar_cpu_us_per_req",
             "µs", "bare_cpu_us_per_req", "ceiling"),
    ]


register(Scenario(
    "append", "POST /v1/threads/{tid}/messages (unique message ids) over 100 threads, wrk at "
    "--concurrency connections: bare aiohttp, sidecar, old way local and on a 20 ms PostgreSQL",
    _append, _setup_threads(BENCH_THREADS, targets=("sidecar", *OLDWAYS)),
    (Check("ratio", ">=", 0.5, "append throughput >= 50% of bare aiohttp"),
     Check("oldway_ratio", ">=", 2.0, "append throughput >= 2x the old way on local PostgreSQL")),
    _report("bare", "sidecar", *OLDWAYS), _append_table))


def _page_read(ctx: Context) -> Figures:
    f = measure(ctx, _wrk(ctx, "GET", PAGE_PATH, len(PAGE_THREADS)), ("bare", "sidecar"))
    return f | _ratios(f, "", "sidecar", "bare")


register(Scenario(
    "page_read", f"GET /v1/threads/{{tid}}/messages?limit={PAGE_SIZE} over 20 full threads, "
    "wrk (the bare server answers a small JSON, not a page)",
    _page_read, _setup_threads(PAGE_THREADS, PAGE_SIZE),
    (Check("ratio", ">=", 0.5, "page read throughput >= 50% of bare aiohttp"),),
    _report("bare", "sidecar"),
    lambda f: [Line(f"page read throughput ({PAGE_SIZE} messages, wrk)", "sidecar_rps", "req/s",
                    "bare_rps", "ceiling", "ratio")]))


def _state_put(ctx: Context) -> Figures:
    body = harness.json_text({"value": {"step": 3, "flags": ["a", "b"]}})
    f = measure(ctx, _wrk(ctx, "PUT", "/v1/state/bench-k{k}", 1000, body), ("bare", "sidecar"))
    return f | _ratios(f, "", "sidecar", "bare")


register(Scenario(
    "state_put", "PUT /v1/state/{key} over 1000 keys, wrk", _state_put,
    report=_report("bare", "sidecar"),
    table=lambda f: [Line("state put throughput (wrk)", "sidecar_rps", "req/s", "bare_rps",
                          "ceiling", "ratio")]))


# -- fixed rates (loadgen, open loop)


def _saturation(ctx: Context, scenario: str, path: str, keys: int, body: str) -> float:
    """The sidecar's saturation throughput from `scenario` in this run, else measured now."""
    if scenario in ctx.results:
        return ctx.results[scenario]["sidecar_rps"]
    o = ctx.options
    spec = WrkSpec("POST" if body else "GET", path, keys, body, o.concurrency,
                   duration_s=min(o.duration_s, 3.0), warmup_s=0.5)
    return float(wrkload.run_wrk(ctx.target("sidecar"), spec)["rps"])


def _fixed_rates(ctx: Context, scenario: str, method: str, path: str, keys: int,
                 body: str | None) -> Figures:
    """At --rate and at HALF of the sidecar's saturation: bare, then sidecar."""
    half = HALF * _saturation(ctx, scenario, path, keys, body or "")
    f: Figures = {"rate": ctx.options.rate, "half_rate": half}
    for prefix, rate in (("rate_", ctx.options.rate), ("half_", half)):
        f |= measure(ctx, _open_loop(ctx, method, path, keys, rate, body), ("bare", "sidecar"),
                     prefix)
        f |= _ratios(f, prefix, "sidecar", "bare")
    return f


def _fixed_report(f: Figures) -> list[str]:
    lines = []
    for prefix, rate in (("rate_", f["rate"]), ("half_", f["half_rate"])):
        lines.append(f"  at {rate:,.0f} req/s:")
        lines += http_report(f, ("bare", "sidecar"), prefix)
    return lines



def _fixed_table(what: str) -> Callable[[Figures], list[Line]]:
    def lines(f: Figures) -> list[Line]:
        out = []
        for prefix, rate in (("rate_", f["rate"]), ("half_", f["half_rate"])):
            for q, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
                out.append(Line(f"{what} {label} at {rate:,.0f}/s", f"{prefix}sidecar_{q}_ms",
                                "ms", f"{prefix}bare_{q}_ms", "ceiling",
                                f"{prefix}added_{q}_ms", "ms"))
        return out

    return lines


register(Scenario(
    "append_fixed_rate", "the same appends, open loop at --rate and at 50% of the sidecar's "
    "saturation (from `append`), latency from the scheduled send time",
    lambda ctx: _fixed_rates(ctx, "append", "POST", APPEND_PATH, len(BENCH_THREADS), APPEND),
    _setup_threads(BENCH_THREADS),
    (Check("rate_added_p99_ms", "<=", 1.5, "append p99 added over bare <= 1.5 ms at --rate"),),
    _fixed_report, _fixed_table("append")))

register(Scenario(
    "page_fixed_rate", "the same page reads, open loop at --rate and at 50% of the sidecar's "
    "saturation (from `page_read`)",
    lambda ctx: _fixed_rates(ctx, "page_read", "GET", PAGE_PATH, len(PAGE_THREADS), None),
    _setup_threads(PAGE_THREADS, PAGE_SIZE), report=_fixed_report,
    table=_fixed_table("page read")))


def _append_slow_pg(ctx: Context) -> Figures:
    run = _open_loop(ctx, "POST", APPEND_PATH, len(BENCH_THREADS), SLOW_PG_RATE, APPEND)
    f = measure(ctx, run, ("oldway_slow", "sidecar"))
    for q in ("p50", "p99"):
        f[f"{q}_below"] = f[f"oldway_slow_{q}_ms"] / max(f[f"sidecar_{q}_ms"], 1e-9)
    return f


register(Scenario(
    "append_slow_pg", f"appends open loop at {SLOW_PG_RATE:g}/s: the old way on a PostgreSQL "
    f"taking {harness.SLOW_PG_MS} ms per transaction, then the sidecar",
    _append_slow_pg, _setup_threads(BENCH_THREADS, targets=("sidecar", "oldway_slow")),
    (Check("p99_below", ">=", 10.0, f"append p99 at {SLOW_PG_RATE:g}/s >= 10x below the old "
           f"way on a {harness.SLOW_PG_MS} ms PostgreSQL"),),
    _report("oldway_slow", "sidecar"), lambda f: [
        Line(f"append {q} at {SLOW_PG_RATE:g}/s vs a {harness.SLOW_PG_MS} ms PostgreSQL",
             f"sidecar_{q}_ms", "ms", f"oldway_slow_{q}_ms", "old way", f"{q}_below")
        for q in ("p50", "p99")]))


# ---- write-behind: flush throughput, ack -> PostgreSQL / ClickHouse


register(Scenario(
    "pg_flush", f"PostgreSQL flush: the flusher draining a backlog of --backlog entries "
    f"({flush_scenarios.BACKLOG:,}; written with the flushers paused) vs one INSERT per row, "
    "COPY for scale",
    lambda ctx: flush_scenarios.pg_flush(ctx.stack, ctx.options.duration_s,
                                         ctx.options.concurrency, ctx.options.backlog),
    checks=(Check("drain_speedup", ">=", 20, "flusher drain >= 20x one INSERT per row"),),
    report=flush_scenarios.pg_flush_report, max_repetitions=1,
    table=lambda f: [
        Line(f"flush rows/s draining a {f['drain_rows']:,.0f}-entry backlog", "drain_rows_per_s",
             "rows/s", "insert_rows_per_s", "one INSERT per row", "drain_speedup"),
        Line("flush rows/s, best 1 s", "peak_rows_per_s", "rows/s", "insert_rows_per_s",
             "one INSERT per row", "peak_speedup"),
        Line("ClickHouse rows/s draining the same backlog meanwhile", "ch_drain_rows_per_s",
             "rows/s", "copy_rows_per_s", "PostgreSQL COPY"),
        Line("acknowledged appends missing in PostgreSQL after the drain", "missing_errors"),
    ]))

register(Scenario(
    "ack_to_commit", f"appends at {ack_latency.ACK_RATE:g} req/s open loop: acknowledgement "
    "to visible in PostgreSQL and in ClickHouse, as seen by a reader and by the sidecar",
    lambda ctx: ack_latency.ack_to_commit(ctx.stack, ctx.options.duration_s,
                                          ctx.options.warmup_s),
    lambda ctx: ack_latency.setup_ack_to_commit(ctx.stack),
    (Check("visible_p99_ms", "<=", 250, "ack -> PostgreSQL p99 <= 250 ms"),
     Check("ch_visible_p99_ms", "<=", 2000, "ack -> ClickHouse p99 <= 2 s")),
    ack_latency.ack_to_commit_report,
    lambda f: [
        Line(f"ack → PostgreSQL {q} at {ack_latency.ACK_RATE:g}/s (reader)", f"visible_{q}_ms",
             "ms") for q in ("p50", "p99")] + [
        Line(f"ack → ClickHouse {q} at {ack_latency.ACK_RATE:g}/s (reader, /stats)",
             f"ch_visible_{q}_ms", "ms") for q in ("p50", "p99")] + [
        Line(f"ack → {name} p99, sidecar histogram", f"{sink}_hist_p99_ms", "ms")
        for sink, name in (("pg", "PostgreSQL"), ("ch", "ClickHouse"))
        if f"{sink}_hist_p99_ms" in f]))


# ---- WebSocket delivery


def _ws_delivery(ctx: Context) -> Figures:
    o = ws_latency.Options(duration_s=ctx.options.duration_s, warmup_s=ctx.options.warmup_s)
    harness.settle(ctx.stack.server_pids)
    return ws_latency.figures(ws_latency.delivery(ctx.stack, o))


def _ws_report(f: Figures) -> list[str]:
    cpu = ", ".join(f"{k[4:-4]} {v:.0f}" for k, v in f.items()
                    if k.startswith("cpu_") and k.endswith("_pct"))
    return [f"  {f['subscribers']:.0f} subscribers on 2 sidecars, {f['writes_per_s']:.0f} "
            f"appends/s, {f['frames_received']:.0f} frames, {f['write_errors']:.0f} write "
            f"errors, {f['order_errors']:.0f} out of order or missing, "
            f"{f['resubscribe_errors']:.0f} subscriptions resumed",
            f"  ack -> push p50 {f['ack_to_push_p50_ms']:.2f} ms, p99 "
            f"{f['ack_to_push_p99_ms']:.2f} ms; write -> push p50 "
            f"{f['write_to_push_p50_ms']:.2f} ms, p99 {f['write_to_push_p99_ms']:.2f} ms; "
            f"sidecar ts -> push p99 {f['ts_to_push_p99_ms']:.2f} ms; sidecars' histogram p99 "
            f"<= {f['server_ack_to_sent_p99_ms']:.1f} ms",
            f"  CPU % of a core: {cpu}"]


register(Scenario(
    "ws_delivery", "WebSocket push: 100 subscribers over the sidecar and a second one, "
    "appends at 500/s on both; acknowledgement (201 at the writer) -> frame at a subscriber",
    _ws_delivery, checks=(Check("ack_to_push_p99_ms", "<=", 5.0,
                                "WebSocket delivery p99 <= 5 ms"),),
    report=_ws_report, table=lambda f: [
        Line(f"WebSocket delivery {q} (ack → frame, {f['subscribers']:.0f} subscribers, "
             "2 sidecars)", f"ack_to_push_{q}_ms", "ms") for q in ("p50", "p99")]))


# ---- what an append costs: CPU over every sidecar process, flush included; memory


def _append_cpu(ctx: Context) -> Figures:
    """Appends at --rate with no warm-up, CPU counted from the first request until the
    sidecar has flushed everything to both sinks: every cost of those appends."""
    target, o = ctx.target("sidecar"), ctx.options
    f: Figures = {"settle_s": harness.settle(ctx.stack.server_pids)}
    idle = TreeMeter(target.cpu_pids)
    idle.start()
    time.sleep(1.0)
    idle.stop()
    spec = Spec(base_url="", method="POST", path=APPEND_PATH, keys=len(BENCH_THREADS),
                body=APPEND, id_prefix=f"cpu-{time.time_ns():x}", mode="open", concurrency=256,
                rate=o.rate, duration_s=o.duration_s, warmup_s=0.0)
    meter = TreeMeter(target.cpu_pids)
    meter.start()
    result = harness.run_load(target, spec)
    observe.flushed(target)
    meter.stop()
    appends = max(result["requests"] - result["errors"], 1)
    f |= {"appends": appends, "sidecar_errors": result["errors"], "seconds": meter.wall_s}
    for tree, seconds in meter.cpu_s.items():
        f[f"{tree}_us_per_append"] = seconds * 1e6 / appends
        idle_s = idle.cpu_s.get(tree, 0.0) / idle.wall_s * meter.wall_s
        f[f"{tree}_net_us_per_append"] = (seconds - idle_s) * 1e6 / appends
    return f


register(Scenario(
    "append_cpu", "appends at --rate, CPU of every sidecar process (its whole tree, re-read "
    "as children come and go) from the first request until both sinks have flushed them",
    _append_cpu, _setup_threads(BENCH_THREADS),
    (Check("sidecar_us_per_append", "<=", 120, "<= 120 us CPU per append over all sidecar "
           "processes, flush included"),),
    table=lambda f: [
        Line("CPU per append, all sidecar processes, flush included", "sidecar_us_per_append",
             "µs"),
        Line("CPU per append, all sidecar processes, net of their idle work",
             "sidecar_net_us_per_append", "µs"),
        Line("CPU per append in Redis", "redis_us_per_append", "µs"),
        Line("CPU per append in PostgreSQL", "postgres_us_per_append", "µs"),
    ]))


def _memory(ctx: Context) -> Figures:
    f = ctx.stack.memory.by_role()
    api = [v for k, v in f.items() if k in ("rss_mb_api", "rss_mb_all-in-one")]
    f["api_rss_mb"] = max(api) if api else float("nan")
    return f


register(Scenario(
    "memory", "largest RSS of each sidecar process over the whole run so far, by role "
    "(--role on its command line, else API = listening on the API port)",
    _memory, checks=(Check("api_rss_mb", "<=", 80, "API process RSS <= 80 MB"),),
    table=lambda f: [
        Line(f"RSS, {k.removeprefix('rss_mb_')} process (largest of "
             f"{f['processes_' + k.removeprefix('rss_mb_')]:.0f})", k, "MB")
        for k in f if k.startswith("rss_mb_")] + [
        Line("RSS, API process (largest)", "api_rss_mb", "MB")]))


# ---- command line


def parse_args(argv: Sequence[str] | None) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=d.duration_s, help="measured s per run")
    p.add_argument("--warmup", type=float, default=d.warmup_s, help="unmeasured s before each")
    p.add_argument("--repetitions", type=int, default=d.repetitions,
                   help="runs per scenario (median; pg_flush runs once)")
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="connections of the saturation runs (wrk)")
    p.add_argument("--rate", type=float, default=d.rate, help="open-loop requests per second")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this scenario (repeatable)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results JSON file (the table goes beside it, .md)")
    p.add_argument("--token", default="", help="run the sidecar with this API token")
    p.add_argument("--redis-url", default="", help="use this Redis instead of an embedded one")
    p.add_argument("--postgres-url", default="", help="use this PostgreSQL instead")
    p.add_argument("--clickhouse-url", default="",
                   help="use this ClickHouse instead of chDB inside the sidecar")
    p.add_argument("--backlog", type=int, default=d.backlog,
                   help="entries of the backlog pg_flush drains")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    a = p.parse_args(argv)
    if a.list:
        for s in SCENARIOS.values():
            print(f"{s.name:<20} {s.summary}")
        sys.exit(0)
    unknown = [n for n in a.only if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
    if a.duration <= 0 or a.repetitions < 1 or a.concurrency < 1 or a.rate <= 0:
        p.error("--duration, --rate must be > 0; --repetitions, --concurrency >= 1")
    if a.backlog < 1000:
        p.error("--backlog must be at least 1000")
    return Options(a.duration, a.warmup, a.repetitions, a.concurrency, a.rate,
                   tuple(a.only), a.out, a.token, a.redis_url, a.postgres_url,
                   a.clickhouse_url, a.keep, a.strict, a.backlog)


def _meta(o: Options) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=harness.REPO, check=False).stdout.strip()

    # The measured code is the working tree: say when it differs from the commit.
    rev = git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                 "--", "proxy") else "")
    return {"started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git": rev, "machine": table.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "options": {k: str(v) if isinstance(v, Path) else v
                        for k, v in vars(o).items() if k != "token"}}


def _others_max(doc: dict[str, Any]) -> float:
    """The most CPU (% of a core) processes outside the bench took in any measurement."""
    return max((v for res in doc["scenarios"].values() for k, v in res["median"].items()
                if k.endswith("cpu_others_pct")), default=0.0)


def render(doc: dict[str, Any]) -> str:
    """Each scenario's details."""
    lines = [table.describe(doc["meta"])]
    for name, res in doc["scenarios"].items():
        scenario = SCENARIOS[name]
        lines += ["", f"{name}: {res['summary']} ({res['seconds']:.0f} s)"]
        report = scenario.report or (lambda f: [f"  {k} = {v:.4g}" for k, v in f.items()])
        lines += report(res["median"])
        lines += [f"  target: {c['label']}: {c['value'] or 0:.2f} {c['op']} {c['limit']:g} "
                  f"{'PASS' if c['pass'] else 'FAIL'}" for c in res["checks"]]
    return "\n".join(lines)


def results_table(doc: dict[str, Any]) -> str:
    """The one table: every scenario's rows, in the order they ran."""
    rows = []
    for name, res in doc["scenarios"].items():
        scenario = SCENARIOS[name]
        for line in scenario.table(res["median"]) if scenario.table else []:
            rows.append(table.row(name, line, res["median"], scenario.checks))
    return table.markdown(rows)


def run(o: Options) -> dict[str, Any]:
    """Start the stack, run the selected scenarios, write and return the results."""
    started = time.monotonic()
    doc: dict[str, Any] = {"meta": _meta(o), "scenarios": {}}
    names = o.only or tuple(SCENARIOS)
    _progress("starting redis, postgresql, the sidecar and the baselines")
    with harness.temporary_stack(keep=o.keep, token=o.token, redis_url=o.redis_url,
                                 postgres_url=o.postgres_url,
                                 clickhouse_url=o.clickhouse_url) as stack:
        if o.keep:
            _progress(f"logs and data under {stack.root}")
        ctx = Context(stack, o)
        for name in names:
            doc["scenarios"][name] = run_scenario(SCENARIOS[name], ctx)
    doc["meta"] |= {"seconds": time.monotonic() - started, "others_max_pct": _others_max(doc),
                    "load_average_end": os.getloadavg()[0]}
    doc["table"] = results_table(doc)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    o.out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    o.out.with_suffix(".md").write_text(f"{table.describe(doc['meta'])}\n\n{doc['table']}\n")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    o = parse_args(argv)
    doc = run(o)
    print(render(doc))
    print(f"\n{doc['table']}\n")
    print(f"results: {o.out} and {o.out.with_suffix('.md')}")
    missed = [c for r in doc["scenarios"].values() for c in r["checks"] if not c["pass"]]
    return 1 if o.strict and missed else 0


if __name__ == "__main__":
    harness.stop_on_sigterm()
    sys.exit(main())
