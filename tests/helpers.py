"""Small shared test helpers: a type-aware dump of Redis, polling with a deadline, and
shortcuts for the API's JSON bodies and errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import ClientResponse

Dump = dict[bytes, tuple[str, Any, bool]]

# Settings sections that pause write-behind: each flusher parks (failpoint after-read:sleep)
# after its first read, so nothing is acknowledged, released or trimmed and Redis keeps every
# key and log entry exactly as the API wrote them. Parked flushers end only when cancelled,
# hence the short shutdown deadline.
PAUSED: dict[str, dict[str, Any]] = {"debug": {"failpoint": "after-read:sleep"},
                                     "shutdown": {"deadline_s": 0.1}}


async def dump_redis(r: aioredis.Redis) -> Dump:
    """Every key: its type, its full value (stream: the last id appended) and whether it
    has a TTL. Equal dumps mean nothing was written."""
    out: Dump = {}
    async for key in r.scan_iter(count=1000):
        kind = (await r.type(key)).decode()
        # A stream: only what was appended. The background flushers' reads, acks and trims
        # (pg and ch groups, at their own pace) are not writes of the request under test.
        value = ((await r.xinfo_stream(key))["last-generated-id"] if kind == "stream"
                 else await key_value(r, key, kind))
        out[key] = (kind, value, await r.pttl(key) > 0)
    return out


async def settled(r: aioredis.Redis) -> bool:
    """Every consumer group (pg, ch) has read and acknowledged all of every stream, so no
    background flush will change a key (its TTL, its pending count) from now on."""
    async for key in r.scan_iter(count=1000, _type="stream"):
        last = (await r.xinfo_stream(key))["last-generated-id"]
        for g in await r.xinfo_groups(key):
            if g["pending"] or g["last-delivered-id"] != last:
                return False
    return True


@asynccontextmanager
async def unchanged(r: aioredis.Redis, settle: bool = True) -> AsyncIterator[Dump]:
    """Asserts that the body of the `async with` changes nothing in Redis. Waits first for
    the write-behind to settle, so only the request under test can change anything
    (settle=False with flushing PAUSED: then nothing else writes, and nothing ever settles)."""
    if settle:
        await wait_for(lambda: settled(r))
    before = await dump_redis(r)
    yield before
    after = await dump_redis(r)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, {k: (before.get(k), after.get(k)) for k in changed}


async def wait_for(cond: Callable[[], Awaitable[Any]], timeout_s: float = 10.0,
                   interval_s: float = 0.02) -> Any:
    """Poll `cond` until it returns something truthy (returned) or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def past_503(send: Callable[[], Awaitable[ClientResponse]],
                   timeout_s: float = 20.0) -> ClientResponse:
    """`send()` again until its answer is not a 503: a write waiting for write-through to take
    over once Redis is down. Returns that answer."""
    async def answered() -> ClientResponse | None:
        resp = await send()
        return None if resp.status == 503 else resp

    resp: ClientResponse = await wait_for(answered, timeout_s=timeout_s, interval_s=0.05)
    return resp


async def write_behind_again(client: Any, timeout_s: float = 40.0) -> None:
    """Until /v1/status says write-behind: Redis is back and reconciled with PostgreSQL."""
    await until_mode(client, "write-behind", timeout_s)


async def until_mode(client: Any, mode: str, timeout_s: float) -> None:
    """Until /v1/status says `mode` (write-behind or write-through)."""
    async def there() -> bool:
        return bool((await body(await client.get("/v1/status"), 200))["mode"] == mode)

    await wait_for(there, timeout_s=timeout_s, interval_s=0.1)


async def body(resp: ClientResponse, status: int) -> Any:
    """The JSON body of a response that must have `status`."""
    raw = await resp.read()
    assert resp.status == status, raw
    assert resp.content_type == "application/json"
    return orjson.loads(raw)


async def error(resp: ClientResponse, status: int, code: str) -> Any:
    """Asserts the error format and code; returns `detail`."""
    doc = await body(resp, status)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"code", "message", "detail"}
    assert doc["error"]["code"] == code
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    return doc["error"]["detail"]


async def append(client: Any, tid: str = "t1", content: str = "hi", *, status: int = 201,
                 **fields: Any) -> Any:
    """Append a message (role "user" unless given) through an aiohttp test client; the
    answer must have `status`. Returns the answer's JSON."""
    msg = {"role": "user", "content": content, **fields}
    return await body(await client.post(f"/v1/threads/{tid}/messages", json=msg), status)


async def log_entries(r: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    """A log stream's entries as dicts of text (the doc `d` stays JSON text)."""
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in await r.xrange(stream)]


async def key_value(r: aioredis.Redis, key: bytes, kind: str = "") -> Any:
    """A key's whole value by its type (`kind`, if the caller has it): streams every entry,
    sorted sets with their scores, sets sorted. For comparing Redis before and after, and for
    searching it for a text."""
    kind = kind or (await r.type(key)).decode()
    if kind == "stream":
        return await r.xrange(key)
    if kind == "hash":
        return await r.hgetall(key)
    if kind == "zset":
        return await r.zrange(key, 0, -1, withscores=True)
    if kind == "set":
        return sorted(await r.smembers(key))
    if kind == "list":
        return await r.lrange(key, 0, -1)
    if kind == "string":
        return await r.get(key)
    raise AssertionError(f"unexpected redis type {kind} of {key!r}")
