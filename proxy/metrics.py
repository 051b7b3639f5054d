"""Every Prometheus metric, defined once. Units in the names; labels bounded (never an id)."""

from __future__ import annotations

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
                ["sink"])
BACKLOG = Gauge("tierproxy_backlog_entries", "Log entries not yet acknowledged by a sink",
                ["sink"])
LAG = Gauge("tierproxy_lag_seconds", "Age of the oldest log entry a sink has not acknowledged",
            ["sink"])
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
    "held a seq or version it handed out (seq_taken, version_taken); each triggers a "
    "reconciliation of Redis's counters", ["kind"])
READ_THROUGH = Counter("tierproxy_read_through_total", "Reads served below Redis", ["tier"])

WS_CONNECTIONS = Gauge("tierproxy_ws_connections", "Open WebSocket connections")
WS_SUBSCRIPTIONS = Gauge("tierproxy_ws_subscriptions", "Thread subscriptions on open sockets")
WS_EVENTS = Counter("tierproxy_ws_events_sent_total", "Event frames sent to subscribers")
WS_DELIVERY_SECONDS = Histogram("tierproxy_ws_delivery_seconds",
                                "From the write's acknowledgement to the frame being sent",
                                buckets=_FAST)
WS_SLOW_CLOSES = Counter("tierproxy_ws_slow_consumer_closes_total",
                         "Sockets closed because the client did not keep up")
