"""The OpenAPI document's paths: each operation reads as a few facts (success responses, error
statuses, parameters, body)."""

from __future__ import annotations

from proxy.openapi.schemas import STR, Schema, operation, ref, response

ACCEPTED = ("Stored (in Redis, and flushed to PostgreSQL later) but not at the durability asked "
            "for in X-Durability: e.g. `persisted` while PostgreSQL is down. The response's "
            "X-Durability says the level reached. Retrying is safe (same message_id or "
            "If-Match) and tells once it is persisted.")

WS_PROTOCOL = """\
Upgrade to a WebSocket; every frame is a text frame holding one JSON object. With api.token
set, send the bearer header, or (browsers cannot) `?token=<token>` on this path only.

Client to server (`WsClientMessage`):
- `{"op": "subscribe", "thread_id": ..., "after_seq": N}`: the thread's events from now on;
  with `after_seq`, first every message with seq > N (resume with no gap).
- `{"op": "unsubscribe", "thread_id": ...}`, `{"op": "ping"}`

Server to client (`WsServerMessage`):
- `{"type": "message.created"|"message.updated"|"message.deleted", "thread_id", "seq", "message"}`
- `{"type": "thread.created"|"thread.updated"|"thread.deleted", "thread_id", "last_seq", "thread"}`
- `{"type": "subscribed", "thread_id", "last_seq"}`, `{"type": "pong"}`
- `{"type": "error", "code", "message"}` (the socket stays open). Codes: malformed,
  unknown_op, invalid_field, not_found, too_many_subscriptions, unavailable.

Close codes: 1001 when the sidecar shuts down; 4008 when the client reads too slowly.
"""


STATS = """\
From ClickHouse (so as fresh as X-Staleness-S says), over the latest version of each message:
`messages` counts live ones (created minus deleted), `by_role` splits them by role,
`content_bytes` sums their UTF-8 text, `first_at`/`last_at` are the creation times of the first
and last live message (null without any). 404: no event of the thread, or it is deleted.
"""


# ---- paths


def v1_paths() -> Schema:
    entity, write = ["ETag", "X-Tier"], ["If-Match", "X-Durability"]
    done = [*entity, "X-Durability"]
    thread, message, state = ref("Thread"), ref("Message"), ref("StateEntry")

    def ok(description: str, schema: Schema) -> dict[str, Schema]:
        return {"200": response(description, schema, entity)}

    def written(description: str, schema: Schema, created: str = "") -> dict[str, Schema]:
        """A write's answers: 200 (and 201 created), or 202 stored below the durability asked."""
        out = {"200": response(description, schema, done),
               "202": response(ACCEPTED, schema, done)}
        return {"201": response(created, schema, done), **out} if created else out

    def at(*names: str) -> list[Schema]:
        return [ref(n, "parameters") for n in names]

    return {
        "/v1/threads/{tid}": {
            "parameters": at("tid"),
            "put": operation("putThread", "Create or replace a thread",
                             written("Replaced.", thread, "Created."),
                             "400 401 409 412 413 415 422 500 503", params=write,
                             body="ThreadInput"),
            "get": operation("getThread", "A thread, with last_seq", ok("The thread.", thread),
                             "401 404 422 500 503"),
            "delete": operation("deleteThread", "Tombstone a thread",
                                written("The tombstone.", thread),
                                "400 401 404 412 422 500 503", params=write),
        },
        "/v1/threads/{tid}/messages": {
            "parameters": at("tid"),
            "post": operation("appendMessage", "Append a message",
                              written("Same message_id and body again: the original.", message,
                                 "Appended with the thread's next seq."),
                              "400 401 404 409 413 415 422 500 503", params=["X-Durability"],
                              body="MessageInput"),
            "get": operation("listMessages", "A page of messages, ordered by seq",
                             {"200": response("The page.", ref("MessagePage"), ["X-Tier"])},
                             "400 401 404 422 500 503", params=["limit", "before", "after"],
                             description="Without a cursor: the latest page."),
        },
        "/v1/threads/{tid}/messages/{mid}": {
            "parameters": at("tid", "mid"),
            "get": operation("getMessage", "One message", ok("The message.", message),
                             "401 404 422 500 503"),
            "patch": operation("patchMessage", "Edit a message",
                               written("The new version.", message),
                               "400 401 404 412 413 415 422 500 503", params=write,
                               body="MessagePatch"),
            "delete": operation("deleteMessage", "Tombstone a message (its seq stays)",
                                written("The tombstone.", message), "400 401 404 412 422 500 503",
                                params=write),
        },
        "/v1/threads/{tid}/stats": {"parameters": at("tid"), "get": operation(
            "getThreadStats", "Message counts and sizes of a thread",
            {"200": response("The statistics.", ref("ThreadStats"),
                             ["X-Tier", "X-Staleness-S"])}, "401 404 422 500 503",
            description=STATS)},
        "/v1/state/{key}": {
            "parameters": at("key"),
            "put": operation("putState", "Write a state entry",
                             written("Replaced.", state, "Created."),
                             "400 401 412 413 415 422 500 503", params=write, body="StateInput"),
            "get": operation("getState", "A state entry", ok("The entry.", state),
                             "401 404 422 500 503"),
            "delete": operation("deleteState", "Delete a state entry",
                                written("The tombstone.", state),
                                "400 401 404 412 422 500 503", params=write),
        },
        "/v1/status": {"get": operation(
            "getStatus", "Tiers, circuit states, backlog and lag per sink, dead letters",
            {"200": response("The status.", ref("Status"))}, "401 500 503")},
        "/v1/admin/dead-letters/replay": {"post": operation(
            "replayDeadLetters", "Put dead-lettered entries back into their shard's log",
            {"200": response("How many were replayed.", ref("ReplayResult"))}, "401 500 503")},
        "/v1/ws": {"get": operation(
            "webSocket", "Subscribe to threads' events",
            {"101": response("Switching Protocols: the socket is open.")}, "400 401 500 503",
            description=WS_PROTOCOL)},
    }


def probe_paths() -> Schema:
    metrics_port = [{"url": "http://{host}:9750", "description": "the metrics port",
                     "variables": {"host": {"default": "localhost"}}}]
    exposition = {"description": "Text exposition format.",
                  "content": {"text/plain": {"schema": STR}}}
    return {
        "/healthz": {"get": operation("healthz", "Liveness",
                                      {"200": response("Alive.", ref("Health"))}, public=True)},
        "/readyz": {"get": operation(
            "readyz", "Readiness: started, not draining, workers alive, Redis answering",
            {"200": response("Ready.", ref("Readiness")),
             "503": response("Not ready; `problems` says why.", ref("Readiness"))},
            public=True)},
        "/openapi.json": {"get": operation(
            "openapi", "This document", {"200": response("OpenAPI 3.1.", {"type": "object"})},
            public=True)},
        "/metrics": {"servers": metrics_port, "get": operation(
            "metrics", "Prometheus metrics (on the metrics port only)", {"200": exposition},
            public=True)},
    }


