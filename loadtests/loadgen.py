"""The load client: one process, aiohttp on uvloop, closed loop or open loop, per-request timing.

It runs in its own process so its CPU is not the server's (on a 2-core machine they still
share the cores: the harness reports both processes' CPU so a client-bound run is visible).
It sends pre-built requests on its own aiohttp session, not through proxy.client: the same
bytes to every target (the baselines are no tierproxy), each sent once and timed alone.

    python loadtests/loadgen.py '<spec as JSON>'        (see `Spec`; harness.run_load builds it)

Protocol on stdout, for the harness: the line `measuring` when the measured window opens
(after the warm-up), `done` when it closes, then one line of JSON with the result.

- closed: `concurrency` workers, each sends its next request when the previous one answered;
  a request counts when it completes inside the window. This finds the throughput ceiling.
- open: requests are fired at `rate` per second whatever the server does (no coordinated
  omission: a slow answer does not delay the next request); a request counts when it was due
  inside the window, and its latency runs from the time it was due (scheduled), not from when
  the client got round to sending it, as wrk2 does. `lag` is how late the client sent it: if
  that grows, the client, not the server, is the limit and the result says so.

A body holding `{n}` gets a unique id there in each request (`id_prefix` + the request
number): a message id the server must take as a new idempotency key every time.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop
from yarl import URL

_DRAIN_TIMEOUT_S = 30.0  # answers still missing this long after the window are errors


@dataclass(frozen=True)
class Spec:
    """One load run. `path` may contain `{k}`, replaced by request_number % keys."""

    base_url: str
    method: str
    path: str
    body: str | None = None  # sent as application/json; `{n}` becomes a unique id
    id_prefix: str = "id"  # unique ids are <id_prefix>-<request number>
    keys: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    mode: str = "closed"  # closed | open
    concurrency: int = 32  # closed: workers; open: connection pool bound
    rate: float = 1000.0  # open only, requests per second
    duration_s: float = 10.0
    warmup_s: float = 1.0


@dataclass
class Recorder:
    """Latencies (seconds) of the successful requests in the window, and the failures."""

    window: tuple[float, float] = (0.0, 0.0)
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def inside(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


class Client:
    def __init__(self, spec: Spec, session: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.session = session
        base = spec.base_url.rstrip("/")
        self.urls = [URL(base + spec.path.replace("{k}", str(k)), encoded=True)
                     for k in range(spec.keys)]
        self.body = spec.body.encode() if spec.body is not None else None
        self.unique = spec.body is not None and "{n}" in spec.body
        self.headers = {**spec.headers, **({"Content-Type": "application/json"} if self.body
                                           is not None else {})}

    def body_of(self, n: int) -> bytes | None:
        if self.unique:
            assert self.spec.body is not None
            return self.spec.body.replace("{n}", f"{self.spec.id_prefix}-{n}").encode()
        return self.body

    async def send(self, n: int) -> str | None:
        """One request; None when it succeeded, else what went wrong."""
        try:
            async with self.session.request(self.spec.method, self.urls[n % len(self.urls)],
                                            data=self.body_of(n), headers=self.headers) as resp:
                await resp.read()
                return None if resp.status < 400 else f"http {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return type(e).__name__

    async def timed(self, n: int, rec: Recorder, counts: Any, due: float | None = None) -> None:
        """One request, timed from `due` (open loop: when it was scheduled) or from now."""
        start = time.perf_counter() if due is None else due
        error = await self.send(n)
        end = time.perf_counter()
        if not counts(start, end):
            return
        if error is None:
            rec.latencies.append(end - start)
        else:
            rec.errors[error] += 1


async def closed_loop(client: Client, rec: Recorder) -> None:
    counter = iter(range(sys.maxsize))

    def counts(start: float, end: float) -> bool:
        return rec.inside(end)

    async def worker() -> None:
        while time.perf_counter() < rec.window[1]:
            await client.timed(next(counter), rec, counts)

    await asyncio.gather(*(worker() for _ in range(client.spec.concurrency)))


async def open_loop(client: Client, rec: Recorder, t0: float) -> None:
    interval = 1.0 / client.spec.rate
    tasks: set[asyncio.Task[None]] = set()
    n = 0

    def counts(start: float, end: float) -> bool:
        return rec.inside(start)

    while (due := t0 + n * interval) < rec.window[1]:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
            continue
        if rec.inside(due):
            rec.lags.append(now - due)
        task = asyncio.create_task(client.timed(n, rec, counts, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        _done, late = await asyncio.wait(tasks, timeout=_DRAIN_TIMEOUT_S)
        for task in late:
            task.cancel()
        rec.errors["no answer"] += len(late)


def summary(spec: Spec, rec: Recorder, cpu_s: float) -> dict[str, Any]:
    lat = sorted(rec.latencies)
    lags = sorted(rec.lags)
    errors = sum(rec.errors.values())
    ms = 1000.0
    out: dict[str, Any] = {
        "requests": len(lat) + errors, "ok": len(lat), "errors": errors,
        "error_kinds": dict(rec.errors), "duration_s": spec.duration_s,
        "rps": len(lat) / spec.duration_s,
        "p50_ms": percentile(lat, 0.50) * ms, "p90_ms": percentile(lat, 0.90) * ms,
        "p99_ms": percentile(lat, 0.99) * ms, "p999_ms": percentile(lat, 0.999) * ms,
        "max_ms": (lat[-1] if lat else 0.0) * ms,
        "mean_ms": (sum(lat) / len(lat) if lat else 0.0) * ms,
        "client_cpu_s": cpu_s,
    }
    if spec.mode == "open":
        out["offered_rps"] = spec.rate
        out["lag_p99_ms"] = percentile(lags, 0.99) * ms
        out["lag_max_ms"] = (lags[-1] if lags else 0.0) * ms
    return out


async def run(spec: Spec) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=spec.concurrency, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=_DRAIN_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(spec, session)
        t0 = time.perf_counter()
        rec = Recorder(window=(t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s))
        window = asyncio.create_task(_mark_window(rec))
        if spec.mode == "closed":
            await closed_loop(client, rec)
        else:
            await open_loop(client, rec, t0)
        cpu_s = await window
    return summary(spec, rec, cpu_s)


async def _mark_window(rec: Recorder) -> float:
    """Tell the harness when the window opens and closes (it samples the servers' CPU then);
    return this process's CPU seconds inside the window."""
    await asyncio.sleep(max(0.0, rec.window[0] - time.perf_counter()))
    print("measuring", flush=True)
    cpu_start = time.process_time()
    await asyncio.sleep(max(0.0, rec.window[1] - time.perf_counter()))
    cpu_s = time.process_time() - cpu_start
    print("done", flush=True)
    return cpu_s


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} '<spec JSON>'")
    spec = Spec(**orjson.loads(sys.argv[1]))
    if spec.mode not in ("closed", "open"):
        sys.exit(f"loadgen: mode must be closed or open, not {spec.mode!r}")
    uvloop.install()
    print(orjson.dumps(asyncio.run(run(spec))).decode(), flush=True)


if __name__ == "__main__":
    main()
