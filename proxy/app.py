"""create_app(settings, role): the one composition root of a sidecar process — its middlewares
and routes here, what it runs in services.py (in startup order), the probes and the metrics
port's app below."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import internal, middlewares, openapi, routes, routes_feeds, tracing
from proxy.failpoints import Failpoints
from proxy.metrics import RequestStats
from proxy.services import (
    API_ROLES,
    FAILPOINTS,
    HEALTH,
    REDIS,
    ROLE,
    STATS,
    consumer_name,
    services,
)
from proxy.settings import Settings
from proxy.workers import Health

__all__ = ["FAILPOINTS", "HEALTH", "REDIS", "consumer_name", "create_app",
           "create_metrics_app"]


def create_app(settings: Settings, role: str = "all") -> web.Application:
    """`role`: api (requests), worker (background, answering on its socket) or all."""
    stats = RequestStats()
    chain = [middlewares.errors_middleware, middlewares.auth_middleware(settings.api.token),
             middlewares.timeout_middleware(settings.api.request_timeout_s)]
    if role in API_ROLES:  # the worker's socket serves its own processes: not counted
        chain.insert(1, middlewares.metrics_middleware(stats))
    if (traced := tracing.middleware()) is not None:
        chain.insert(0, traced)  # first: it sees the status the others settled on
    app = web.Application(client_max_size=settings.api.max_body_bytes, middlewares=chain)
    app[routes.SETTINGS], app[ROLE], app[STATS] = settings, role, stats
    app[HEALTH] = app[internal.WORKER_HEALTH] = Health()
    app[FAILPOINTS] = Failpoints(settings.debug.failpoint)
    app.cleanup_ctx.append(services)
    app.on_shutdown.append(_drain)
    if role in API_ROLES:
        routes.add_routes(app)
        routes_feeds.add_routes(app)
        document = orjson.dumps(openapi.document(settings))  # this configuration's

        async def openapi_json(request: web.Request) -> web.Response:
            return web.Response(body=document, content_type="application/json")

        app.router.add_get("/openapi.json", openapi_json, allow_head=False)
    else:
        internal.worker_routes(app)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    return app


async def _drain(app: web.Application) -> None:
    """SIGTERM: readiness goes false at once and WebSockets close with 1001, before aiohttp
    waits for the in-flight handlers (a socket's handler would hold it up to the timeout)."""
    app[HEALTH].drain()
    hub = app.get(routes.HUB)
    if hub is not None:
        await hub.shutdown()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readiness(app: web.Application) -> web.Response:
    """Ready = started, not draining, no background worker dead or stuck (here or, for an
    API process, in the worker), the monitor's figures known, Redis answering (or, with
    redis.write_through, PostgreSQL serving alone while it does not)."""
    health = app[HEALTH]
    problems = list(health.failed)
    status = app.get(routes.STATUS)
    if status is not None:
        problems += status.stuck()
        if not status.measured:  # backlog unknown: admission and status would lie
            problems.append("monitor: first measurement pending")
    if not health.started:
        problems.append("starting")
    if health.draining:
        problems.append("draining")
    failover = app.get(routes.FAILOVER)
    if not problems and not (failover is not None and failover.down):  # else PostgreSQL serves
        try:
            await asyncio.wait_for(app[REDIS].ping(), 1.0)
        except Exception as e:  # any failure means not ready; the reason is reported
            problems.append(f"redis: {e or type(e).__name__}")
    return web.Response(body=orjson.dumps({"ready": not problems, "problems": problems}),
                        status=200 if not problems else 503, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    return await readiness(request.app)


def create_metrics_app(api: web.Application) -> web.Application:
    """/metrics on its own port (scrapable from outside the pod), plus the probes, for a
    process that runs alone (a supervisor serves them for its children)."""
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def ready(request: web.Request) -> web.Response:
        return await readiness(api)

    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", ready, allow_head=False)
    return app
