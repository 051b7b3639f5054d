"""URL table and thin handlers (their middlewares are in middlewares.py). No Redis or SQL
here: handlers call the HotTier."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Protocol

import orjson
from aiohttp import web

from proxy import model
from proxy.backends import CH
from proxy.errors import (
    Malformed,
    NotFound,
    TooLarge,
    UnsupportedMediaType,
)
from proxy.failover import Failover
from proxy.hot import HotTier, Page, Result
from proxy.hot.core import ACKNOWLEDGED, LEVELS, REPLICATED
from proxy.hub import WebSocketHub
from proxy.settings import Settings
from proxy.tiers import Tiers
from proxy.writelog import WriteLog, all_dead_letters, replay_all

logger = logging.getLogger(__name__)

class Analytics(Protocol):
    """Answers /stats (ClickHouse)."""

    async def thread_stats(self, tid: str) -> dict[str, Any] | None: ...


class Status(Protocol):
    """The monitor's findings (this process's Monitor, or the worker's, polled)."""

    @property
    def measured(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...
    def stuck(self) -> list[str]: ...
    def lag_s(self, sink: str) -> float: ...


HOT = web.AppKey("hot", HotTier)
TIERS = web.AppKey("tiers", Tiers)
FAILOVER = web.AppKey("failover", Failover)
SETTINGS = web.AppKey("settings", Settings)
STATUS: web.AppKey[Status] = web.AppKey("status")
LOG = web.AppKey("log", WriteLog)
ANALYTICS: web.AppKey[Analytics] = web.AppKey("analytics")
HUB = web.AppKey("hub", WebSocketHub)

_LONG_NUMBER = re.compile(rb"\d{19}")  # 19+ digits: an integer that may not fit in 64 bits


def json_response(body: bytes, status: int = 200, tier: str | None = None,
                  etag: Any = None) -> web.Response:
    resp = web.Response(body=body, status=status, content_type="application/json")
    if tier:
        resp.headers["X-Tier"] = tier
    if etag is not None:
        resp.headers["ETag"] = f'"{etag}"'
    return resp


async def read_json(request: web.Request) -> Any:
    """The JSON body: 415 unless JSON, 413 past the limit (never buffered), 400 if malformed."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as application/json",
                                   {"content_type": request.content_type})
    limit = request.app[SETTINGS].api.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the body is larger than {limit} bytes", {"limit": limit})
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is larger than {limit} bytes", {"limit": limit})
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise Malformed(f"the body is not valid JSON: {e}") from e
    if _LONG_NUMBER.search(raw):
        # orjson turns integers beyond 64 bits into rounded floats. Valid JSON for orjson is
        # valid for json, which keeps them exact, so validation rejects them (422) instead.
        return json.loads(raw)
    return body


def _limits(request: web.Request) -> model.Limits:
    api = request.app[SETTINGS].api
    return model.Limits(api.max_content_chars, api.max_metadata_bytes)


def _if_match(request: web.Request) -> str:
    """The version the client expects ('' = any). A value that is no version never matches."""
    raw = request.headers.get("If-Match")
    if raw is None or raw.strip() == "*":
        return ""
    # An empty tag ("") must not turn into "any": it is a version that never matches.
    return raw.strip().removeprefix("W/").strip('"') or '""'


def _durability(request: web.Request) -> str:
    """The level the write asks for. Absent: `replicated` when redis.ack_replicas is set,
    else `acknowledged`. Present, it must name a level (an empty value names none)."""
    value = request.headers.get("X-Durability")
    if value is None:
        return REPLICATED if request.app[SETTINGS].redis.ack_replicas else ACKNOWLEDGED
    if value.lower() not in LEVELS:
        raise Malformed(f"X-Durability must be one of {', '.join(LEVELS)}",
                        {"header": "X-Durability"})
    return value.lower()


def thread_id_of(request: web.Request) -> str:
    return model.check_id(request.match_info["tid"], "thread_id")


def _mid(request: web.Request) -> str:
    return model.check_id(request.match_info["mid"], "message_id")


def _key(request: web.Request) -> str:
    return model.check_id(request.match_info["key"], "key")


def _version(result: Result) -> int:
    return model.version_of(result.doc)


def _write_response(request: web.Request, result: Result) -> web.Response:
    """201 created / 200, or 202 when the write is stored but did not reach the durability
    the client asked for; X-Durability says the level it did reach, and on a 202 X-Created
    what the 201 would have said."""
    status = 201 if result.created else 200
    resp = json_response(result.doc, status, result.tier, _version(result))
    if LEVELS.index(result.durability) < LEVELS.index(_durability(request)):
        resp.set_status(202)
        resp.headers["X-Created"] = "true" if result.created else "false"
    resp.headers["X-Durability"] = result.durability
    return resp


# ---- threads


async def put_thread(request: web.Request) -> web.Response:
    tid = thread_id_of(request)
    body = model.parse_thread(await read_json(request), _limits(request))
    result = await request.app[TIERS].put_thread(tid, body, _if_match(request),
                                              _durability(request))
    return _write_response(request, result)


async def get_thread(request: web.Request) -> web.Response:
    result = await request.app[TIERS].get_thread(thread_id_of(request))
    return _staleness(request, json_response(result.doc, tier=result.tier,
                                             etag=_version(result)))


def _staleness(request: web.Request, resp: web.Response) -> web.Response:
    """An answer from ClickHouse says how far behind it may be: the age of the `ch` backlog."""
    if resp.headers.get("X-Tier") == "clickhouse":
        resp.headers["X-Staleness-S"] = f"{request.app[STATUS].lag_s(CH.name):.3f}"
    return resp


async def delete_thread(request: web.Request) -> web.Response:
    tid = thread_id_of(request)
    result = await request.app[TIERS].delete_thread(tid, _if_match(request), _durability(request),
                                                    _erase(request))
    return _write_response(request, result)


def _erase(request: web.Request) -> bool:
    """`?erase=true`: remove the content from every tier, every stored version (issue 12.4)."""
    value = request.query.get("erase", "false")
    if value not in ("true", "false") or len(request.query.getall("erase", [])) > 1:
        raise Malformed("erase must be true or false (once)", {"param": "erase"})
    return value == "true"


# ---- messages


async def append_message(request: web.Request) -> web.Response:
    tid = thread_id_of(request)
    body = model.parse_message(await read_json(request), _limits(request))
    result = await request.app[TIERS].append(tid, body, _durability(request))
    return _write_response(request, result)


def _page_query(request: web.Request) -> tuple[str, int, int]:
    q = request.query
    unknown = set(q) - {"limit", "before", "after"}
    if unknown:
        raise Malformed(f"unknown query parameter {sorted(unknown)[0]!r}")
    if "before" in q and "after" in q:
        raise Malformed("give either before or after, not both")
    limit = int_param(q.get("limit", str(model.DEFAULT_PAGE)), "limit", 1, model.MAX_PAGE)
    if "after" in q:
        return "after", int_param(q["after"], "after", 0, model.MAX_CURSOR), limit
    if "before" in q:
        return "before", int_param(q["before"], "before", 1, model.MAX_CURSOR), limit
    return "latest", 0, limit


def int_param(raw: str, name: str, low: int, high: int) -> int:
    # The length bound comes first: int() refuses strings of more than 4300 digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20) or not low <= int(raw) <= high:
        raise Malformed(f"{name} must be a whole number from {low} to {high}", {"param": name})
    return int(raw)


def page_body(page: Page, mode: str) -> bytes:
    """Items ordered by seq, and the cursor of the next page in the same direction."""
    if mode == "after":
        cursor = {"after": page.hi} if page.hi < page.last_seq else None
    else:
        cursor = {"before": page.lo} if page.lo > 1 else None
    head = orjson.dumps({"thread_id": page.thread_id, "last_seq": page.last_seq,
                         "next_cursor": cursor})
    return head[:-1] + b',"items":[' + b",".join(page.items) + b"]}"


async def list_messages(request: web.Request) -> web.Response:
    tid = thread_id_of(request)
    mode, cursor, limit = _page_query(request)
    page = await request.app[TIERS].page(tid, mode, cursor, limit)
    return _staleness(request, json_response(page_body(page, mode), tier=page.tier))


async def get_message(request: web.Request) -> web.Response:
    result = await request.app[TIERS].get_message(thread_id_of(request), _mid(request))
    return _staleness(request, json_response(result.doc, tier=result.tier,
                                             etag=_version(result)))


async def thread_stats(request: web.Request) -> web.Response:
    """Counts and sizes of a thread's live messages, from ClickHouse."""
    tid = thread_id_of(request)
    stats = await request.app[ANALYTICS].thread_stats(tid)
    if stats is None:
        raise NotFound(f"thread {tid} has no events")
    return _staleness(request, json_response(orjson.dumps(stats), tier="clickhouse"))


async def patch_message(request: web.Request) -> web.Response:
    tid, mid = thread_id_of(request), _mid(request)
    patch = model.parse_patch(await read_json(request), _limits(request))
    result = await request.app[TIERS].edit(tid, mid, patch, _if_match(request),
                                          _durability(request))
    return _write_response(request, result)


async def delete_message(request: web.Request) -> web.Response:
    tid, mid = thread_id_of(request), _mid(request)
    result = await request.app[TIERS].delete_message(tid, mid, _if_match(request),
                                                    _durability(request), _erase(request))
    return _write_response(request, result)


# ---- state


async def put_state(request: web.Request) -> web.Response:
    key = _key(request)
    body = model.parse_state(await read_json(request), request.app[SETTINGS].api.max_body_bytes)
    result = await request.app[TIERS].put_state(key, body, _if_match(request), _durability(request))
    return _write_response(request, result)


async def get_state(request: web.Request) -> web.Response:
    result = await request.app[TIERS].get_state(_key(request))
    return json_response(result.doc, tier=result.tier, etag=_version(result))


async def delete_state(request: web.Request) -> web.Response:
    key = _key(request)
    result = await request.app[TIERS].delete_state(key, _if_match(request), _durability(request))
    return _write_response(request, result)


# ---- read markers (issue 12.2)


def _uid(request: web.Request) -> str:
    return model.check_id(request.match_info["uid"], "user_id")


async def put_read_marker(request: web.Request) -> web.Response:
    """Move the marker forward (a lower seq changes nothing): 200 with the marker now."""
    tid, uid = thread_id_of(request), _uid(request)
    seq = model.parse_marker(await read_json(request))
    result = await request.app[TIERS].put_marker(tid, uid, seq, _durability(request))
    status = 202 if LEVELS.index(result.durability) < LEVELS.index(_durability(request)) else 200
    resp = json_response(result.doc, status, result.tier)
    resp.headers["X-Durability"] = result.durability
    return resp


async def get_read_marker(request: web.Request) -> web.Response:
    marker = await request.app[TIERS].get_marker(thread_id_of(request), _uid(request))
    return json_response(marker.body(), tier=marker.tier)


# ---- operations


async def status(request: web.Request) -> web.Response:
    body = request.app[STATUS].status()
    failover = request.app.get(FAILOVER)
    if failover is not None and failover.down:  # this process serves from PostgreSQL alone
        body["tiers"] = {**body["tiers"], "redis": {"state": "down"}}
        body["dead_letters"] = None  # in Redis: unknown now
    else:
        body["dead_letters"] = await all_dead_letters(request.app[LOG], 20)
    body["mode"] = failover.mode if failover is not None else "write-behind"
    return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())


async def replay_dead_letters(request: web.Request) -> web.Response:
    return web.json_response({"replayed": await replay_all(request.app[LOG])})


# ---- push


async def websocket(request: web.Request) -> web.StreamResponse:
    return await request.app[HUB].serve(request)


async def publish_event(request: web.Request) -> web.Response:
    """An ephemeral event: pushed to the thread's subscribers on every sidecar, never stored
    (so no X-Durability, and nothing for PostgreSQL to serve while Redis is down: 503)."""
    tid = thread_id_of(request)
    published = await request.app[HOT].ephemeral.publish(tid, await read_json(request))
    return json_response(published.body(), 202)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_put("/v1/threads/{tid}", put_thread)
    r.add_get("/v1/threads/{tid}", get_thread, allow_head=False)
    r.add_delete("/v1/threads/{tid}", delete_thread)
    r.add_post("/v1/threads/{tid}/messages", append_message)
    r.add_get("/v1/threads/{tid}/messages", list_messages, allow_head=False)
    r.add_get("/v1/threads/{tid}/stats", thread_stats, allow_head=False)
    r.add_get("/v1/threads/{tid}/messages/{mid}", get_message, allow_head=False)
    r.add_patch("/v1/threads/{tid}/messages/{mid}", patch_message)
    r.add_delete("/v1/threads/{tid}/messages/{mid}", delete_message)
    r.add_put("/v1/state/{key}", put_state)
    r.add_get("/v1/state/{key}", get_state, allow_head=False)
    r.add_delete("/v1/state/{key}", delete_state)
    r.add_get("/v1/status", status, allow_head=False)
    r.add_post("/v1/admin/dead-letters/replay", replay_dead_letters)
    r.add_get("/v1/ws", websocket, allow_head=False)
    r.add_post("/v1/threads/{tid}/events", publish_event)  # issue 12.5: ephemeral events
    r.add_put("/v1/threads/{tid}/read-markers/{uid}", put_read_marker)  # issue 12.2
    r.add_get("/v1/threads/{tid}/read-markers/{uid}", get_read_marker, allow_head=False)
    # The inbox and the changes feed (issue 12.3): proxy/routes_feeds.py.
