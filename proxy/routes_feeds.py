"""The listing routes beside proxy/routes.py: an owner's inbox (hot.inbox) and a thread's
changes feed (hot.changes, issue 12.3)."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from proxy import model
from proxy.errors import Malformed, NotFound
from proxy.hot import Feed
from proxy.routes import TIERS, int_param, json_response, thread_id_of

# ---- inbox


def _inbox_query(request: web.Request) -> tuple[str, model.InboxKey | None, int, str]:
    q = request.query
    unknown = set(q) - {"owner_id", "limit", "before", "user_id"}
    if unknown:
        raise Malformed(f"unknown query parameter {sorted(unknown)[0]!r}")
    if "owner_id" not in q:
        raise Malformed("owner_id is required", {"param": "owner_id"})
    owner = model.check_id(q["owner_id"], "owner_id")
    limit = int_param(q.get("limit", str(model.DEFAULT_INBOX)), "limit", 1, model.MAX_INBOX)
    before = model.parse_inbox_cursor(q["before"]) if "before" in q else None
    user = model.check_id(q["user_id"], "user_id") if "user_id" in q else ""
    return owner, before, limit, user


async def list_inbox(request: web.Request) -> web.Response:
    """An owner's threads, newest activity first (hot.inbox); with `user_id`, each with the
    user's unread count (read markers)."""
    owner, before, limit, user = _inbox_query(request)
    page = await request.app[TIERS].inbox(owner, before, limit)
    items = await _with_unread(request, page.items, user) if user else page.items
    cursor = model.inbox_cursor(page.next_cursor) if page.next_cursor else None
    head = orjson.dumps({"owner_id": owner, "next_cursor": cursor})
    return json_response(head[:-1] + b',"items":[' + b",".join(items) + b"]}",
                         tier=page.tier)


async def _with_unread(request: web.Request, docs: list[bytes], user: str) -> list[bytes]:
    """Each thread doc with `unread`, asked for all threads at once (one pipelined tick); a
    thread deleted since the page was read is left out, as deleted threads are."""
    tiers = request.app[TIERS]
    tids = [orjson.loads(doc)["thread_id"] for doc in docs]
    counts = await asyncio.gather(*(tiers.unread(tid, user) for tid in tids),
                                  return_exceptions=True)
    out = []
    for doc, count in zip(docs, counts, strict=True):
        if isinstance(count, NotFound):
            continue
        if isinstance(count, BaseException):
            raise count
        out.append(doc[:-1] + b',"unread":%d}' % count)
    return out


# ---- the changes feed


def _changes_query(request: web.Request) -> tuple[int, int]:
    q = request.query
    unknown = set(q) - {"after_cseq", "limit"}
    if unknown:
        raise Malformed(f"unknown query parameter {sorted(unknown)[0]!r}")
    after = int_param(q.get("after_cseq", "0"), "after_cseq", 0, model.MAX_CURSOR)
    return after, int_param(q.get("limit", str(model.DEFAULT_PAGE)), "limit", 1, model.MAX_PAGE)


def changes_body(feed: Feed) -> bytes:
    """The current docs by cseq (kind thread or message), and the position to go on from."""
    cursor = {"after_cseq": feed.upto} if feed.upto < feed.last_cseq else None
    head = orjson.dumps({"thread_id": feed.thread_id, "last_cseq": feed.last_cseq,
                         "next_cursor": cursor})
    items = (b'{"kind":"%s","doc":%s}' % (b"message" if c.member else b"thread", c.doc)
             for c in feed.items)
    return head[:-1] + b',"items":[' + b",".join(items) + b"]}"


async def list_changes(request: web.Request) -> web.Response:
    tid = thread_id_of(request)
    after, limit = _changes_query(request)
    feed = await request.app[TIERS].changes(tid, after, limit)
    return json_response(changes_body(feed), tier=feed.tier)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/threads", list_inbox, allow_head=False)  # inbox (hot.inbox)
    r.add_get("/v1/threads/{tid}/changes", list_changes, allow_head=False)  # issue 12.3
