"""The OpenAPI document's paths: each operation reads as a few facts (success responses, error
statuses, parameters, body)."""

from __future__ import annotations

from proxy.openapi.schemas import STR, Schema, operation, ref, response
from proxy.settings import Metrics

ACCEPTED = ("Stored (in Redis, and flushed to PostgreSQL later) but not at the durability asked "
            "for in X-Durability: e.g. `persisted` while PostgreSQL is down, `replicated` "
            "while too few replicas answer within redis.ack_timeout_ms. The response's "
            "X-Durability says the level reached. Retrying is safe (same message_id or "
            "If-Match) and tells once it is persisted.")

WS_PROTOCOL = """\
Upgrade to a WebSocket; every frame is a text frame holding one JSON object. With api.token
set, send the bearer header, or (browsers cannot) `?token=<token>` on this path only. A GET
without the WebSocket handshake (`Upgrade: websocket` and its headers) is answered 400.

Client to server (`WsClientMessage`):
- `{"op": "subscribe", "thread_id": ..., "after_seq": N}`: the thread's events from now on;
  with `after_seq`, first every message with seq > N (resume with no gap). With
  `after_cseq: C` instead, the thread's changes: first the current doc of every entity changed
  after cseq C (as the event of its latest change), then every event live, each change once
  and in cseq order; a position past the thread's last cseq ends the subscription with a
  `resync` error frame carrying the current `cseq`.
- `{"op": "unsubscribe", "thread_id": ...}`, `{"op": "ping"}`
- `{"op": "publish", "thread_id": ..., "event": {"type", "data"}}`: an ephemeral event, as
  POST /v1/threads/{tid}/events (no reply; an error frame with `"op": "publish"` if refused).

Server to client (`WsServerMessage`):
- `{"type": "message.created"|"message.updated"|"message.deleted", "thread_id", "seq", "cseq",
  "message"}`
- `{"type": "thread.created"|"thread.updated"|"thread.deleted", "thread_id", "last_seq", "cseq",
  "thread"}` (replayed by after_cseq: without last_seq)
- `{"type": "read.updated", "thread_id", "seq", "user_id"}`: a user's read marker moved to seq
- `{"type": "subscribed", "thread_id", "last_seq"}`, `{"type": "pong"}`
- `{"type": "ephemeral", "thread_id", "ts", "event": {"type", "data"}}`: live only, never
  replayed on resume, not in the seq stream
- `{"type": "error", "code", "message"}` (the socket stays open). Codes: malformed,
  unknown_op, invalid_field, not_found, too_many_subscriptions, unavailable, resync (with
  `cseq`), and for a publish too_large, rate_limited (with `retry_after_ms`).

Close codes: 1001 when the sidecar shuts down; 4008 when the client reads too slowly.
"""


MARKERS = """\
A user's read position in a thread. PUT moves it forward only: a seq at or below the current
one changes nothing and answers the current marker (200 either way); a seq past the thread's
last_seq is 422. A move is pushed to the thread's subscribers as `read.updated`. While Redis is
down (redis.write_through), PUT moves it forward in PostgreSQL (X-Tier: postgres).
"""

UNREAD = """\
`unread` counts the thread's live (not deleted) messages after `seq`, right on every sidecar
after any append or delete. A user without a marker is at seq 0. X-Tier `postgres`: part of
the count came from below the Redis window (or Redis is down).
"""

STATS = """\
From ClickHouse (so as fresh as X-Staleness-S says), over the latest version of each message:
`messages` counts live ones (created minus deleted), `by_role` splits them by role,
`content_bytes` sums their UTF-8 text, `first_at`/`last_at` are the creation times of the first
and last live message (null without any). 404: no event of the thread, or it is deleted.
"""


INBOX = """\
Threads whose owner_id is the given one, newest last activity first (the later of the last
message appended and the last change of the thread), deleted ones left out; right on every
sidecar right after any write. `next_cursor` goes in `before` for the next page. 503 while
PostgreSQL is unreachable (it holds the threads Redis no longer does). X-Tier: postgres when
some thread came from PostgreSQL.
"""


CHANGES = """\
Every change of the thread or one of its messages takes the thread's next change number (cseq,
gapless); each doc carries the cseq of its latest change. The feed answers each entity (the
thread, kind `thread`, or a message) whose latest change is after `after_cseq`, once, with its
current doc, by cseq; `next_cursor` continues it, `last_cseq` is the thread's last change.
409 `resync` (with `detail.cseq`): `after_cseq` is past the last change (a Redis that lost
data): start again from the current state.
"""


# ---- links: where a response's ids lead (the stateful tests follow them)

TID = {"tid": "$request.path.tid"}
MID = {**TID, "mid": "$response.body#/message_id"}
KEY = {"key": "$request.path.key"}
CURRENT = {"header.If-Match": "$response.header.ETag"}  # compare-and-set on what was answered


def link(op_id: str, description: str, params: dict[str, str]) -> Schema:
    return {"operationId": op_id, "parameters": params, "description": description}


def thread_links() -> Schema:
    return {"GetThread": link("getThread", "Read the thread back.", TID),
            "ReplaceThread": link("putThread", "Replace it at the version answered.",
                                  {**TID, **CURRENT}),
            "DeleteThread": link("deleteThread", "Tombstone it at the version answered.",
                                 {**TID, **CURRENT}),
            "AppendMessage": link("appendMessage", "Append to it.", TID),
            "ListMessages": link("listMessages", "Read its messages.", TID),
            "ListChanges": link("listChanges", "Read its changes.", TID)}


def message_links() -> Schema:
    return {"GetMessage": link("getMessage", "Read the message back.", MID),
            "EditMessage": link("patchMessage", "Edit it at the version answered.",
                                {**MID, **CURRENT}),
            "DeleteMessage": link("deleteMessage", "Tombstone it at the version answered.",
                                  {**MID, **CURRENT}),
            "ListMessages": link("listMessages", "Read its thread's messages.", TID)}


def state_links() -> Schema:
    return {"GetState": link("getState", "Read the entry back.", KEY),
            "ReplaceState": link("putState", "Replace it at the version answered.",
                                 {**KEY, **CURRENT}),
            "DeleteState": link("deleteState", "Delete it at the version answered.",
                                {**KEY, **CURRENT})}


def read_back(op_id: str, params: dict[str, str]) -> Schema:
    """After a tombstone: reading it again answers 404."""
    return {"GetDeleted": link(op_id, "Read it again: 404.", params)}


# ---- paths


def v1_paths() -> Schema:
    entity, write = ["ETag", "X-Tier"], ["If-Match", "X-Durability"]
    done = [*entity, "X-Durability"]
    thread, message, state = ref("Thread"), ref("Message"), ref("StateEntry")

    def ok(description: str, schema: Schema) -> dict[str, Schema]:
        return {"200": response(description, schema, entity)}

    def written(description: str, schema: Schema, links: Schema,
                created: str = "") -> dict[str, Schema]:
        """A write's answers: 200 (and 201 created), or 202 stored below the durability asked;
        each leads on by `links`."""
        out = {"200": response(description, schema, done, links),
               "202": response(ACCEPTED, schema, [*done, "X-Created"], links)}
        return {"201": response(created, schema, done, links), **out} if created else out

    def at(*names: str) -> list[Schema]:
        return [ref(n, "parameters") for n in names]

    return {
        "/v1/threads/{tid}": {
            "parameters": at("tid"),
            "put": operation("putThread", "Create or replace a thread",
                             written("Replaced.", thread, thread_links(), "Created."),
                             "400 409 412 413 415 422 500 503", params=write,
                             body="ThreadInput"),
            "get": operation("getThread", "A thread, with last_seq", ok("The thread.", thread),
                             "404 422 500 503"),
            "delete": operation("deleteThread", "Tombstone (or erase) a thread",
                                written("The tombstone.", thread, read_back("getThread", TID)),
                                "400 404 412 422 500 503", params=[*write, "erase"]),
        },
        "/v1/threads/{tid}/messages": {
            "parameters": at("tid"),
            "post": operation("appendMessage", "Append a message",
                              written("Same message_id and body again: the original.", message,
                                      message_links(), "Appended with the thread's next seq."),
                              "400 404 409 413 415 422 500 503", params=["X-Durability"],
                              body="MessageInput"),
            "get": operation("listMessages", "A page of messages, ordered by seq",
                             {"200": response("The page.", ref("MessagePage"), ["X-Tier"])},
                             "400 404 422 500 503", params=["page"],
                             description="Without a cursor: the latest page."),
        },
        "/v1/threads/{tid}/messages/{mid}": {
            "parameters": at("tid", "mid"),
            "get": operation("getMessage", "One message", ok("The message.", message),
                             "404 422 500 503"),
            "patch": operation("patchMessage", "Edit a message",
                               written("The new version.", message, message_links()),
                               "400 404 412 413 415 422 500 503", params=write,
                               body="MessagePatch"),
            "delete": operation("deleteMessage",
                                "Tombstone (or erase) a message (its seq stays)",
                                written("The tombstone.", message, read_back("getMessage", MID)),
                                "400 404 412 422 500 503", params=[*write, "erase"]),
        },
        "/v1/threads/{tid}/changes": {"parameters": at("tid"), "get": operation(
            "listChanges", "The current doc of everything changed after a cseq",
            {"200": response("A page of the feed.", ref("ChangePage"), ["X-Tier"])},
            "400 404 409 422 500 503", params=["changes"], description=CHANGES)},
        "/v1/threads/{tid}/stats": {"parameters": at("tid"), "get": operation(
            "getThreadStats", "Message counts and sizes of a thread",
            {"200": response("The statistics.", ref("ThreadStats"),
                             ["X-Tier", "X-Staleness-S"])}, "404 422 500 503",
            description=STATS)},
        "/v1/state/{key}": {
            "parameters": at("key"),
            "put": operation("putState", "Write a state entry",
                             written("Replaced.", state, state_links(), "Created."),
                             "400 412 413 415 422 500 503", params=write, body="StateInput"),
            "get": operation("getState", "A state entry", ok("The entry.", state),
                             "404 422 500 503"),
            "delete": operation("deleteState", "Delete a state entry",
                                written("The tombstone.", state, read_back("getState", KEY)),
                                "400 404 412 422 500 503", params=write),
        },
        "/v1/threads/{tid}/read-markers/{uid}": {
            "parameters": at("tid", "uid"),
            "put": operation("putReadMarker", "Move a user's read marker forward",
                             {"200": response("The marker now.", ref("ReadMarkerPosition"),
                                              ["X-Tier", "X-Durability"]),
                              "202": response(ACCEPTED, ref("ReadMarkerPosition"),
                                              ["X-Tier", "X-Durability"])},
                             "400 404 413 415 422 500 503", params=["X-Durability"],
                             body="ReadMarkerInput", description=MARKERS),
            "get": operation("getReadMarker", "A user's read marker and unread count",
                             {"200": response("The marker.", ref("ReadMarker"), ["X-Tier"])},
                             "404 422 500 503", description=UNREAD),
        },
        "/v1/threads": {"get": operation(
            "listInbox", "An owner's threads, newest activity first",
            {"200": response("The page.", ref("InboxPage"), ["X-Tier"])}, "400 422 500 503",
            params=["owner_id", "inboxUser", "inboxLimit", "inboxBefore"],
            description=INBOX)},
        "/v1/status": {"get": operation(
            "getStatus", "Tiers, circuit states, backlog and lag per sink, dead letters",
            {"200": response("The status.", ref("Status"))}, "500 503")},
        "/v1/admin/dead-letters/replay": {"post": operation(
            "replayDeadLetters", "Put dead-lettered entries back into their shard's log",
            {"200": response("How many were replayed.", ref("ReplayResult"))}, "500 503")},
        "/v1/ws": {"get": operation(
            "webSocket", "Subscribe to threads' events",
            {"101": response("Switching Protocols: the socket is open.")}, "400 500 503",
            description=WS_PROTOCOL)},
    }


def probe_paths(metrics: Metrics) -> Schema:
    metrics_port = [{"url": f"http://{{host}}:{metrics.port}", "description": "the metrics port",
                     "variables": {"host": {"default": "localhost"}}}]
    exposition = {"description": "Text exposition format.",
                  "content": {"text/plain": {"schema": STR}}}
    return {
        "/healthz": {"get": operation("healthz", "Liveness",
                                      {"200": response("Alive.", ref("Health"))})},
        "/readyz": {"get": operation(
            "readyz", "Readiness: started, not draining, workers alive, Redis answering",
            {"200": response("Ready.", ref("Readiness")),
             "503": response("Not ready; `problems` says why.", ref("Readiness"))})},
        "/openapi.json": {"get": operation(
            "openapi", "This document", {"200": response("OpenAPI 3.1.", {"type": "object"})})},
        "/metrics": {"servers": metrics_port, "get": operation(
            "metrics", "Prometheus metrics (on the metrics port only)", {"200": exposition})},
    }


