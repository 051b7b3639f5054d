"""The OpenAPI document's building blocks and components: schemas of every body, parameter,
header and error response, with the size limits of the settings it describes (settings.Api)."""

from __future__ import annotations

from typing import Any

from proxy.backends import SINKS
from proxy.keys import ID_PATTERN
from proxy.model import (
    DEFAULT_INBOX,
    DEFAULT_PAGE,
    INBOX_CURSOR,
    MAX_CURSOR,
    MAX_INBOX,
    MAX_PAGE,
    TTL_MAX_S,
)
from proxy.settings import Api

Schema = dict[str, Any]

NO_NUL = "^[^\\u0000]*$"
JSON = "application/json"
STR: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}

# ---- helpers


def ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def obj(props: Schema, required: str = "*", closed: bool = False, **extra: Any) -> Schema:
    """An object schema; `required` names the required properties ("*": all of them)."""
    names = list(props) if required == "*" else required.split()
    schema: Schema = {"type": "object", "properties": props, **extra}
    if names:
        schema["required"] = names
    if closed:
        schema["additionalProperties"] = False
    return schema


def text(max_len: int, min_len: int = 0) -> Schema:
    """A string as model._str accepts it: at most `max_len` characters, no NUL."""
    schema: Schema = {"type": "string", "maxLength": max_len, "pattern": NO_NUL}
    return {**schema, "minLength": min_len} if min_len else schema


def integer(minimum: int = 0, maximum: int | None = None) -> Schema:
    schema: Schema = {"type": "integer", "minimum": minimum}
    return schema if maximum is None else {**schema, "maximum": maximum}


def stamp(nullable: bool = False) -> Schema:
    """UTC with milliseconds, e.g. 2026-11-27T06:50:00.123Z."""
    return {"type": ["string", "null"] if nullable else "string", "format": "date-time"}


def const(value: str) -> Schema:
    return {"type": "string", "const": value}


def response(description: str, schema: Schema | None = None,
             headers: list[str] | None = None, links: Schema | None = None) -> Schema:
    out: Schema = {"description": description}
    if schema is not None:
        out["content"] = {JSON: {"schema": schema}}
    if headers:
        out["headers"] = {h: ref(h, "headers") for h in headers}
    if links:
        out["links"] = links
    return out


def operation(op_id: str, summary: str, ok: dict[str, Schema], errors: str = "", *,
              params: list[str] | None = None, body: str | None = None,
              description: str = "") -> Schema:
    """`ok` maps success statuses to responses; `errors` lists the error statuses (401 and
    the security requirement are the document's to add: only when api.token is set)."""
    op: Schema = {"operationId": op_id, "summary": summary}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = [ref(p, "parameters") for p in params]
    if body:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(body)}}}
    op["responses"] = {**ok, **{code: ref(ERRORS[code][0], "responses")
                                for code in errors.split()}}
    return op


def authenticated(op: Schema) -> Schema:
    """The operation behind the bearer token: it may answer 401."""
    responses = {**op["responses"], "401": ref("Unauthorized", "responses")}
    return {**op, "responses": dict(sorted(responses.items())), "security": [{"bearer": []}]}


# ---- components

ERRORS = {
    "400": ("Malformed", "`malformed`: bad JSON, query parameter or X-Durability."),
    "401": ("Unauthorized", "`unauthorized`: api.token is set; bearer token missing/wrong."),
    "404": ("NotFound", "`not_found`: unknown or deleted."),
    "409": ("Conflict", "`conflict`: thread deleted, or message id exists with another body; "
                        "`resync` (changes feed): after_cseq is past the thread's last "
                        "change, `detail.cseq` (start again from the current state)."),
    "412": ("PreconditionFailed", "`precondition_failed`: stale If-Match; see `detail.version`."),
    "413": ("TooLarge", "`too_large`: the body is over api.max_body_bytes ({max_body_bytes})."),
    "415": ("UnsupportedMediaType", "`unsupported_media_type`: send application/json."),
    "422": ("Invalid", "`invalid_field`: a bad, missing or unknown field: `detail.field`."),
    "429": ("RateLimited", "`rate_limited`: over a rate (a thread's ephemeral events); "
                           "nothing was done. Retry after Retry-After seconds."),
    "500": ("Internal", "`internal`: a bug (logged)."),
    "503": ("Unavailable", "`unavailable` (a store is down, or no answer within "
                           "api.request_timeout_s) or `backpressure` (write-behind backlog "
                           "full). Retry after Retry-After seconds."),
}


ERROR_HEADERS = {"401": ["WWW-Authenticate"], "429": ["Retry-After"], "503": ["Retry-After"]}


def error_responses(api: Api) -> Schema:
    return {name: response(desc.format(max_body_bytes=f"{api.max_body_bytes} bytes"),
                           ref("Error"), ERROR_HEADERS.get(code))
            for code, (name, desc) in ERRORS.items()}


def param(name: str, where: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": where, "required": where == "path", "schema": schema,
            "description": description}


def parameters() -> Schema:
    ident = {"type": "string", "pattern": ID_PATTERN}
    invalid = "(422 if it does not match the pattern)."
    return {
        "tid": param("tid", "path", ident, f"Thread id {invalid}"),
        "mid": param("mid", "path", ident, f"Message id {invalid}"),
        "key": param("key", "path", ident, f"State key {invalid}"),
        "uid": param("uid", "path", ident, f"User id {invalid}"),
        "page": page_parameter(),
        # inbox (GET /v1/threads)
        "owner_id": {**param("owner_id", "query", ident, f"The owner {invalid}"),
                     "required": True},
        "inboxUser": param("user_id", "query", ident, "With it, each thread carries the user's "
                           f"`unread` count (see read markers). {invalid}"),
        "inboxLimit": param("limit", "query", {**integer(1, MAX_INBOX), "default": DEFAULT_INBOX},
                            "Page size."),
        "inboxBefore": param("before", "query", {"type": "string", "pattern": INBOX_CURSOR},
                             "The next_cursor of the previous page (opaque); 400 if it is "
                             "not one."),
        "changes": changes_parameter(),
        "If-Match": param("If-Match", "header", STR,
                          "The version the write expects the entity to be at (`\"3\"`, `3` "
                          "or `W/\"3\"`); `*` or absent: any. Another version, or a value "
                          "that names none (empty, `\"\"`, a list), never matches: 412."),
        "X-Durability": param("X-Durability", "header",
                              {"type": "string",
                               "enum": ["acknowledged", "replicated", "persisted"]},
                              "`replicated`: answer once the write is on redis.ack_replicas "
                              "Redis replicas (WAIT); `persisted`: once committed in "
                              "PostgreSQL. Case-insensitive; absent: `replicated` when the "
                              "sidecar sets redis.ack_replicas, else `acknowledged`; another "
                              "value (an empty one too): 400."),
        # Issue 12.4: erasure.
        "erase": param("erase", "query", {"type": "boolean", "default": False},
                       "`true`: erase, not only tombstone — the content and metadata leave "
                       "every tier in every stored version (Redis docs, log entries and dead "
                       "letters; PostgreSQL; ClickHouse), the tombstone keeps the seq. Also "
                       "for what is already deleted. Another value than true or false: 400. "
                       "While Redis is down (write-through): through PostgreSQL, Redis's "
                       "copies erased on its recovery."),
    }


def page_parameter() -> Schema:
    """The page query as one object (form style, exploded: `?limit=10&before=7`), since only
    an object schema can say that before and after exclude each other."""
    schema = obj({"limit": {**integer(1, MAX_PAGE), "default": DEFAULT_PAGE,
                            "description": "Page size."},
                  "before": {**integer(1, MAX_CURSOR),
                             "description": "The page of messages just below seq `before`."},
                  "after": {**integer(0, MAX_CURSOR), "description": "The page of messages "
                            "just above seq `after` (resume)."}},
                 "", closed=True, **{"not": {"required": ["before", "after"]}})
    return {**param("page", "query", schema, "Without before or after: the latest page. "
                    "Both, or any other query parameter: 400."),
            "style": "form", "explode": True}


def changes_parameter() -> Schema:
    """The changes feed's query (form style, exploded: `?after_cseq=7&limit=10`)."""
    schema = obj({"after_cseq": {**integer(0, MAX_CURSOR), "default": 0,
                                 "description": "The position: changes after this cseq."},
                  "limit": {**integer(1, MAX_PAGE), "default": DEFAULT_PAGE,
                            "description": "Page size."}}, "", closed=True)
    return {**param("changes", "query", schema, "Any other query parameter: 400."),
            "style": "form", "explode": True}


def headers() -> Schema:
    tiers = ["redis", *(s.tier for s in SINKS)]
    return {
        "ETag": {"description": "The entity's version, quoted (`\"3\"`).", "schema": STR},
        "X-Tier": {"description": "The store that served it. `clickhouse`: a degraded, "
                                  "read-only answer while PostgreSQL is down (with "
                                  "X-Staleness-S), or /stats.",
                   "schema": {"type": "string", "enum": tiers}},
        "X-Staleness-S": {"description": "With `X-Tier: clickhouse`: how far behind ClickHouse "
                                         "may be, in seconds (the age of its backlog).",
                          "schema": {"type": "number", "minimum": 0}},
        "X-Durability": {"description": "The level the write reached (`acknowledged`: in "
                                        "the Redis primary; `replicated`: also on the "
                                        "replicas asked for; `persisted`: committed in "
                                        "PostgreSQL).",
                         "schema": {"type": "string",
                                    "enum": ["acknowledged", "replicated", "persisted"]}},
        "X-Created": {"description": "On a 202: `true` if the write created the entity "
                                     "(what a 201 would have said), else `false`.",
                      "schema": {"type": "string", "enum": ["true", "false"]}},
        "Retry-After": {"description": "Seconds to wait before retrying.",
                        "schema": integer(1)},
        "WWW-Authenticate": {"description": "The scheme to authenticate with: `Bearer`.",
                             "schema": STR},
    }


def input_schemas(api: Api) -> Schema:
    """Request bodies: exactly what model.parse_* accepts (byte sizes aside: JSON Schema
    cannot count the bytes of a serialised value)."""
    no_nul = {"propertyNames": {"pattern": NO_NUL}, "additionalProperties": ref("JsonValue")}
    role, content, meta = text(64, 1), text(api.max_content_chars), ref("Metadata")
    return {
        "JsonValue": {"description": "Any JSON value without NUL characters.",
                      "pattern": NO_NUL, "items": ref("JsonValue"), **no_nul},
        "Metadata": {"type": "object", **no_nul,
                     "description": f"A JSON object of at most {api.max_metadata_bytes} "
                                    "bytes, without NUL characters."},
        "ThreadInput": obj({"title": text(1024), "owner_id": text(128), "metadata": meta},
                           "", closed=True,
                           description="Replaces the thread's fields (absent: empty)."),
        "MessageInput": obj({"message_id": {"type": ["string", "null"], "pattern": ID_PATTERN,
                                            "description": "Idempotency key (absent: a "
                                                           "sortable id is generated)."},
                             "role": role, "content": content, "metadata": meta},
                            "role content", closed=True),
        "MessagePatch": obj({"role": role, "content": content, "metadata": meta}, "",
                            closed=True, minProperties=1),
        "StateInput": obj({"value": {**ref("JsonValue"),
                                     "description": "Any JSON value without NUL characters, at "
                                                    f"most {api.max_body_bytes} bytes."},
                           "ttl": {"type": ["number", "null"], "exclusiveMinimum": 0,
                                   "maximum": TTL_MAX_S, "description": "Seconds to live."}},
                          "value", closed=True),
        "ReadMarkerInput": obj({"seq": {**integer(0, MAX_CURSOR), "description": "Read up "
                                        "to this seq (at most the thread's last_seq)."}},
                               closed=True),
    }


def entity_thread(meta: Schema, common: Schema) -> Schema:
    """The properties of a thread."""
    return {"thread_id": STR, "title": STR, "owner_id": STR, "metadata": meta,
            "last_seq": integer(0), **common}


def entity_schemas() -> Schema:
    meta = ref("Metadata")
    common = {"version": integer(1), "created_at": stamp(), "updated_at": stamp(),
              "deleted": BOOL, "cseq": {**integer(0), "description": "The thread's change "
                                        "number of this version (the changes feed)."}}
    cursor = {"oneOf": [obj({"before": integer(1)}, closed=True),
                        obj({"after": integer(0)}, closed=True), {"type": "null"}],
              "description": "The query of the next page in the same direction; null: none."}
    return {
        "Thread": obj(entity_thread(meta, common)),
        "Message": obj({"seq": integer(1), "message_id": STR, "thread_id": STR, "role": STR,
                        "content": STR, "metadata": meta, **common},
                       description="A tombstone (deleted) keeps its seq; its content is empty."),
        "MessagePage": obj({"thread_id": STR, "last_seq": integer(0), "next_cursor": cursor,
                            "items": {"type": "array", "items": ref("Message"),
                                      "description": "Ordered by seq; tombstones included."}}),
        "InboxPage": obj({"owner_id": STR,
                          "next_cursor": {"type": ["string", "null"],
                                          "description": "`before` of the next page; null: "
                                                         "none."},
                          "items": {"type": "array", "items": obj({
                              **entity_thread(meta, common), "last_activity_at": stamp(),
                              "unread": {**integer(0), "description": "With user_id: the "
                                         "user's live messages after their read marker."}},
                              required=" ".join([*entity_thread(meta, common),
                                                 "last_activity_at"])),
                              "description": "The owner's live threads, newest activity "
                                             "(last message or change) first."}}),
        "ChangePage": obj({
            "thread_id": STR, "last_cseq": integer(0),
            "next_cursor": {"oneOf": [obj({"after_cseq": integer(0)}, closed=True),
                                      {"type": "null"}],
                            "description": "The query of the next page; null: caught up."},
            "items": {"type": "array", "description": "Ordered by cseq; each entity once, at "
                      "its latest change; tombstones included.", "items": {"oneOf": [
                          obj({"kind": const("thread"), "doc": {
                              "type": "object", "description": "The thread (without "
                                                               "last_seq)."}}, closed=True),
                          obj({"kind": const("message"), "doc": ref("Message")},
                              closed=True)]}}}),
        "StateEntry": obj({"key": STR, "value": {"description": "null once deleted"},
                           "version": integer(1), "expires_at": stamp(nullable=True),
                           "updated_at": stamp(), "deleted": BOOL}),
        "ReadMarkerPosition": obj({"thread_id": STR, "user_id": STR, "seq": integer(0)}),
        "ReadMarker": obj({"thread_id": STR, "user_id": STR, "seq": integer(0),
                           "unread": integer(0)}),
        "Error": obj({"error": obj({"code": STR, "message": STR,
                                    "detail": {"description": "e.g. {\"field\": ...}, or null"}})}),
    }


def ops_schemas() -> Schema:
    sink = obj({"circuit": {"type": "string", "enum": ["closed", "open", "half_open"]},
                "backlog": integer(0), "lag_s": {"type": "number", "minimum": 0},
                "dead_letters": integer(0)})
    tier = obj({"state": {"type": "string", "enum": ["up", "down", "unknown"]}})
    dead = {"type": "array", "items": {"type": "object", "additionalProperties": STR},
            "description": "The first dead letters (id, group, error, entity fields)."}
    return {
        "Health": obj({"status": const("ok")}),
        "Readiness": obj({"ready": BOOL, "problems": {"type": "array", "items": STR}}),
        "Status": obj({"tiers": obj({t: tier for t in ("redis", *(s.tier for s in SINKS))},
                                    "redis", description="A store without a sink: absent."),
                       "sinks": obj({s.name: sink for s in SINKS}, "",
                                    description="One per configured sink."),
                       "degraded": {"type": "array", "items": STR,
                                    "description": "What is not as it should be, in words "
                                                   "(a store down, a circuit open, a sink "
                                                   "behind flush.max_lag_s, dead letters); "
                                                   "empty: all well."},
                       "dead_letters": dead}),
        "ReplayResult": obj({"replayed": integer(0)}),
        "ThreadStats": obj({"thread_id": STR, "messages": integer(0),
                            "by_role": {"type": "object", "additionalProperties": integer(0)},
                            "content_bytes": integer(0), "first_at": stamp(nullable=True),
                            "last_at": stamp(nullable=True)}),
    }


def ws_schemas() -> Schema:
    tid = {"type": "string", "pattern": ID_PATTERN}
    events = {"type": "string", "enum": ["message.created", "message.updated",
                                          "message.deleted"]}
    thread_events = {"type": "string", "enum": ["thread.created", "thread.updated",
                                                 "thread.deleted"]}
    ts = {**integer(0), "description": "Live events: when the write was acknowledged (Unix "
                                       "ms). Absent on backfilled messages."}
    cseq = {**integer(1), "description": "The change's number in its thread (gapless)."}
    return {
        "WsClientMessage": {"oneOf": [
            obj({"op": const("subscribe"), "thread_id": tid, "after_seq": integer(0),
                 "after_cseq": integer(0)}, "op thread_id", closed=True,
                **{"not": {"required": ["after_seq", "after_cseq"]}}),
            obj({"op": const("unsubscribe"), "thread_id": tid}, closed=True),
            obj({"op": const("ping")}, closed=True),
            obj({"op": const("publish"), "thread_id": tid, "event": ref("EphemeralEvent")},
                closed=True)]},
        "WsServerMessage": {"oneOf": [
            obj({"type": events, "thread_id": STR, "seq": integer(1), "ts": ts, "cseq": cseq,
                 "message": ref("Message")}, "type thread_id seq message"),
            obj({"type": thread_events, "thread_id": STR, "last_seq": integer(0), "ts": ts,
                 "cseq": cseq,
                 "thread": {"type": "object", "description": "The thread (without last_seq)."}},
                "type thread_id thread"),
            obj({"type": const("read.updated"), "thread_id": STR, "seq": integer(0), "ts": ts,
                 "user_id": STR}),
            obj({"type": const("subscribed"), "thread_id": STR, "last_seq": integer(0)}),
            obj({"type": const("ephemeral"), "thread_id": STR, "ts": integer(0),
                 "event": obj({"type": STR, "data": {}})}),
            obj({"type": const("error"), "code": STR, "message": STR, "thread_id": STR,
                 "op": const("publish"), "retry_after_ms": integer(1),
                 "cseq": {**integer(0), "description": "resync: the thread's current cseq."}},
                "type code message"),
            obj({"type": const("pong")})]},
    }


