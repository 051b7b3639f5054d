"""Optional OpenTelemetry traces: a server span per request continuing the caller's W3C
`traceparent`, child spans around Redis script calls, a root span per flush batch, and the
current ids for log lines.

Off unless the standard OTEL_* variables ask for it (see `requested_exporters`), and then free:
every hook first checks one module global and returns a shared no-op, so nothing is imported,
allocated or entered on the request path. The opentelemetry packages (the `otel` extra) are
imported only by `setup` and the hooks once it turned tracing on; this module imports without
them. Spans follow asyncio tasks through contextvars (the SDK's context): a task started inside
a span sees it as its parent; a flush batch's span is a root of its own (see `flush_span`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.settings import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger(__name__)
AttributeValue = str | bool | int | float
EXPORTERS = ("otlp", "console", "none")
OTLP_PROTOCOL = "http/protobuf"  # the one OTLP transport the `otel` extra ships
_tracer: Tracer | None = None  # None: tracing is off, and every hook returns at once
_provider: TracerProvider | None = None


class SpanHandle(Protocol):
    """What a call site may do with the span it opened: add what it learnt meanwhile."""

    def set_attribute(self, key: str, value: AttributeValue) -> None: ...


class _NoSpan:
    """The one span of disabled tracing (or of work outside any traced request)."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None


NO_SPAN = _NoSpan()


def enabled() -> bool:
    return _tracer is not None


def requested_exporters(env: Mapping[str, str]) -> list[str]:
    """The exporters the OTEL_* variables ask for; none means tracing stays off. That is the
    case unless OTEL_TRACES_EXPORTER names `otlp` or `console`, or it is unset and an OTLP
    endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set;
    OTEL_SDK_DISABLED=true turns it off whatever else says."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")
             if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                      or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        names = ["otlp"]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r} "
                          f"(known: {', '.join(EXPORTERS)})")
    if "otlp" in names:
        _check_protocol(env)
    return [n for n in names if n != "none"]


def _check_protocol(env: Mapping[str, str]) -> None:
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if value := env.get(variable, "").strip():
            if value != OTLP_PROTOCOL:
                raise ConfigError(f"{variable}={value}: tierproxy exports traces over "
                                  f"{OTLP_PROTOCOL} only")
            return


def setup(service_name: str, attributes: Mapping[str, str] | None = None) -> None:
    """Once per process (after any fork), before the app is built: turn tracing on if the
    OTEL_* variables ask for it. `attributes` join the resource (e.g. the process role);
    OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override them and `service_name`. Asked for
    without the `otel` extra installed, tracing stays off with a warning: traces are not worth
    refusing to serve. A bad OTEL_* value raises ConfigError naming the variable."""
    # The OTEL_* variables belong to the SDK, which reads them itself (endpoint, headers,
    # sampler, batching, limits); only whether to start it at all is decided here.
    names = requested_exporters(os.environ)
    if not names:
        return
    try:
        provider = _new_provider(service_name, attributes or {}, names)
    except ImportError as e:
        logger.warning("OTEL_* variables ask for traces but %s is not installed (install "
                       "tierproxy[otel]): tracing stays off", e.name)
        return
    install(provider)
    logger.info("traces on: exporting with %s", ", ".join(names))


def _new_provider(service_name: str, attributes: Mapping[str, str],
                  names: list[str]) -> TracerProvider:
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create lets its arguments win over the environment; the standard wants the
    # reverse for OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, so they are merged on top.
    resource = Resource.create({"service.name": service_name, **attributes}).merge(
        OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*


def install(provider: TracerProvider) -> None:
    """Trace through `provider` from now on: setup's, or a test's with an in-memory exporter.
    It is not made the global provider (tierproxy's spans all come from here), so a process
    can replace it, and `shutdown` turns tracing off again."""
    global _tracer, _provider
    _provider, _tracer = provider, provider.get_tracer("tierproxy")


def shutdown() -> None:
    """Export what is buffered (blocking, within the exporter's timeout) and turn tracing off:
    at process exit, after the event loop stopped."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def middleware() -> Middleware | None:
    """The server span of every request, or None when tracing is off (then the app adds no
    middleware at all). Put it first in the app's middlewares: it must see the status that
    the error middleware answered with."""
    if _tracer is None:
        return None
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    tracer = _tracer

    @web.middleware
    async def trace_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        name, attributes = _request_span(request)
        with tracer.start_as_current_span(  # statuses are ours to judge: see _answered
                name, extract(request.headers), SpanKind.SERVER, attributes,
                record_exception=False, set_status_on_exception=False) as span:
            try:
                response = await handler(request)
            except web.HTTPException as e:  # raised past the error middleware (a redirect)
                _answered(span, e.status)
                raise
            except Exception as e:
                _failed(span, e)
                raise
            _answered(span, response.status)
            return response

    return trace_request


def _request_span(request: web.Request) -> tuple[str, dict[str, AttributeValue]]:
    """The span's name and first attributes: named by the route's canonical path (bounded, no
    ids), or by the method alone for a path no route matched."""
    attributes: dict[str, AttributeValue] = {
        "http.request.method": request.method, "url.path": request.path,
        "url.scheme": request.scheme}
    resource = request.match_info.route.resource
    if resource is None:
        return request.method, attributes
    attributes["http.route"] = resource.canonical
    return f"{request.method} {resource.canonical}", attributes


def _answered(span: Span, status: int) -> None:
    from opentelemetry.trace import StatusCode

    span.set_attribute("http.response.status_code", status)
    if status >= 500:  # a 4xx is the client's error, not the server's (HTTP conventions)
        span.set_attribute("error.type", str(status))
        span.set_status(StatusCode.ERROR)


def _failed(span: Span, error: Exception) -> None:
    from opentelemetry.trace import StatusCode

    span.record_exception(error)
    span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")


def record_exception(error: BaseException) -> None:
    """Note on the current span an error that is answered below it (the error middleware's
    500s): the server span then carries the exception, not only the status."""
    if _tracer is None:
        return
    from opentelemetry.trace import get_current_span

    get_current_span().record_exception(error)


def span(name: str, attributes: Mapping[str, AttributeValue] | None = None,
         ) -> AbstractContextManager[SpanHandle]:
    """A child of the current span. The shared no-op when tracing is off or no span is being
    recorded: background work outside a request or a flush batch (trims, the monitor, the
    hub's reads) makes no traces of its own."""
    if _tracer is None:
        return NO_SPAN
    from opentelemetry.trace import get_current_span

    if not get_current_span().is_recording():
        return NO_SPAN
    return _tracer.start_as_current_span(name, attributes=attributes)


def redis_span(script: str) -> AbstractContextManager[SpanHandle]:
    """Around one Lua script call (EVALSHA), named `redis <script>`."""
    if _tracer is None:
        return NO_SPAN
    # db.system is the older name of db.system.name; backends still key on either.
    return span(f"redis {script}", {"db.system": "redis", "db.system.name": "redis",
                                    "db.operation.name": "EVALSHA",
                                    "db.stored_procedure.name": script})


def flush_span(sink: str, rows: int, shards: int) -> AbstractContextManager[SpanHandle]:
    """Around one batch a flusher writes and acknowledges, named `flush <sink>`: always the
    root of a trace of its own, never a child of whatever span is current. A batch carries
    many requests' writes, and log entries do not carry their writers' trace context, so
    there is no one parent (nor any link) to give it."""
    if _tracer is None:
        return NO_SPAN
    from opentelemetry.context import Context

    return _tracer.start_as_current_span(
        f"flush {sink}", Context(),
        attributes={"tierproxy.sink": sink, "tierproxy.rows": rows, "tierproxy.shards": shards})


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span in hex, for log lines; None when tracing is
    off or no span is current. Log calls made in the request's task or in a thread it
    started with asyncio.to_thread (which copies the context) see the request's span."""
    if _tracer is None:
        return None
    from opentelemetry.trace import get_current_span

    context = get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
