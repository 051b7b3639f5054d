"""Bearer-token auth: with a token configured every /v1 route needs it; probes and the OpenAPI
document never do; without a token nothing is asked."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.settings import Settings
from tests import helpers
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import PAUSED, body, error

Client = TestClient[Any, Any]
TOKEN = "s3cret"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
WRONG = ["", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
         f"Bearer  {TOKEN}", f"Bearer {TOKEN},x", TOKEN, f"Basic {TOKEN}", f"Token {TOKEN}",
         f"Bearer {TOKEN.upper()}", "Bearer é"]
IDS = {"tid": "t1", "mid": "m1", "key": "k1", "uid": "u1"}
# Every call of the core flow, in an order where each succeeds: (method, path, body, status).
FLOW = [
    ("PUT", "/v1/threads/t1", {"title": "x"}, 201),
    ("GET", "/v1/threads/t1", None, 200),
    ("POST", "/v1/threads/t1/messages", {"message_id": "m1", "role": "u", "content": "c"}, 201),
    ("GET", "/v1/threads/t1/messages", None, 200),
    ("GET", "/v1/threads/t1/messages/m1", None, 200),
    ("PATCH", "/v1/threads/t1/messages/m1", {"content": "d"}, 200),
    ("DELETE", "/v1/threads/t1/messages/m1", None, 200),
    ("PUT", "/v1/state/k1", {"value": 1}, 201),
    ("GET", "/v1/state/k1", None, 200),
    ("DELETE", "/v1/state/k1", None, 200),
    ("DELETE", "/v1/threads/t1", None, 200),
    ("GET", "/v1/status", None, 200),
]


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(servers, **PAUSED)


@pytest.fixture
async def guarded(client_for: AppClient, settings: Settings) -> Client:
    return await client_for(settings.replace("api", token=TOKEN))


def v1_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path) of every registered /v1 route, ids filled in."""
    out = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith("/v1"):
            out.append((route.method, re.sub(r"\{(\w+)\}", lambda m: IDS[m[1]], path)))
    return out


async def denied(client: Client, method: str, path: str | URL,
                 headers: dict[str, str]) -> None:
    resp = await client.request(method, path, json={}, headers=headers)
    await error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_every_v1_route_needs_the_token(guarded: Client, redis: aioredis.Redis) -> None:
    routes = v1_routes(guarded.app)
    assert {(m, p) for m, p, _, _ in FLOW} <= set(routes)
    async with helpers.unchanged(redis, settle=False):
        for method, path in [*routes, ("GET", "/v1/nope"), ("POST", "/v1/threads/t1")]:
            for value in WRONG:  # (trailing blanks are no test: HTTP strips them)
                await denied(guarded, method, path, {"Authorization": value} if value else {})


async def test_the_token_opens_every_v1_route(guarded: Client) -> None:
    for method, path, payload, status in FLOW:
        resp = await guarded.request(method, path, json=payload, headers=GOOD)
        await body(resp, status)
    for method, path in v1_routes(guarded.app):
        resp = await guarded.request(method, path, json={}, headers=GOOD)
        assert resp.status != 401, (method, path)


async def test_websocket_takes_the_token_in_the_query(guarded: Client) -> None:
    ws = await guarded.ws_connect(f"/v1/ws?token={TOKEN}")
    await ws.close()
    await denied(guarded, "GET", "/v1/ws?token=wrong", {})
    await denied(guarded, "GET", "/v1/ws?token=", {})
    await denied(guarded, "GET", URL("/v1/ws?token=%ff%fe", encoded=True), {})
    await denied(guarded, "GET", f"/v1/threads/t1?token={TOKEN}", {})  # only on /v1/ws


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json"])
async def test_probes_and_openapi_need_no_token(guarded: Client, path: str) -> None:
    await body(await guarded.get(path), 200)


async def test_no_token_configured_asks_nothing(client: Client) -> None:
    for method, path, payload, status in FLOW:
        headers = {"Authorization": "Bearer anything"} if method == "GET" else {}
        await body(await client.request(method, path, json=payload, headers=headers), status)


async def test_undecodable_authorization_header_is_401(guarded: Client) -> None:
    """Header bytes that are not UTF-8 are a wrong token, not a server error."""
    reader, writer = await asyncio.open_connection(guarded.host, guarded.port)
    writer.write(b"GET /v1/threads/t1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Authorization: Bearer \xff\xfe\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 401 ")
