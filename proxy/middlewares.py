"""The middlewares every API request passes: errors to JSON statuses, the bearer token,
request metrics, the request deadline."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy import metrics, tracing
from proxy.errors import ProxyError, RateLimited, Unauthorized, Unavailable

logger = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message, "detail": detail}}
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as `{"error": {...}}` with the status its class maps to."""
    try:
        return await handler(request)
    except ProxyError as e:
        headers = {}
        if isinstance(e, Unavailable):
            headers["Retry-After"] = str(max(1, round(e.retry_after_s)))
        if isinstance(e, RateLimited):  # rounded up: a retry that early is refused again
            headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
        if isinstance(e, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"  # a 401 must name the scheme (RFC 9110)
        return error_response(e.status, e.code, e.message, e.detail, headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.status,
                                                                                 "http_error")
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None  # 405 needs it
        return error_response(e.status, code, e.reason, headers=allow)
    except Exception as e:
        tracing.record_exception(e)
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error (logged)")


def auth_middleware(token: str) -> Any:
    """When a token is configured, every /v1 route needs `Authorization: Bearer <token>`.
    /v1/ws also takes `?token=<token>`: a browser cannot set headers on a WebSocket."""
    expected = f"Bearer {token}".encode()

    def authorized(request: web.Request) -> bool:
        # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if hmac.compare_digest(given, expected):
            return True
        query = request.query.get("token") if request.path == "/v1/ws" else None
        return query is not None and hmac.compare_digest(query.encode(), token.encode())

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and request.path.startswith("/v1") and not authorized(request):
            raise Unauthorized("missing or wrong bearer token")
        return await handler(request)

    return check


def metrics_middleware(stats: metrics.RequestStats) -> Any:
    """Count and time every request (by route pattern, never by id) in `stats`."""
    @web.middleware
    async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        finally:
            resource = request.match_info.route.resource
            stats.observe(resource.canonical if resource is not None else "unmatched",
                          request.method, status, time.perf_counter() - start)

    return measure


def timeout_middleware(seconds: float) -> Any:
    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/ws":  # a socket lives as long as the client wants
            return await handler(request)
        try:
            async with asyncio.timeout(seconds):
                return await handler(request)
        except TimeoutError as e:
            raise Unavailable(f"request not answered within {seconds} s") from e

    return limit
