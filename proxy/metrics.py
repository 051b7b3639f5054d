"""Every Prometheus metric, defined once. Units in the names; labels bounded (never an id).

With `tierproxy serve` running several processes, prometheus-client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor for its children) adds up counters and
histograms of all processes; each gauge says how its processes combine. Requests are counted
in plain dicts and folded into the Prometheus metrics once a second (RequestStats): a labelled
Prometheus update per request costs more than the rest of the request's bookkeeping.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from prometheus_client import Counter, Gauge, Histogram

_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter("tierproxy_http_requests_total", "HTTP requests answered",
                        ["route", "method", "status"])
HTTP_SECONDS = Histogram("tierproxy_http_request_seconds", "HTTP request latency",
                         ["route", "method"], buckets=_FAST)

FLUSH_BATCH = Histogram("tierproxy_flush_batch_entries", "Log entries per flushed batch",
                        ["sink"], buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 10000))
FLUSH_SECONDS = Histogram("tierproxy_flush_seconds", "Time to write one batch to a sink",
                          ["sink"], buckets=_FAST)
FLUSHED_ROWS = Counter("tierproxy_flushed_rows_total", "Rows written to a sink", ["sink"])
COALESCED = Counter("tierproxy_coalesced_entries_total",
                    "Log entries superseded by a newer version in the same batch", ["sink"])
RETRIES = Counter("tierproxy_flush_retries_total", "Failed sink writes that will be retried",
                  ["sink"])
DEAD_LETTERS = Counter("tierproxy_dead_letters_total", "Entries moved to a dead-letter stream",
                       ["sink"])
CIRCUIT = Gauge("tierproxy_circuit_state", "Sink circuit: 0 closed, 1 half-open, 2 open",
                ["sink"], multiprocess_mode="livemax")
BACKLOG = Gauge("tierproxy_backlog_entries", "Log entries not yet acknowledged by a sink",
                ["sink"], multiprocess_mode="livemax")
LAG = Gauge("tierproxy_lag_seconds", "Age of the oldest log entry a sink has not acknowledged",
            ["sink"], multiprocess_mode="livemax")
ACK_TO_COMMIT = Histogram("tierproxy_ack_to_commit_seconds",
                          "From the write's acknowledgement to its commit in a sink", ["sink"],
                          buckets=_FAST + (30.0, 60.0))
RECLAIMED = Counter("tierproxy_reclaimed_entries_total",
                    "Pending entries claimed from idle consumers", ["sink"])
WORKER_ERRORS = Counter("tierproxy_worker_errors_total",
                        "Unexpected errors in background workers (each logged and retried)",
                        ["worker"])
UNFLUSHED_COUNT_ERRORS = Counter(
    "tierproxy_unflushed_count_errors_total",
    "Acknowledged log entries whose entity had no unflushed change left to count (an alarm: "
    "a duplicated log entry); the count stays at 0 and no key gets a TTL for it")
VERSION_CONFLICTS = Counter(
    "tierproxy_version_conflicts_total",
    "Rows that reached PostgreSQL at a version it already held with other content (kept the "
    "stored one; each is logged)", ["table"])
REDIS_DATA_LOSS = Counter(
    "tierproxy_redis_data_loss_total",
    "Signs that Redis lost acknowledged data: its epoch changed (all), or PostgreSQL already "
    "held a seq, version or change number it handed out (seq_taken, version_taken, "
    "cseq_taken); each triggers a reconciliation of Redis's counters", ["kind"])
READ_THROUGH = Counter("tierproxy_read_through_total", "Reads served below Redis", ["tier"])
REPLICATION_WAITS = Counter(
    "tierproxy_replication_waits_total",
    "Writes that asked for X-Durability: replicated, by outcome (confirmed: on "
    "redis.ack_replicas replicas in time; short: answered 202 as acknowledged)", ["result"])
REDIS_MEMORY_RATIO = Gauge("tierproxy_redis_memory_ratio",
                           "Redis used_memory / maxmemory (the highest node; 0 without "
                           "maxmemory); writes are refused above redis.max_memory_ratio",
                           multiprocess_mode="livemax")
WRITE_THROUGH = Gauge("tierproxy_write_through",
                      "1 while an API process serves from PostgreSQL alone (Redis down, "
                      "redis.write_through on)", multiprocess_mode="livemax")
BACKPRESSURE = Counter("tierproxy_backpressure_refusals_total",
                       "Writes refused with 503 because a bound was passed",
                       ["bound"])

WS_CONNECTIONS = Gauge("tierproxy_ws_connections", "Open WebSocket connections",
                       multiprocess_mode="livesum")
WS_SUBSCRIPTIONS = Gauge("tierproxy_ws_subscriptions", "Thread subscriptions on open sockets",
                         multiprocess_mode="livesum")
WS_EVENTS = Counter("tierproxy_ws_events_sent_total", "Event frames sent to subscribers")
WS_DELIVERY_SECONDS = Histogram("tierproxy_ws_delivery_seconds",
                                "From the write's acknowledgement to the frame being sent",
                                buckets=_FAST)
WS_SLOW_CLOSES = Counter("tierproxy_ws_slow_consumer_closes_total",
                         "Sockets closed because the client did not keep up")
EPHEMERAL = Counter("tierproxy_ephemeral_events_total",
                    "Ephemeral events offered, by outcome (published; rate_limited: 429)",
                    ["outcome"])
WS_EPHEMERAL_DROPPED = Counter("tierproxy_ws_ephemeral_dropped_total",
                               "Ephemeral frames not sent: the socket's queue was 3/4 full")


def sink_series(sink: str) -> None:
    """Create a sink's series at 0, so they are exported (multiprocess mode leaves out a family
    without samples) and increase() sees their first step."""
    for family in (FLUSHED_ROWS, COALESCED, RETRIES, DEAD_LETTERS, RECLAIMED):
        family.labels(sink)


class RequestStats:
    """HTTP requests counted in plain dicts (a few hundred ns each), folded into
    HTTP_REQUESTS and HTTP_SECONDS by `fold()`, which the owner calls once a second."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = defaultdict(int)
        self._seconds: dict[tuple[str, str], list[float]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self._counts[(route, method, str(status))] += 1
        hist = self._seconds.get((route, method))
        if hist is None:
            hist = self._seconds[(route, method)] = [0.0] * (len(_FAST) + 2)
        hist[bisect.bisect_left(_FAST, seconds)] += 1  # bucket counts, then the sum
        hist[-1] += seconds

    def fold(self) -> None:
        counts, self._counts = self._counts, defaultdict(int)
        seconds, self._seconds = self._seconds, {}
        for key, n in counts.items():
            HTTP_REQUESTS.labels(*key).inc(n)
        for route, hist in seconds.items():
            child = HTTP_SECONDS.labels(*route)
            # prometheus-client keeps per-bucket (not cumulative) counts and the sum in these
            # two private fields; observe() would take one call per request.
            for i, count in enumerate(hist[:-1]):
                if count:
                    child._buckets[i].inc(count)
            child._sum.inc(hist[-1])

for _result in ("confirmed", "short"):
    REPLICATION_WAITS.labels(_result)
for _bound in ("backlog", "lag", "memory"):
    BACKPRESSURE.labels(_bound)
for _outcome in ("published", "rate_limited"):
    EPHEMERAL.labels(_outcome)
