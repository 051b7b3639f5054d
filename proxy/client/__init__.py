"""A typed client of the tierproxy API: asyncio (`Client`), blocking (`SyncClient`).

    async with Client("http://127.0.0.1:8750", token=TOKEN) as c:
        await c.put_thread("t1", title="Support")
        await c.append("t1", "hello")                  # retried safely: the id is generated
        async for m in c.messages("t1", after=0): ...  # every message, page by page
        async with c.subscribe("t1", after_seq=0) as sub:
            async for event in sub: ...                # resumes by itself, no gap, no dup
        async with c.subscribe("t1", after_cseq=0) as sub: ...  # every change, once

It imports aiohttp and orjson only (nothing else of `proxy`), so an application can use it
without the sidecar's dependencies.
"""

from proxy.client.errors import (
    APIError,
    Backpressure,
    ClientError,
    Conflict,
    Invalid,
    Malformed,
    NotFound,
    PreconditionFailed,
    ProtocolError,
    Resync,
    ServerError,
    TooLarge,
    TooManySubscriptions,
    TransportError,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from proxy.client.http import Client
from proxy.client.results import (
    ChangePage,
    Durability,
    InboxPage,
    Marker,
    Page,
    Read,
    Written,
    etag,
    new_message_id,
)
from proxy.client.retry import NO_RETRY, RetryPolicy
from proxy.client.sync import SyncClient, SyncSubscription
from proxy.client.transport import Answer
from proxy.client.ws import Event, Subscription

__all__ = [
    "APIError", "Answer", "Backpressure", "ChangePage", "Client", "ClientError", "Conflict",
    "Durability", "Event", "InboxPage", "Invalid", "Malformed", "Marker", "NO_RETRY", "NotFound",
    "Page", "PreconditionFailed", "ProtocolError", "Read", "Resync", "RetryPolicy", "ServerError",
    "Subscription", "SyncClient", "SyncSubscription", "TooLarge", "TooManySubscriptions",
    "TransportError", "Unauthorized", "Unavailable", "UnsupportedMediaType", "Written", "etag",
    "new_message_id",
]
