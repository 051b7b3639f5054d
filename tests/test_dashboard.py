"""The Grafana dashboard shipped in the chart (helm/tierproxy/dashboards/tierproxy.json).

Every PromQL expression in it (panel targets and template variable queries) is read, the
metric names it uses are taken out, and each must be exported by a real sidecar: a
subprocess (`python -m proxy serve`) on the session's Redis and PostgreSQL, scraped on its
metrics port. A labelled metric with no sample yet still prints its `# TYPE` line, so every
name is checked; the label names and route values the expressions filter or group on are
checked against the samples the sidecar has after serving the routes the panels watch.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from proxy.embedded import clickhouse_url
from tests.conftest import Servers
from tests.helpers import wait_for
from tests.sidecar import ROOT, Sidecar

DASHBOARD = ROOT / "helm" / "tierproxy" / "dashboards" / "tierproxy.json"
GRID_WIDTH = 24
# Labels Prometheus adds to every target (kubernetes_sd / prometheus-operator relabelling),
# which the sidecar itself does not export; `le` belongs to every histogram bucket.
TARGET_LABELS = {"namespace", "pod", "le"}
# PromQL's functions and aggregation operators (prometheus.io/docs/prometheus/latest/querying):
# a name followed by "(" must be one of them, so a typo in a function fails here.
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count_over_time", "day_of_month", "day_of_week", "delta",
    "deriv", "exp", "floor", "histogram_quantile", "holt_winters", "idelta", "increase",
    "irate", "label_join", "label_replace", "last_over_time", "ln", "log2", "log10",
    "max_over_time", "min_over_time", "predict_linear", "quantile_over_time", "rate",
    "resets", "round", "scalar", "sort", "sort_desc", "sqrt", "stddev_over_time",
    "sum_over_time", "time", "timestamp", "vector",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[a-z]*")
AGGREGATION_CLAUSE = re.compile(r"(by|without)\s*\(")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


# --- PromQL, read ---------------------------------------------------------------------------


@dataclass
class Query:
    """What one expression uses: metrics, the labels of each selector, and grouping labels."""
    text: str
    metrics: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    matchers: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    grouping: set[str] = field(default_factory=set)


def parse(expr: str) -> Query:
    """Metric names, functions and labels of a PromQL expression. A name is a function when
    "(" (or an aggregation's `by`/`without`) follows it, a label list when a grouping keyword
    precedes that "(", and a metric otherwise; selectors `{...}` and ranges `[...]` are read
    apart from names."""
    reader = _Reader(Query(expr))
    while reader.i < len(expr):
        reader.step()
    return reader.query


class _Reader:
    def __init__(self, query: Query) -> None:
        self.query, self.text = query, query.text
        self.i, self.last_metric, self.pending_group = 0, "", False

    def step(self) -> None:
        c = self.text[self.i]
        if c == "{":
            end = _closing(self.text, self.i, "{", "}")
            found = MATCHER.findall(self.text[self.i + 1:end])
            self.query.matchers.setdefault(self.last_metric, []).extend(found)
            self.i = end + 1
        elif c == "[":
            self.i = _closing(self.text, self.i, "[", "]") + 1
        elif c == '"':
            self.i = _string_end(self.text, self.i) + 1
        elif c == "(" and self.pending_group:
            end = _closing(self.text, self.i, "(", ")")
            self.query.grouping |= set(IDENT.findall(self.text[self.i + 1:end]))
            self.i, self.pending_group = end + 1, False
        elif number := NUMBER.match(self.text, self.i):
            self.i = number.end()
        elif name := IDENT.match(self.text, self.i):
            self.i = name.end()
            self.name(name.group(0))
        else:
            self.i += 1

    def name(self, name: str) -> None:
        after = self.text[self.i:].lstrip()
        if name in GROUPING:
            self.pending_group = True
        elif after.startswith("(") or AGGREGATION_CLAUSE.match(after):
            self.query.functions.add(name)
        elif name not in KEYWORDS:
            self.query.metrics.add(name)
            self.last_metric = name


def parse_variable(query: str) -> Query:
    """A Grafana template variable query: label_values(<selector>, <label>)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", query)
    assert m, f"not a label_values(...) query: {query!r}"
    parsed = parse(m.group(1))
    parsed.text = query
    parsed.grouping.add(m.group(2))
    return parsed


def _closing(text: str, start: int, open_: str, close: str) -> int:
    depth, i = 0, start
    while i < len(text):
        if text[i] == '"':
            i = _string_end(text, i)
        elif text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise AssertionError(f"unclosed {open_!r} in {text!r}")


def _string_end(text: str, start: int) -> int:
    i = start + 1
    while text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return i


def test_parse_reads_metrics_labels_and_functions() -> None:
    q = parse('histogram_quantile(0.99, sum by (le, route) (rate(a_seconds_bucket{route='
              '"/v1/x/{id}", method!~"GET|HEAD"}[$__rate_interval]))) / ignoring(route) '
              'sum(b_total offset 5m) > bool 1e3')
    assert q.metrics == {"a_seconds_bucket", "b_total"}
    assert q.functions == {"histogram_quantile", "sum", "rate"}
    assert q.grouping == {"le", "route"}
    assert q.matchers["a_seconds_bucket"] == [("route", "=", "/v1/x/{id}"),
                                              ("method", "!~", "GET|HEAD")]
    v = parse_variable('label_values(c_total{namespace=~"$namespace"}, pod)')
    assert (v.metrics, v.grouping) == ({"c_total"}, {"pod"})


# --- the dashboard --------------------------------------------------------------------------


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(doc: dict[str, Any]) -> list[Query]:
    """Every panel target's PromQL and every template variable's query, read."""
    found = [parse(t["expr"]) for p in panels(doc) for t in p.get("targets", [])]
    found += [parse_variable(v["query"]) for v in doc["templating"]["list"]
              if v["type"] == "query"]
    return found


def test_dashboard_structure() -> None:
    doc = load()
    assert doc["uid"] == "tierproxy" and doc["title"] == "tierproxy"
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for p in panels(doc):
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= GRID_WIDTH, p["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description"), f"panel {p['title']!r} needs a description"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"


def test_dashboard_covers_the_issue() -> None:
    # Request rate and latency by route, append and page p99, backlog and lag per sink, flush
    # batch sizes and rows/s, circuit states, dead letters, WebSocket connections and delivery.
    used = set().union(*(q.metrics for q in queries(load())))
    for metric in ("tierproxy_http_requests_total", "tierproxy_http_request_seconds_bucket",
                   "tierproxy_backlog_entries", "tierproxy_lag_seconds",
                   "tierproxy_flush_batch_entries_bucket", "tierproxy_flushed_rows_total",
                   "tierproxy_circuit_state", "tierproxy_dead_letters_total",
                   "tierproxy_ws_connections", "tierproxy_ws_delivery_seconds_bucket"):
        assert metric in used, metric
    titles = {p["title"] for p in panels(load())}
    assert {"Append and page p50 / p99", "Backlog per sink", "Lag per sink"} <= titles


def test_every_function_is_promql() -> None:
    for q in queries(load()):
        unknown = q.functions - FUNCTIONS
        assert not unknown, f"{sorted(unknown)} in {q.text}"


# --- a running sidecar ----------------------------------------------------------------------


@dataclass
class Exposition:
    types: dict[str, str]  # metric family (as in `# TYPE`) -> its type
    labels: dict[str, set[str]]  # family -> label names seen in its samples
    values: dict[str, dict[str, set[str]]]  # family -> label -> values seen

    def family(self, name: str) -> str | None:
        """The family a name in an expression belongs to (x_bucket -> x of a histogram)."""
        if name in self.types:
            return name
        for suffix in ("_bucket", "_sum", "_count", "_created"):
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) in ("histogram", "summary"):
                return base
        return None


def read_exposition(text: str) -> Exposition:
    exp = Exposition({}, {}, {})
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            exp.types[name] = kind
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            family = exp.family(name)
            if family is None or not rest:
                continue
            for label, _, value in MATCHER.findall(rest.rpartition("}")[0]):
                exp.labels.setdefault(family, set()).add(label)
                exp.values.setdefault(family, {}).setdefault(label, set()).add(value)
    return exp


@pytest.fixture
async def exposition(servers: Servers, redis: aioredis.Redis, pg: asyncpg.Connection,
                     tmp_path: Path) -> AsyncIterator[Exposition]:
    """/metrics of a sidecar subprocess after it served the routes the panels watch (append,
    page read) and flushed the append to PostgreSQL."""
    side = Sidecar(tmp_path / "side", servers.redis_url, servers.postgres_url,
                   clickhouse_url(tmp_path / "side"))
    await asyncio.to_thread(side.start)
    try:
        async with aiohttp.ClientSession(base_url=side.url) as http:
            async with http.put("/v1/threads/dash-1", json={"title": "t"}) as resp:
                assert resp.status == 201, await resp.text()
            async with http.post("/v1/threads/dash-1/messages",
                                 json={"role": "user", "content": "hi"}) as resp:
                assert resp.status == 201, await resp.text()
            async with http.get("/v1/threads/dash-1/messages") as resp:
                assert resp.status == 200, await resp.text()

        async def flushed() -> Any:
            return await pg.fetchval("SELECT count(*) FROM messages WHERE thread_id = 'dash-1'")

        await wait_for(flushed, 30)

        async def scraped() -> str | None:
            """Once the requests are in (processes fold them in once a second)."""
            async with aiohttp.ClientSession() as http, \
                    http.get(f"http://127.0.0.1:{side.metrics_port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            return text if 'route="/v1/threads/{tid}/messages"' in text else None

        yield read_exposition(await wait_for(scraped, 30, 0.2))
    finally:
        await asyncio.to_thread(side.stop)


async def test_every_metric_is_exported_by_a_running_sidecar(exposition: Exposition) -> None:
    missing = {}
    for q in queries(load()):
        for metric in q.metrics:
            if exposition.family(metric) is None:
                missing[metric] = q.text
    assert not missing, f"not exported by the sidecar: {missing}"


async def test_labels_and_routes_exist_in_the_samples(exposition: Exposition) -> None:
    # Only families with samples show their labels; the ones the flow above fed (HTTP,
    # flush, backlog, lag, circuits) are checked, names and all route/method values.
    checked = 0
    for q in queries(load()):
        for metric in q.metrics:
            family = exposition.family(metric)
            if family is None or family not in exposition.labels:
                continue
            checked += 1
            known = exposition.labels[family] | TARGET_LABELS
            used = q.grouping | {label for label, _, _ in q.matchers.get(metric, [])}
            assert used <= known, f"{sorted(used - known)} not labels of {family}: {q.text}"
            for label, op, value in q.matchers.get(metric, []):
                if op == "=" and label in ("route", "method"):
                    assert value in exposition.values[family][label], f"{label}={value!r}"
    assert checked > 10
