"""create_app(settings): the one composition root. Startup order reads top to bottom; each
resource is a cleanup context, so teardown runs in reverse and one failure skips no other."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import openapi, routes
from proxy.hot import Backlog, HotTier, NoBacking, connect
from proxy.settings import Settings
from proxy.writelog import WriteLog

logger = logging.getLogger(__name__)


class Health:
    """What /readyz reports: ready once started, not draining, no background worker dead."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False
        self.failed: list[str] = []

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and not self.failed


class Workers:
    """Owns the background tasks: starts them, turns readiness red if one dies, and cancels
    and awaits them all on exit."""

    def __init__(self, health: Health) -> None:
        self._health = health
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.create_task(self._guard(name, run), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("background worker %s crashed", name)
            self._health.failed.append(name)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


HEALTH = web.AppKey("health", Health)
WORKERS = web.AppKey("workers", Workers)
LOG = web.AppKey("log", WriteLog)
REDIS = web.AppKey("redis", Any)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.api.max_body_bytes,
        middlewares=[routes.errors_middleware, routes.metrics_middleware,
                     routes.auth_middleware(settings.api.token),
                     routes.timeout_middleware(settings.api.request_timeout_s)])
    app[routes.SETTINGS] = settings
    app[HEALTH] = Health()
    app[WORKERS] = Workers(app[HEALTH])
    app.cleanup_ctx.append(_redis(settings))
    app.cleanup_ctx.append(_workers)
    app.on_shutdown.append(_drain)
    routes.add_routes(app)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/openapi.json", openapi_json, allow_head=False)
    return app


def _redis(settings: Settings) -> Callable[[web.Application], Any]:
    @asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client = connect(settings, settings.redis.url)
        log = WriteLog(client, settings.redis.shards)
        try:
            await log.check_eviction_policy()
            await log.ensure_groups()
            app[REDIS] = client
            app[LOG] = log
            app[routes.HOT] = HotTier(client, settings, NoBacking(), Backlog())
            yield
        finally:
            await client.aclose()

    return lambda app: ctx(app)


async def _workers(app: web.Application) -> AsyncIterator[None]:
    app[HEALTH].started = True
    yield
    await app[WORKERS].stop()


async def _drain(app: web.Application) -> None:
    """SIGTERM: readiness goes false at once; aiohttp then lets in-flight requests finish."""
    app[HEALTH].draining = True


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readiness(app: web.Application) -> web.Response:
    """Ready = started, not draining, no worker dead, Redis answering."""
    health = app[HEALTH]
    problems = list(health.failed)
    if not health.started:
        problems.append("starting")
    if health.draining:
        problems.append("draining")
    if not problems:
        try:
            await asyncio.wait_for(app[REDIS].ping(), 1.0)
        except Exception as e:  # any failure means not ready; the reason is reported
            problems.append(f"redis: {e or type(e).__name__}")
    return web.Response(body=orjson.dumps({"ready": not problems, "problems": problems}),
                        status=200 if not problems else 503, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    return await readiness(request.app)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(openapi.DOCUMENT), content_type="application/json")


def create_metrics_app(api: web.Application) -> web.Application:
    """/metrics on its own port (scrapable from outside the pod), plus the probes, since the
    API itself listens on loopback only."""
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
