"""proxy.tracing: the server span continues the caller's traceparent and tracestate, Redis spans
are its children (also from tasks it starts), a flush batch is a root of its own, log ids
appear inside a span only; off, every hook is the shared no-op; setup reads the OTEL_*
variables (console, none, OTLP without a collector, bad values) and, without the packages,
stays off."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy import tracing
from proxy.settings import ConfigError

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ROUTE = "/v1/threads/{tid}/messages"
OTEL_VARIABLES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                  "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME",
                  "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, each span exported as it ends, into memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.shutdown()


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No OTEL_* variable from the outside; tracing off again after the test."""
    for variable in OTEL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    yield monkeypatch
    tracing.shutdown()


def app_with(handler: Any) -> web.Application:
    middleware = tracing.middleware()
    assert middleware is not None
    app = web.Application(middlewares=[middleware])
    app.router.add_post(ROUTE, handler)
    return app


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


def run_python(code: str, **otel: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter (warnings as errors) with only the given OTEL_* set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | otel
    return subprocess.run([sys.executable, "-W", "error", "-c", code], env=env,
                          capture_output=True, text=True, timeout=60)


async def append(request: web.Request) -> web.Response:
    with tracing.span("redis message_append"):
        return web.json_response({"seq": 1}, status=201)


async def test_server_span_continues_the_callers_trace(spans: InMemorySpanExporter,
                                                        aiohttp_client: Any) -> None:
    client = await aiohttp_client(app_with(append))
    resp = await client.post("/v1/threads/t1/messages",
                             headers={"traceparent": TRACEPARENT, "tracestate": "vendor=v1"})
    assert resp.status == 201
    found = by_name(spans)
    server, child = found[f"POST {ROUTE}"], found["redis message_append"]
    assert server.kind is SpanKind.SERVER
    assert server.context is not None and server.parent is not None
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert f"{server.parent.span_id:016x}" == PARENT_ID and server.parent.is_remote
    assert server.context.trace_state.get("vendor") == "v1"
    assert child.parent is not None and child.context is not None
    assert child.parent.span_id == server.context.span_id
    assert child.context.trace_id == server.context.trace_id
    assert dict(server.attributes or {}) == {
        "http.request.method": "POST", "http.route": ROUTE, "url.path": "/v1/threads/t1/messages",
        "url.scheme": "http", "http.response.status_code": 201}
    assert server.status.status_code is StatusCode.UNSET


async def test_without_traceparent_the_request_starts_a_trace(spans: InMemorySpanExporter,
                                                              aiohttp_client: Any) -> None:
    client = await aiohttp_client(app_with(append))
    assert (await client.post("/v1/threads/t1/messages")).status == 201
    assert by_name(spans)[f"POST {ROUTE}"].parent is None


async def test_an_unsampled_request_records_nothing_but_logs_its_trace(
        spans: InMemorySpanExporter, aiohttp_client: Any) -> None:
    """The caller's flags say not sampled: no span is exported, the Redis span is the no-op,
    and log lines still carry the caller's trace id."""
    seen: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        seen.extend([tracing.redis_span("message_append"), tracing.current_ids()])
        return web.json_response({})

    client = await aiohttp_client(app_with(handler))
    unsampled = TRACEPARENT.removesuffix("-01") + "-00"
    assert (await client.post("/v1/threads/t1/messages",
                              headers={"traceparent": unsampled})).status == 200
    assert not spans.get_finished_spans()
    no_span, ids = seen
    assert no_span is tracing.NO_SPAN
    assert isinstance(ids, tuple) and ids[0] == TRACE_ID


async def test_spans_follow_the_tasks_a_request_starts(spans: InMemorySpanExporter,
                                                       aiohttp_client: Any) -> None:
    """Two tasks run their Redis calls concurrently: each span's parent is the server span,
    never the other task's span."""
    async def call(script: str, started: asyncio.Event, other: asyncio.Event) -> None:
        with tracing.redis_span(script):
            started.set()
            await other.wait()  # both spans are open at once

    async def handler(request: web.Request) -> web.Response:
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(call("read_page", a, b), call("get_message", b, a))
        return web.json_response({})

    client = await aiohttp_client(app_with(handler))
    assert (await client.post("/v1/threads/t1/messages")).status == 200
    found = by_name(spans)
    server = found[f"POST {ROUTE}"]
    assert server.context is not None
    for script in ("read_page", "get_message"):
        child = found[f"redis {script}"]
        assert child.parent is not None and child.parent.span_id == server.context.span_id
        assert (child.attributes or {})["db.system"] == "redis"
        assert (child.attributes or {})["db.stored_procedure.name"] == script


async def test_a_failure_is_recorded_on_the_server_span(spans: InMemorySpanExporter,
                                                        aiohttp_client: Any) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("script exploded")

    client = await aiohttp_client(app_with(broken))
    assert (await client.post("/v1/threads/t1/messages")).status == 500
    server = by_name(spans)[f"POST {ROUTE}"]
    assert server.status.status_code is StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "RuntimeError"
    assert [e.name for e in server.events] == ["exception"]


async def test_an_unmatched_path_is_named_by_its_method_and_not_an_error(
        spans: InMemorySpanExporter, aiohttp_client: Any) -> None:
    client = await aiohttp_client(app_with(append))
    assert (await client.get("/v1/nothing/here")).status == 404
    (server,) = spans.get_finished_spans()
    assert server.name == "GET" and "http.route" not in (server.attributes or {})
    assert (server.attributes or {})["http.response.status_code"] == 404
    assert server.status.status_code is StatusCode.UNSET


async def test_a_5xx_answer_marks_the_server_span_as_failed(spans: InMemorySpanExporter,
                                                            aiohttp_client: Any) -> None:
    """As the error middleware answers: a response, no exception, plus record_exception."""
    async def unavailable(request: web.Request) -> web.Response:
        tracing.record_exception(ConnectionError("redis: connection refused"))
        return web.json_response({"error": {}}, status=503)

    client = await aiohttp_client(app_with(unavailable))
    assert (await client.post("/v1/threads/t1/messages")).status == 503
    server = by_name(spans)[f"POST {ROUTE}"]
    assert server.status.status_code is StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "503"
    assert [e.name for e in server.events] == ["exception"]


def test_a_flush_batch_is_a_root_span_and_its_redis_calls_its_children(
        spans: InMemorySpanExporter) -> None:
    with tracing.span("outer"):  # no span is current: a child span makes nothing
        pass
    with tracing.flush_span("pg", rows=3, shards=2), tracing.redis_span("release"):
        pass
    found = by_name(spans)
    assert set(found) == {"flush pg", "redis release"}
    flush, ack = found["flush pg"], found["redis release"]
    assert flush.parent is None and flush.context is not None
    assert dict(flush.attributes or {}) == {"tierproxy.sink": "pg", "tierproxy.rows": 3,
                                            "tierproxy.shards": 2}
    assert ack.parent is not None and ack.parent.span_id == flush.context.span_id


async def test_a_flush_span_never_joins_the_current_trace(spans: InMemorySpanExporter,
                                                          aiohttp_client: Any) -> None:
    async def persisted(request: web.Request) -> web.Response:
        with tracing.flush_span("pg", rows=1, shards=1):
            return web.json_response({})

    client = await aiohttp_client(app_with(persisted))
    await client.post("/v1/threads/t1/messages", headers={"traceparent": TRACEPARENT})
    flush = by_name(spans)["flush pg"]
    assert flush.parent is None and flush.context is not None
    assert f"{flush.context.trace_id:032x}" != TRACE_ID


def test_log_ids_inside_a_span_only(spans: InMemorySpanExporter) -> None:
    assert tracing.current_ids() is None
    with tracing.flush_span("ch", rows=1, shards=1) as handle:
        ids = tracing.current_ids()
        handle.set_attribute("tierproxy.rows", 2)
    assert tracing.current_ids() is None
    (flush,) = spans.get_finished_spans()
    assert flush.context is not None
    assert ids == (f"{flush.context.trace_id:032x}", f"{flush.context.span_id:016x}")
    assert (flush.attributes or {})["tierproxy.rows"] == 2


def test_off_every_hook_is_the_shared_no_op() -> None:
    assert not tracing.enabled()
    assert tracing.middleware() is None
    assert tracing.span("redis message_append") is tracing.NO_SPAN
    assert tracing.redis_span("message_append") is tracing.NO_SPAN
    assert tracing.flush_span("pg", rows=1, shards=1) is tracing.NO_SPAN
    assert tracing.current_ids() is None
    tracing.record_exception(RuntimeError("nowhere to go"))
    with tracing.redis_span("message_append") as handle:
        handle.set_attribute("rows", 1)


@pytest.mark.parametrize("env,expected", [
    ({}, []),
    ({"OTEL_TRACES_EXPORTER": "none"}, []),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ({"OTEL_TRACES_EXPORTER": " OTLP, console "}, ["otlp", "console"]),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "TRUE"}, []),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, ["otlp"]),
    ({"OTEL_METRICS_EXPORTER": "otlp"}, []),
])
def test_requested_exporters(env: dict[str, str], expected: list[str]) -> None:
    assert tracing.requested_exporters(env) == expected


@pytest.mark.parametrize("env,named", [
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER: unknown exporter 'jaeger'"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
])
def test_bad_otel_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        tracing.requested_exporters(env)


def test_setup_without_configuration_stays_off(otel_env: pytest.MonkeyPatch) -> None:
    otel_env.setenv("OTEL_TRACES_EXPORTER", "none")
    tracing.setup("tierproxy")
    assert not tracing.enabled() and tracing.middleware() is None


def test_setup_with_the_console_exporter() -> None:
    """The whole path of a real process (a fresh interpreter: the console exporter writes to
    the stdout it found at import): environment, batch processor, exporter, flushed by
    shutdown; the resource takes OTEL_SERVICE_NAME over the name given, and keeps the given
    attributes."""
    code = "\n".join([
        "from proxy import tracing",
        "tracing.setup('tierproxy', {'tierproxy.role': 'worker'})",
        "assert tracing.enabled()",
        "with tracing.flush_span('pg', rows=5, shards=1):",
        "    pass",
        "tracing.shutdown()",
        "assert not tracing.enabled()",
    ])
    done = run_python(code, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="chat-sidecar")
    assert done.returncode == 0, done.stderr
    assert '"name": "flush pg"' in done.stdout
    assert '"service.name": "chat-sidecar"' in done.stdout
    assert '"tierproxy.role": "worker"' in done.stdout


def test_setup_with_an_otlp_endpoint_needs_no_collector_to_start(
        otel_env: pytest.MonkeyPatch) -> None:
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    tracing.setup("tierproxy")
    assert tracing.enabled()  # no span was made, so shutdown sends nothing


def test_setup_without_the_exporter_package_warns_and_stays_off(
        otel_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    # None in sys.modules makes the import fail as if the package were not installed.
    otel_env.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with caplog.at_level(logging.WARNING, logger="proxy.tracing"):
        tracing.setup("tierproxy")
    assert not tracing.enabled()
    assert "opentelemetry.exporter.otlp.proto.http.trace_exporter is not installed" in caplog.text


def test_the_module_works_without_opentelemetry_installed() -> None:
    """In a fresh interpreter where no opentelemetry module can be imported, with tracing
    asked for: importing touches no opentelemetry module, and every hook stays the no-op."""
    code = "\n".join([
        "import sys",
        "sys.modules['opentelemetry'] = None",
        "from proxy import tracing",
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.')]",
        "tracing.setup('tierproxy')",
        "assert not tracing.enabled() and tracing.middleware() is None",
        "assert tracing.redis_span('message_append') is tracing.NO_SPAN",
        "assert tracing.current_ids() is None",
    ])
    done = run_python(code, OTEL_TRACES_EXPORTER="console")
    assert done.returncode == 0, done.stderr
    assert "is not installed (install tierproxy[otel]): tracing stays off" in done.stderr
