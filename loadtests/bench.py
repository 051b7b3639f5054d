"""tierproxy benchmark: the product's performance targets, measured against a bare baseline.

    make bench                                   (= python loadtests/bench.py)
    python loadtests/bench.py --duration 5 --only append --only append_fixed_rate
    python loadtests/bench.py --list

It starts embedded Redis + PostgreSQL under a temporary directory, a tierproxy sidecar (with
chDB in-process, as in the embedded default) and a bare aiohttp + uvloop server
(loadtests/bare_server.py), runs each scenario `--repetitions` times, prints a table of the
medians and writes everything to .bench/results.json. Before each run it waits until the
sidecar, Redis and PostgreSQL are idle, so flushing left over from one run does not slow the
next.

Each HTTP scenario sends the same requests, from the same client process (loadtests/loadgen.py)
at the same concurrency or rate, to the bare server and to the sidecar, so the ratio and the
added latency are what tierproxy costs on top of its HTTP stack. On a 2-core machine the
client, the server and Redis share the cores: the CPU columns (% of one core, per process,
during the measured window) show who was the limit, and "others" is CPU used by processes
the bench did not start (another job on the machine makes every figure pessimistic).
"us CPU/req" is the server process's CPU per answer, steadier than req/s on a busy machine.

Adding a scenario: write `def run(ctx: Context) -> Figures` (one repetition; figures are
named numbers) and `register(Scenario(...))` it, with `checks` for its targets. The runner
repeats it, takes the median of each figure (sums for *_requests and *_errors), prints and
stores it. Example: a PostgreSQL-flush scenario would use ctx.stack.redis_url/postgres_url and
return {"flush_rows_per_s": ..., "insert_rows_per_s": ..., "speedup": ...} with
Check("speedup", ">=", 20, "flush >= 20x one INSERT per row"): pg_flush, in
loadtests/flush_scenarios.py, does that.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import operator
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

import aiohttp
import flush_scenarios
import harness
import orjson
from harness import Stack, Target
from loadgen import Spec

Figures = dict[str, float]
DEFAULT_OUT = harness.REPO / ".bench" / "results.json"
TARGETS = ("bare", "sidecar")
SATURATED_P50_MS = 50.0  # open loop: a median this high means the server fell behind the rate
NOISY_PCT = 20.0  # CPU % of a core used by processes we did not start: a warning above it


@dataclass(frozen=True)
class Options:
    duration_s: float = 10.0
    warmup_s: float = 1.0
    repetitions: int = 3
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


@dataclass(frozen=True)
class Context:
    """What a scenario gets: the running servers and the options."""

    stack: Stack
    options: Options

    def target(self, name: str) -> Target:
        target = getattr(self.stack, name)
        if target is None:
            raise harness.HarnessError(f"target {name} is not running")
        return target  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Check:
    """A product target on one figure, e.g. Check("ratio", ">=", 0.5, "...")."""

    figure: str
    op: str  # ">=" or "<="
    limit: float
    label: str

    def passes(self, figures: Figures) -> bool:
        compare = operator.ge if self.op == ">=" else operator.le
        return self.figure in figures and bool(compare(figures[self.figure], self.limit))


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[Context], Figures]  # one repetition
    setup: Callable[[Context], None] | None = None  # once, before the repetitions
    checks: tuple[Check, ...] = ()
    report: Callable[[Figures], list[str]] | None = None  # table lines; default: key = value


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
    runs = []
    for i in range(ctx.options.repetitions):
        runs.append(scenario.run(ctx))
        _progress(f"{scenario.name}: repetition {i + 1}/{ctx.options.repetitions} done")
    median = combine(runs)
    checks = [{"label": c.label, "figure": c.figure, "op": c.op, "limit": c.limit,
               "value": median.get(c.figure), "pass": c.passes(median)}
              for c in scenario.checks]
    return {"summary": scenario.summary, "median": median, "runs": runs, "checks": checks,
            "seconds": round(time.monotonic() - started, 1)}


def _progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ---- HTTP scenarios: the same requests to the bare server and to the sidecar


@dataclass(frozen=True)
class Load:
    """The request a scenario sends, and how: closed loop at `concurrency`, or open at `rate`."""

    method: str
    path: str  # `{k}` becomes request_number % keys
    keys: int = 1
    body: dict[str, Any] | None = None
    mode: str = "closed"
    headers: dict[str, str] = field(default_factory=dict)

    def spec(self, options: Options) -> Spec:
        open_loop = self.mode == "open"
        return Spec(base_url="", method=self.method, path=self.path, keys=self.keys,
                    body=harness.json_text(self.body) if self.body is not None else None,
                    headers=self.headers, mode=self.mode,
                    concurrency=256 if open_loop else options.concurrency,
                    rate=options.rate, duration_s=options.duration_s,
                    warmup_s=options.warmup_s)


def measure(ctx: Context, load: Load) -> Figures:
    """One repetition: bare, then sidecar; per-target figures plus ratio and added latency."""
    figures: Figures = {}
    for name in TARGETS:
        settle_s = harness.settle(ctx.stack.server_pids)
        result = harness.run_load(ctx.target(name), load.spec(ctx.options))
        figures |= {f"{name}_{k}": v for k, v in _target_figures(name, result).items()}
        figures[f"{name}_settle_s"] = settle_s
    figures["ratio"] = figures["sidecar_rps"] / figures["bare_rps"] if figures["bare_rps"] else 0
    figures["cpu_ratio"] = (figures["bare_cpu_us_per_req"] /
                            max(figures["sidecar_cpu_us_per_req"], 1e-9))
    for q in ("p50", "p99"):
        figures[f"added_{q}_ms"] = figures[f"sidecar_{q}_ms"] - figures[f"bare_{q}_ms"]
    return figures


def _target_figures(name: str, result: dict[str, Any]) -> Figures:
    keep = ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "requests", "errors", "lag_p99_ms")
    out = {k: float(result[k]) for k in keep if k in result}
    out |= {f"cpu_{proc}_pct": pct for proc, pct in result["cpu_pct"].items()}
    # CPU of the server process per answer: less sensitive to a busy machine than req/s.
    out["cpu_us_per_req"] = result["cpu_pct"].get(name, 0.0) * 1e4 / max(result["rps"], 1e-9)
    return out


def http_report(figures: Figures) -> list[str]:
    lines = [f"  {'target':<8} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
             f"{'max ms':>7} {'reqs':>7} {'errors':>6} {'us CPU/req':>10}  CPU % of a core"]
    # reqs and errors are totals over the repetitions; everything else is a median.
    others = 0.0
    for name in TARGETS:
        f = {k.removeprefix(f"{name}_"): v for k, v in figures.items()
             if k.startswith(f"{name}_")}
        cpu = ", ".join(f"{k[4:-4]} {v:.0f}" for k, v in f.items()
                        if k.startswith("cpu_") and k.endswith("_pct"))
        others = max(others, f.get("cpu_others_pct", 0.0))
        lines.append(f"  {name:<8} {f['rps']:>8.0f} {f['p50_ms']:>7.2f} {f['p90_ms']:>7.2f} "
                     f"{f['p99_ms']:>7.2f} {f['max_ms']:>7.1f} {f['requests']:>7.0f} "
                     f"{f['errors']:>6.0f} {f['cpu_us_per_req']:>10.0f}  {cpu}")
    lines.append(f"  sidecar/bare throughput {figures['ratio']:.2f} (by server CPU per request "
                 f"{figures['cpu_ratio']:.2f}); added latency p50 "
                 f"{figures['added_p50_ms']:+.2f} ms, p99 {figures['added_p99_ms']:+.2f} ms")
    if others > NOISY_PCT:
        lines.append(f"  WARNING: processes outside the bench used up to {others:.0f}% of a core "
                     f"during these runs: the machine was busy, the figures are pessimistic")
    if "sidecar_lag_p99_ms" in figures:
        lag = max(figures["bare_lag_p99_ms"], figures["sidecar_lag_p99_ms"])
        lines.append(f"  client send lag p99 {lag:.2f} ms (open loop: how late the client "
                     f"fired; more than a few ms means it was short of CPU)")
        if figures["sidecar_p50_ms"] > SATURATED_P50_MS:
            lines.append("  the sidecar did not keep up with this rate: requests queued, so "
                         "these latencies are mostly queueing")
    return lines


BENCH_THREADS = [f"bench-t{i}" for i in range(100)]
PAGE_THREADS = [f"bench-p{i}" for i in range(20)]
PAGE_SIZE = 50


def _setup_threads(thread_ids: list[str], messages: int = 0) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        asyncio.run(harness.prepare_threads(ctx.target("sidecar"), thread_ids, messages))

    return setup


def http_scenario(name: str, summary: str, load: Load,
                  setup: Callable[[Context], None] | None = None,
                  checks: tuple[Check, ...] = ()) -> Scenario:
    return Scenario(name, summary, lambda ctx: measure(ctx, load), setup, checks, http_report)


register(http_scenario(
    "append", "POST /v1/threads/{tid}/messages over 100 threads, closed loop at --concurrency",
    Load("POST", "/v1/threads/bench-t{k}/messages", len(BENCH_THREADS), harness.message_body()),
    _setup_threads(BENCH_THREADS),
    (Check("ratio", ">=", 0.5, "append throughput >= 50% of bare aiohttp"),)))

register(http_scenario(
    "append_fixed_rate", "the same appends, open loop at --rate req/s",
    Load("POST", "/v1/threads/bench-t{k}/messages", len(BENCH_THREADS), harness.message_body(),
         mode="open"),
    _setup_threads(BENCH_THREADS),
    (Check("added_p99_ms", "<=", 1.5, "append p99 added over bare <= 1.5 ms at --rate"),)))

register(http_scenario(
    "page_read", f"GET /v1/threads/{{tid}}/messages?limit={PAGE_SIZE} over 20 full threads, "
    "closed loop (the bare server answers a small JSON, not a page)",
    Load("GET", f"/v1/threads/bench-p{{k}}/messages?limit={PAGE_SIZE}", len(PAGE_THREADS)),
    _setup_threads(PAGE_THREADS, PAGE_SIZE)))

register(http_scenario(
    "state_put", "PUT /v1/state/{key} over 1000 keys, closed loop",
    Load("PUT", "/v1/state/bench-k{k}", 1000, {"value": {"step": 3, "flags": ["a", "b"]}})))


# ---- PostgreSQL write-behind: flush throughput and ack -> commit (loadtests/flush_scenarios.py)


def _pg_flush(ctx: Context) -> Figures:
    return flush_scenarios.pg_flush(ctx.stack, ctx.options.duration_s)


def _ack_to_commit(ctx: Context) -> Figures:
    return flush_scenarios.ack_to_commit(ctx.stack, ctx.options.duration_s, ctx.options.warmup_s)


register(Scenario(
    "pg_flush", "PostgreSQL flush: one INSERT per row vs PostgresStore.upsert batches vs the "
    "flusher draining a backlog built while PostgreSQL was down",
    _pg_flush, checks=(Check("flowing_speedup", ">=", 20,
                             "flusher drain (once flowing) >= 20x one INSERT per row"),),
    report=flush_scenarios.pg_flush_report))

register(Scenario(
    "ack_to_commit", f"appends at {flush_scenarios.ACK_RATE:g} req/s open loop: acknowledgement "
    "to PostgreSQL commit, the sidecar's histogram and as seen by a reader",
    _ack_to_commit, lambda ctx: flush_scenarios.setup_ack_to_commit(ctx.stack),
    report=flush_scenarios.ack_to_commit_report))


# ---- command line


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    p.add_argument("--repetitions", type=int, default=3, help="runs per scenario (median)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop workers")
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop requests per second")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this scenario (repeatable)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    p.add_argument("--token", default="", help="run the sidecar with this API token")
    p.add_argument("--redis-url", default="", help="use this Redis instead of an embedded one")
    p.add_argument("--postgres-url", default="", help="use this PostgreSQL instead")
    p.add_argument("--clickhouse-url", default="",
                   help="use this ClickHouse instead of chDB inside the sidecar")
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
    return Options(a.duration, a.warmup, a.repetitions, a.concurrency, a.rate,
                   tuple(a.only), a.out, a.token, a.redis_url, a.postgres_url,
                   a.clickhouse_url, a.keep, a.strict)


def _meta(o: Options) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=harness.REPO, check=False).stdout.strip()

    # The measured code is the working tree: say when it differs from the commit.
    rev = git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                 "--", "proxy") else "")
    return {"started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git": rev, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "options": {k: str(v) if isinstance(v, Path) else v
                        for k, v in vars(o).items() if k != "token"}}


def render(doc: dict[str, Any]) -> str:
    o = doc["meta"]["options"]
    lines = [f"tierproxy bench @ {doc['meta']['git']} on {doc['meta']['cpus']} CPUs: "
             f"{o['repetitions']} x {o['duration_s']:g} s per target, concurrency "
             f"{o['concurrency']}, rate {o['rate']:g}/s; medians"]
    for name, res in doc["scenarios"].items():
        scenario = SCENARIOS[name]
        lines += ["", f"{name}: {res['summary']}"]
        report = scenario.report or (lambda f: [f"  {k} = {v:.4g}" for k, v in f.items()])
        lines += report(res["median"])
        lines += [f"  target: {c['label']}: {c['value'] or 0:.2f} {c['op']} {c['limit']:g} "
                  f"{'PASS' if c['pass'] else 'FAIL'}" for c in res["checks"]]
    return "\n".join(lines)


def run(o: Options) -> dict[str, Any]:
    """Start the stack, run the selected scenarios, write and return the results."""
    doc: dict[str, Any] = {"meta": _meta(o), "scenarios": {}}
    names = o.only or tuple(SCENARIOS)
    _progress("starting redis, postgresql, the sidecar and the bare server")
    with harness.temporary_stack(keep=o.keep, token=o.token, redis_url=o.redis_url,
                                 postgres_url=o.postgres_url,
                                 clickhouse_url=o.clickhouse_url) as stack:
        if o.keep:
            _progress(f"logs and data under {stack.root}")
        ctx = Context(stack, o)
        for name in names:
            doc["scenarios"][name] = run_scenario(SCENARIOS[name], ctx)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    o.out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    o = parse_args(argv)
    doc = run(o)
    print(render(doc))
    print(f"\nresults: {o.out}")
    missed = [c for r in doc["scenarios"].values() for c in r["checks"] if not c["pass"]]
    return 1 if o.strict and missed else 0


if __name__ == "__main__":
    harness.stop_on_sigterm()
    sys.exit(main())
