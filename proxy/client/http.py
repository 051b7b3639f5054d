"""Client: one typed method per route of the tierproxy API (asyncio).

Every method raises the typed errors of `proxy.client.errors` and repeats itself only where
that is safe (see `proxy.client.retry`). A route the client does not know yet is one call
away with `request()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any

from proxy.client.errors import NotFound, PreconditionFailed
from proxy.client.results import (
    ChangePage,
    Durability,
    InboxPage,
    Marker,
    Page,
    Read,
    Written,
    created_of,
    durability_of,
    etag,
    new_message_id,
    version_from,
)
from proxy.client.retry import NO_RETRY, RetryPolicy
from proxy.client.transport import Answer, Transport
from proxy.client.ws import RECONNECT, Subscription


class Client:
    """An asyncio client of one sidecar. Use it as `async with Client(url) as c:` (or call
    `close()`); connections are pooled and reused. `durability` is the default level every
    write asks for (per call: `durability=`); `token` the API's bearer token."""

    def __init__(self, base_url: str = "http://127.0.0.1:8750", *, token: str | None = None,
                 retry: RetryPolicy | None = None, timeout_s: float = 10.0,
                 durability: Durability | None = None, connections: int = 100) -> None:
        self._t = Transport(base_url, token=token, retry=retry or RetryPolicy(),
                            timeout_s=timeout_s, connections=connections)
        self._durability = durability

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._t.close()

    # ---- threads

    async def put_thread(self, thread_id: str, *, title: str = "", owner_id: str = "",
                         metadata: Mapping[str, Any] | None = None, if_match: int | None = None,
                         durability: Durability | None = None) -> Written:
        """Create (created=True) or replace the thread. A thread once deleted: Conflict."""
        body = {"title": title, "owner_id": owner_id, "metadata": dict(metadata or {})}
        return await self._write("PUT", ("threads", thread_id), body, if_match, durability)

    async def get_thread(self, thread_id: str) -> Read:
        """The thread with its `last_seq`."""
        return _read(await self._get("threads", thread_id))

    async def delete_thread(self, thread_id: str, *, if_match: int | None = None,
                            durability: Durability | None = None,
                            erase: bool = False) -> Written:
        """Tombstone the thread; later puts of it get Conflict. With `erase`, its content
        and its messages' are removed from every tier, every stored version included."""
        return await self._write("DELETE", ("threads", thread_id), None, if_match, durability,
                                 params=_erase(erase))

    async def inbox(self, owner_id: str, *, user_id: str | None = None,
                    limit: int | None = None, before: str | None = None) -> InboxPage:
        """One page of the owner's threads, newest activity first (server default 50, at
        most 200); with `user_id`, each carries that user's `unread` count. `before`: a
        page's `next_cursor`."""
        params = {k: v for k, v in (("owner_id", owner_id), ("user_id", user_id),
                                    ("limit", None if limit is None else str(limit)),
                                    ("before", before)) if v is not None}
        answer = await self._get("threads", params=params)
        doc = answer.json()
        return InboxPage(doc["owner_id"], doc["items"], doc["next_cursor"],
                         answer.headers.get("X-Tier"))

    async def inbox_pages(self, owner_id: str, *, user_id: str | None = None,
                          limit: int = 100) -> AsyncIterator[InboxPage]:
        """Every page of the owner's inbox, newest activity first, until the oldest thread.
        A full page has a `next_cursor` even when nothing follows: that empty page is not
        yielded (the first one always is)."""
        before = None
        while True:
            page = await self.inbox(owner_id, user_id=user_id, limit=limit, before=before)
            if page.items or before is None:
                yield page
            if page.next_cursor is None:
                return
            before = page.next_cursor

    # ---- the changes feed

    async def changes(self, thread_id: str, *, after_cseq: int = 0,
                      limit: int | None = None) -> ChangePage:
        """The current doc of every entity (the thread, its messages) changed after
        `after_cseq`, by cseq, one page. Resync (409, `detail["cseq"]`) when the position is
        past the thread's last change: start again from the current state."""
        params = {"after_cseq": str(after_cseq)}
        if limit is not None:
            params["limit"] = str(limit)
        answer = await self._get("threads", thread_id, "changes", params=params)
        doc = answer.json()
        return ChangePage(doc["thread_id"], doc["last_cseq"], doc["items"], doc["next_cursor"],
                          answer.headers.get("X-Tier"))

    async def change_pages(self, thread_id: str, *, after_cseq: int = 0,
                           limit: int = 100) -> AsyncIterator[ChangePage]:
        """Every page of the changes feed after `after_cseq`, until caught up with the
        thread's last cseq at the time of reading."""
        while True:
            page = await self.changes(thread_id, after_cseq=after_cseq, limit=limit)
            yield page
            if page.next_cursor is None:
                return
            after_cseq = page.next_cursor["after_cseq"]

    # ---- read markers

    async def put_read_marker(self, thread_id: str, user_id: str, seq: int, *,
                              durability: Durability | None = None) -> Marker:
        """Move the user's marker forward to `seq` (a lower one changes nothing: the answer
        is the marker now, so a repeat is harmless). Unavailable while Redis is down."""
        asked = durability or self._durability
        headers = {"X-Durability": asked} if asked else {}
        answer = await self._t.call("PUT", self._t.url("v1", "threads", thread_id,
                                                       "read-markers", user_id),
                                    body={"seq": seq}, headers=headers, idempotent=True)
        doc = answer.json()
        return Marker(doc["thread_id"], doc["user_id"], doc["seq"], None,
                      answer.headers.get("X-Tier"),
                      durability_of(answer.status, answer.headers, asked))

    async def get_read_marker(self, thread_id: str, user_id: str) -> Marker:
        """The user's marker (seq 0 if none) and the live messages after it (`unread`)."""
        answer = await self._get("threads", thread_id, "read-markers", user_id)
        doc = answer.json()
        return Marker(doc["thread_id"], doc["user_id"], doc["seq"], doc["unread"],
                      answer.headers.get("X-Tier"))

    async def thread_stats(self, thread_id: str) -> dict[str, Any]:
        """Counts and sizes of the thread's live messages (from ClickHouse, so they follow
        the writes with the ClickHouse flush's delay)."""
        doc: dict[str, Any] = (await self._get("threads", thread_id, "stats")).json()
        return doc

    # ---- messages

    async def append(self, thread_id: str, content: str, *, role: str = "user",
                     metadata: Mapping[str, Any] | None = None, message_id: str | None = None,
                     durability: Durability | None = None) -> Written:
        """Append a message. Without `message_id` one is generated, so a retried append can
        never land twice; with yours, an append seen before returns the original (created
        False) and one with another body raises Conflict."""
        generated = message_id is None
        body = {"message_id": message_id or new_message_id(), "role": role, "content": content,
                "metadata": dict(metadata or {})}
        written = await self._write("POST", ("threads", thread_id, "messages"), body, None,
                                    durability)
        if generated and not written.created:  # our own earlier attempt created it
            return replace(written, created=True)
        return written

    async def list_messages(self, thread_id: str, *, limit: int | None = None,
                            before: int | None = None, after: int | None = None) -> Page:
        """One page: the latest `limit` (server default 50), or those just below `before`,
        or just above `after`; `next_cursor` continues in the same direction."""
        params = {k: str(v) for k, v in (("limit", limit), ("before", before),
                                         ("after", after)) if v is not None}
        answer = await self._get("threads", thread_id, "messages", params=params)
        doc = answer.json()
        return Page(doc["thread_id"], doc["last_seq"], doc["items"], doc["next_cursor"],
                    answer.headers.get("X-Tier"))

    async def pages(self, thread_id: str, *, after: int | None = None,
                    before: int | None = None, limit: int = 100) -> AsyncIterator[Page]:
        """Every page in one direction: forward from `after` (0 = the first message) until
        the last seq at the time of reading, or backward from `before` (None = the latest)
        down to seq 1. Items within a page are always in seq order."""
        if after is not None and before is not None:
            raise ValueError("pages: give after (forward) or before (backward), not both")
        cursor = {"after": after} if after is not None else (
            {"before": before} if before is not None else {})
        while True:
            page = await self.list_messages(thread_id, limit=limit, **cursor)
            yield page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def messages(self, thread_id: str, *, after: int | None = None,
                       before: int | None = None, limit: int = 100
                       ) -> AsyncIterator[dict[str, Any]]:
        """Every message in the direction of `pages()`: forward in ascending seq, backward
        newest first. Deleted messages come as tombstones (`deleted: true`)."""
        async for page in self.pages(thread_id, after=after, before=before, limit=limit):
            for item in page.items if after is not None else reversed(page.items):
                yield item

    async def get_message(self, thread_id: str, message_id: str) -> Read:
        return _read(await self._get("threads", thread_id, "messages", message_id))

    async def edit_message(self, thread_id: str, message_id: str, *, role: str | None = None,
                           content: str | None = None,
                           metadata: Mapping[str, Any] | None = None,
                           if_match: int | None = None,
                           durability: Durability | None = None) -> Written:
        """Change any of role, content, metadata. Repeated after a lost answer only with
        `if_match` (a repeat then applies once or raises PreconditionFailed, ambiguous)."""
        body = {k: v for k, v in (("role", role), ("content", content),
                                  ("metadata", None if metadata is None else dict(metadata)))
                if v is not None}
        return await self._write("PATCH", ("threads", thread_id, "messages", message_id), body,
                                 if_match, durability, idempotent=if_match is not None)

    async def delete_message(self, thread_id: str, message_id: str, *,
                             if_match: int | None = None,
                             durability: Durability | None = None,
                             erase: bool = False) -> Written:
        """Tombstone the message (it keeps its seq, loses its text). With `erase`, its
        content is removed from every tier, every stored version included."""
        return await self._write("DELETE", ("threads", thread_id, "messages", message_id),
                                 None, if_match, durability, params=_erase(erase))

    # ---- state

    async def put_state(self, key: str, value: Any, *, ttl_s: float | None = None,
                        if_match: int | None = None,
                        durability: Durability | None = None) -> Written:
        """Set the entry; with `if_match`, only if it is still at that version (a missing
        entry never matches: creation cannot be conditional)."""
        body = {"value": value} if ttl_s is None else {"value": value, "ttl": ttl_s}
        return await self._write("PUT", ("state", key), body, if_match, durability)

    async def get_state(self, key: str) -> Read:
        """The entry `{"key", "value", "version", "expires_at", ...}`; NotFound if absent
        or expired."""
        return _read(await self._get("state", key))

    async def delete_state(self, key: str, *, if_match: int | None = None,
                           durability: Durability | None = None) -> Written:
        return await self._write("DELETE", ("state", key), None, if_match, durability)

    async def update_state(self, key: str, change: Callable[[Any], Any], *,
                           ttl_s: float | None = None, attempts: int = 10) -> Written:
        """Read-modify-write: put `change(current value)` (None when absent) with If-Match
        on the version read, again from a fresh read while others win the race. A 412 that
        may follow our own lost write (`ambiguous`) is raised, not retried: applying the
        change twice could be wrong. Creating an absent entry is not conditional."""
        for _ in range(attempts):
            try:
                current = await self.get_state(key)
                value, version = current.doc["value"], current.version
            except NotFound:
                value, version = None, None
            try:
                return await self.put_state(key, change(value), ttl_s=ttl_s, if_match=version)
            except PreconditionFailed as e:
                if e.ambiguous:
                    raise
        raise PreconditionFailed(f"state {key}: still changing after {attempts} attempts",
                                 code="precondition_failed", status=412, attempts=attempts)

    # ---- ephemeral events

    async def publish_event(self, thread_id: str, event_type: str,
                            data: Any = None) -> dict[str, Any]:
        """Push an ephemeral event (a typing indicator, a streamed reply's next tokens) to the
        thread's subscribers, as `Event(type="ephemeral", ephemeral={"type", "data"})`: never
        stored. Repeated only when surely not processed (a refused connection, a 429 after
        its Retry-After), never after a lost answer (it could arrive twice). Returns
        `{"thread_id", "type", "ts"}`."""
        answer = await self._t.call("POST", self._t.url("v1", "threads", thread_id, "events"),
                                    body={"type": event_type, "data": data}, idempotent=False)
        doc: dict[str, Any] = answer.json()
        return doc

    # ---- operations

    async def status(self) -> dict[str, Any]:
        """Tiers, circuit states, backlog and lag per sink, dead letters."""
        doc: dict[str, Any] = (await self._get("status")).json()
        return doc

    async def replay_dead_letters(self) -> int:
        """Put dead letters back in the log (after a fix); how many. Never repeated once it
        may have reached the server."""
        answer = await self._t.call("POST", self._t.url("v1", "admin", "dead-letters",
                                                        "replay"), idempotent=False)
        return int(answer.json()["replayed"])

    async def ready(self) -> bool:
        """/readyz, asked once: False while starting, draining or unable to reach Redis."""
        answer = await self.request("GET", "/readyz", retry=NO_RETRY, expect_error=True)
        return answer.status == 200

    async def request(self, method: str, path: str, *, json: Any = None,
                      data: bytes | None = None, headers: Mapping[str, str] | None = None,
                      params: Mapping[str, str] | None = None, idempotent: bool | None = None,
                      retry: RetryPolicy | None = None, expect_error: bool = False) -> Answer:
        """Any route, e.g. one newer than this client (`path` like "/v1/threads/t1").
        Repeated as described in `proxy.client.retry`; `idempotent` defaults to True but
        for POST and PATCH. With `expect_error`, an error answer is returned, not raised."""
        url = self._t.url_of(path)
        if idempotent is None:
            idempotent = method not in ("POST", "PATCH")
        return await self._t.call(method, url, body=json, data=data, headers=headers,
                                  params=params, idempotent=idempotent, retry=retry,
                                  expect_error=expect_error)

    # ---- push

    def subscribe(self, *thread_ids: str, after_seq: int | None = None,
                  after_cseq: int | None = None, heartbeat_s: float = 20.0,
                  reconnect: RetryPolicy | None = None, resume: bool = True) -> Subscription:
        """Events of the threads, resumed with no gap and no duplicate after any disconnect
        (see `Subscription`). `after_seq`: first every message after that seq, then live.
        `after_cseq` instead: the threads' changes, first the current doc of everything
        changed after that cseq, then every change live, each once. `heartbeat_s`: a socket
        that answers no ping within half of it is dropped and resumed; `reconnect`: how long
        to keep trying to reconnect (ws.RECONNECT); `resume=False`: a socket that ends ends
        the iteration instead."""
        if after_seq is not None and after_cseq is not None:
            raise ValueError("subscribe: give after_seq or after_cseq, not both")
        after = after_seq if after_cseq is None else after_cseq
        return Subscription(self._t, {tid: after for tid in thread_ids},
                            heartbeat_s=heartbeat_s, retry=reconnect or RECONNECT,
                            changes=after_cseq is not None, resume=resume)

    # ---- plumbing

    async def _get(self, *segments: str, params: Mapping[str, str] | None = None) -> Answer:
        return await self._t.call("GET", self._t.url("v1", *segments), params=params,
                                  idempotent=True)

    async def _write(self, method: str, segments: tuple[str, ...], body: Any,
                     if_match: int | None, durability: Durability | None, *,
                     idempotent: bool = True,
                     params: Mapping[str, str] | None = None) -> Written:
        headers = {}
        if if_match is not None:
            headers["If-Match"] = etag(if_match)
        asked = durability or self._durability
        if asked:
            headers["X-Durability"] = asked
        answer = await self._t.call(method, self._t.url("v1", *segments), body=body,
                                    headers=headers, params=params, idempotent=idempotent)
        return Written(answer.json(), created_of(answer.status, answer.headers),
                       version_from(answer.headers),
                       durability_of(answer.status, answer.headers, asked), answer.status,
                       answer.attempts)


def _erase(erase: bool) -> dict[str, str] | None:
    return {"erase": "true"} if erase else None


def _read(answer: Answer) -> Read:
    stale = answer.headers.get("X-Staleness-S")
    return Read(answer.json(), version_from(answer.headers), answer.headers.get("X-Tier"),
                float(stale) if stale is not None else None)

