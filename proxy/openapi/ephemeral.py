"""The OpenAPI document's ephemeral events (issue 12.5): the route, its body and its answer.
The WebSocket op and frame that carry the same events are in schemas.ws_schemas."""

from __future__ import annotations

from proxy.keys import EVENT_TYPE_PATTERN
from proxy.openapi.schemas import STR, Schema, integer, obj, operation, ref, response
from proxy.settings import Ephemeral

EVENTS = """\
Pushed at once to the thread's WebSocket subscribers on every sidecar as `{"type":
"ephemeral", "thread_id", "ts", "event": {"type", "data"}}` — never stored, never flushed,
never replayed on resume (e.g. typing indicators, an assistant's reply streamed token by token
before one normal append of the final message). 404: unknown or deleted thread; 413: the event
`{"type", "data"}` is over ephemeral.max_event_bytes (%(max_bytes)d bytes) as JSON; 429: the
thread is over ephemeral.rate_per_s (%(rate)g/s, bursts of %(burst)d), retry after Retry-After.
"""


def ephemeral_paths(e: Ephemeral) -> Schema:
    return {"/v1/threads/{tid}/events": {
        "parameters": [ref("tid", "parameters")],
        "post": operation(
            "publishEvent", "Push an ephemeral event to the thread's subscribers",
            {"202": response("Published to the subscribers there are (there may be none).",
                             ref("EphemeralAccepted"))},
            "400 404 413 415 422 429 500 503", body="EphemeralEvent",
            description=EVENTS % {"max_bytes": e.max_event_bytes, "rate": e.rate_per_s,
                                  "burst": e.burst})}}


def ephemeral_schemas(e: Ephemeral) -> Schema:
    return {
        "EphemeralEvent": obj(
            {"type": {"type": "string", "pattern": EVENT_TYPE_PATTERN,
                      "description": "What it is, e.g. `typing` or `reply.delta`."},
             "data": {"description": "Any JSON value (absent: null); the event is at most "
                                     f"{e.max_event_bytes} bytes of JSON."}},
            "type", closed=True),
        "EphemeralAccepted": obj({"thread_id": STR, "type": STR,
                                  "ts": {**integer(0), "description": "When it was accepted "
                                                                      "(Unix ms): its `ts`."}}),
    }
