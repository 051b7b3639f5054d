"""Reading a running sidecar from outside: its Prometheus metrics and its /v1/status.

Only the documented surface (metric names, the status document), so the bench measures any
process layout behind it: one process, or API processes and a background worker. The status
is read through proxy.client, each poll once (a failing read is an error, not retried).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import harness
from harness import Target

from proxy.client import NO_RETRY, Client

POLL_S = 0.05  # /v1/status
IDLE_TIMEOUT_S = 180.0
MONITOR_REFRESH_S = 1.5  # /v1/status is the monitor's last refresh (flush.trim_interval_s)

_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` in a Prometheus text exposition."""
    return [(dict(_LABEL.findall(labels)), float(value))
            for metric, labels, value in _SAMPLE.findall(text) if metric == name]


def counter_value(text: str, name: str, sink: str) -> float:
    return sum(v for labels, v in metric_samples(text, name) if labels.get("sink") == sink)


def histogram_buckets(text: str, name: str, sink: str | None = None) -> dict[float, float]:
    """Cumulative bucket counts by upper bound (+Inf included) of a histogram (one sink's,
    if `sink`), summed over the other labels."""
    out: dict[float, float] = {}
    for labels, v in metric_samples(text, f"{name}_bucket"):
        if "le" in labels and (sink is None or labels.get("sink") == sink):
            out[float(labels["le"])] = out.get(float(labels["le"]), 0.0) + v
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Quantile q of what was observed between two readings of cumulative buckets, linearly
    interpolated inside its bucket (Prometheus' histogram_quantile); nan if nothing was."""
    bounds = sorted(after)
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    if not cum or cum[-1] <= 0:
        return math.nan
    rank = q * cum[-1]
    low, low_cum = 0.0, 0.0
    for bound, count in zip(bounds, cum, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return low  # above the last finite bucket: its bound is all we know
            if count == low_cum:
                return bound
            return low + (bound - low) * (rank - low_cum) / (count - low_cum)
        low, low_cum = bound, count
    return low


def fetch(url: str) -> str:
    """GET a text page (the metrics) synchronously."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


async def get(http: aiohttp.ClientSession, url: str) -> bytes:
    """GET a page that is not the API's (the metrics, on their own port)."""
    async with http.get(url) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise harness.HarnessError(f"GET {url}: {resp.status} {body[:300]!r}")
        return body


def status_client(target: Target) -> Client:
    """The client the status polls go through: one read per poll, never repeated."""
    return target.client(retry=NO_RETRY)


async def sinks_status(api: Client) -> dict[str, Any]:
    """`sinks` of the sidecar's /v1/status: per sink backlog, lag_s, circuit, dead_letters."""
    sinks: dict[str, Any] = (await api.status())["sinks"]
    return sinks


def backlog(sinks: dict[str, Any], name: str) -> int:
    return int(sinks.get(name, {}).get("backlog", 0))


async def wait_status(api: Client, done: Callable[[dict[str, Any]], bool], what: str,
                      timeout_s: float = IDLE_TIMEOUT_S) -> float:
    """Poll /v1/status until `done(sinks)`; return the seconds waited."""
    started = time.monotonic()
    while not done(sinks := await sinks_status(api)):
        if time.monotonic() - started > timeout_s:
            raise harness.HarnessError(f"{what}: not reached in {timeout_s:g} s; sinks {sinks}")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started


async def wait_flushed(api: Client) -> None:
    """Until every sink has flushed everything. The status is the monitor's last refresh:
    wait out one refresh first, so it postdates our writes."""
    await asyncio.sleep(MONITOR_REFRESH_S)
    await wait_status(api, lambda s: all(backlog(s, n) == 0 for n in s),
                      "every sink's backlog at 0")


def flushed(target: Target) -> None:
    """wait_flushed, for synchronous callers."""
    async def wait() -> None:
        async with status_client(target) as api:
            await wait_flushed(api)

    asyncio.run(wait())
