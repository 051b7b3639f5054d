"""Ephemeral events (issue 12.5) on real Redis and PostgreSQL, two sidecars in this process on
one Redis: an HTTP event and a WebSocket publish reach subscribers on the other sidecar as
`{"type": "ephemeral", ...}`; nothing reaches the log or PostgreSQL; a resume does not replay
them; the size and rate bounds; bad input changes nothing; unknown and deleted threads."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from proxy import client as tp
from proxy import keys, openapi
from proxy.hot.ephemeral import parse_event
from proxy.settings import Settings
from tests.conftest import AppClient, Servers
from tests.helpers import append, body, dump_redis, error, settled, unchanged, wait_for
from tests.test_openapi import Exchange, schema_validator
from tests.test_settings import refused
from tests.test_ws import (
    WS,
    Client,
    hub_listening,
    new_thread,
    recv,
    send,
    subscribe,
    the_hub,
    ws_settings,
)

EVENTS = "/v1/threads/{tid}/events"
TYPING = {"type": "typing", "data": {"user": "u1"}}
FRAME = schema_validator({"$ref": "#/components/schemas/WsServerMessage"})
OP = schema_validator({"$ref": "#/components/schemas/WsClientMessage"})


def events_url(tid: str) -> str:
    return f"/v1/threads/{tid}/events"


async def publish(client: Client, tid: str, event: Any = TYPING, status: int = 202) -> Any:
    return await body(await client.post(events_url(tid), json=event), status)


async def ws_publish(ws: WS, tid: str, event: Any) -> None:
    frame = {"op": "publish", "thread_id": tid, "event": event}
    OP.validate(frame)
    await send(ws, frame)


async def frame(ws: WS) -> Any:
    """The next frame, checked against the document's WsServerMessage."""
    got = await recv(ws)
    FRAME.validate(got)
    return got


async def nothing_more(ws: WS) -> None:
    """Nothing is queued for the socket: a ping is answered first."""
    await send(ws, {"op": "ping"})
    assert await recv(ws) == {"type": "pong"}


async def pair_of(client_for: AppClient, s: Settings) -> tuple[Client, Client]:
    """Sidecar A (subscribers) and sidecar B (publishers) on the same Redis."""
    a, b = await client_for(s), await client_for(s)
    await hub_listening(a, s.redis.shards)
    return a, b


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return ws_settings(servers)


@pytest.fixture
async def pair(client_for: AppClient, settings: Settings) -> tuple[Client, Client]:
    return await pair_of(client_for, settings)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---- fan-out


async def test_an_http_event_reaches_a_subscriber_on_the_other_sidecar(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    await new_thread(b, "t2")
    published = sample("tierproxy_ephemeral_events_total", outcome="published")
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        await publish(b, "t2")  # another thread: not for this socket
        done = await Exchange(b)("POST", EVENTS, events_url("t1"), 202, json=TYPING)
        assert set(done) == {"thread_id", "type", "ts"}
        assert (done["thread_id"], done["type"]) == ("t1", "typing")
        assert await frame(ws) == {"type": "ephemeral", "thread_id": "t1", "ts": done["ts"],
                                   "event": TYPING}
        await publish(b, "t1", {"type": "presence"})  # no data: null
        assert (await frame(ws))["event"] == {"type": "presence", "data": None}
        await nothing_more(ws)
    assert sample("tierproxy_ephemeral_events_total", outcome="published") == published + 3


async def test_a_streamed_reply_over_a_socket_then_the_final_append(
        pair: tuple[Client, Client]) -> None:
    """A publisher's socket on B (not subscribed) streams deltas; A's subscriber gets them in
    order, then the one stored message. The publishing socket gets no reply (a ping tells
    when its frames have been handled)."""
    a, b = pair
    await new_thread(b, "t1")
    deltas = [{"type": "reply.delta", "data": {"i": i, "text": f"tok{i} é"}} for i in range(30)]
    async with a.ws_connect("/v1/ws") as sub, b.ws_connect("/v1/ws") as pub:
        await subscribe(sub, "t1")
        for delta in deltas:
            await ws_publish(pub, "t1", delta)
        await nothing_more(pub)  # frames are handled in order: every delta is out
        final = await append(b, "t1", "".join(f"tok{i} é" for i in range(30)), role="assistant")
        got = [await frame(sub) for _ in range(31)]
        assert [f["event"] for f in got[:30]] == deltas
        assert all(f["type"] == "ephemeral" and f["thread_id"] == "t1" for f in got[:30])
        assert got[30]["type"] == "message.created" and got[30]["message"] == final
        await nothing_more(sub)


async def test_the_publisher_follows_the_thread_too(pair: tuple[Client, Client]) -> None:
    a, _ = pair
    await new_thread(a, "t1")
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        await ws_publish(ws, "t1", TYPING)
        assert (await frame(ws))["event"] == TYPING


# ---- never stored, never replayed


async def test_nothing_is_stored_logged_or_flushed(pair: tuple[Client, Client],
                                                   redis: aioredis.Redis,
                                                   pg: asyncpg.Connection,
                                                   settings: Settings) -> None:
    """Only the thread's rate counter is written (with a TTL); no log stream moves, so no
    sink gets anything; PostgreSQL holds the thread alone."""
    a, b = pair
    await new_thread(b, "t1")
    await wait_for(lambda: settled(redis))
    before = await dump_redis(redis)
    async with b.ws_connect("/v1/ws") as ws:
        for _ in range(5):
            await publish(a, "t1")
            await ws_publish(ws, "t1", {"type": "reply.delta", "data": "x"})
        await nothing_more(ws)
    after = await dump_redis(redis)
    rate = keys.ephemeral_rate(keys.shard_of("t1", settings.redis.shards), "t1").encode()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {rate}
    assert after[rate][0] == "string" and after[rate][2]  # it expires
    assert await pg.fetchval("SELECT count(*) FROM threads") == 1
    assert await pg.fetchval("SELECT count(*) FROM messages") == 0


async def test_a_resume_does_not_replay_them(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        await publish(b, "t1")
        await append(b, "t1", "one")
        assert [(await frame(ws))["type"] for _ in range(2)] == ["ephemeral", "message.created"]
    for sidecar in (a, b):
        async with sidecar.ws_connect("/v1/ws") as ws:
            assert (await subscribe(ws, "t1", after_seq=0))["last_seq"] == 1
            backfilled = await frame(ws)
            assert (backfilled["type"], backfilled["seq"]) == ("message.created", 1)
            await nothing_more(ws)


async def test_a_syncing_subscription_gets_them_at_once(pair: tuple[Client, Client]) -> None:
    """While a subscription (re)synchronises its stored events are held back; ephemeral ones
    are not held (and not counted in the seq stream)."""
    a, b = pair
    await new_thread(b, "t1")
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        sub = next(iter(the_hub(a).by_thread["t1"]))
        await wait_for(lambda: _true(sub.held is None))  # the first sync has ended
        sub.held = deque()  # as during a resync (nothing will release it in this test)
        await append(b, "t1", "held back")
        await publish(b, "t1")
        assert (await frame(ws))["type"] == "ephemeral"
        await wait_for(lambda: _true(len(sub.held or ()) == 1))
        assert sub.held is not None and sub.held[0].created and sub.last_seq == 0


async def _true(value: bool) -> bool:
    return value


async def test_a_full_queue_drops_them_and_keeps_the_socket(client_for: AppClient,
                                                            servers: Servers) -> None:
    """A client that reads nothing: ephemeral frames fill its queue to three quarters, then
    are dropped (counted); the socket stays open, the last quarter takes stored events."""
    s = ws_settings(servers, ws={"queue_size": 8},
                    ephemeral={"max_event_bytes": 200_000, "rate_per_s": 1e6, "burst": 10**6})
    a, b = await pair_of(client_for, s)
    await new_thread(b, "t1")
    dropped = sample("tierproxy_ws_ephemeral_dropped_total")
    big = {"type": "blob", "data": "x" * 150_000}
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        conn = next(iter(the_hub(a).connections))
        slow = sample("tierproxy_ws_slow_consumer_closes_total")
        async with asyncio.timeout(60):  # TCP buffers fill first, then the queue
            while sample("tierproxy_ws_ephemeral_dropped_total") == dropped:
                await publish(b, "t1", big)
                assert conn.queue.qsize() <= 6 and not conn.closed
        await append(b, "t1", "stored")  # finds room in the last quarter
        queued = lambda: [out.frame for out in list(conn.queue._queue)]  # noqa: E731
        await wait_for(lambda: _true(any(b"message.created" in f for f in queued())))
        assert not conn.closed
        assert sample("tierproxy_ws_slow_consumer_closes_total") == slow


# ---- bounds


async def test_the_size_bound(client_for: AppClient, servers: Servers) -> None:
    s = ws_settings(servers, ephemeral={"max_event_bytes": 64})
    a, b = await pair_of(client_for, s)
    await new_thread(b, "t1")
    fits = {"type": "t", "data": "x" * (64 - len(orjson.dumps({"type": "t", "data": ""})))}
    over = {**fits, "data": fits["data"] + "x"}
    assert len(orjson.dumps(fits)) == 64
    async with a.ws_connect("/v1/ws") as ws, b.ws_connect("/v1/ws") as pub:
        await subscribe(ws, "t1")
        await publish(b, "t1", fits)
        assert (await frame(ws))["event"] == fits
        detail = await error(await b.post(events_url("t1"), json=over), 413, "too_large")
        assert detail == {"field": "data", "limit": 64}
        await ws_publish(pub, "t1", over)
        refusal = await frame(pub)
        assert (refusal["type"], refusal["code"], refusal["op"], refusal["thread_id"]) == (
            "error", "too_large", "publish", "t1")
        await nothing_more(ws)


async def test_the_rate_bound_is_per_thread_over_all_sidecars(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis) -> None:
    """Burst 3 at one event per 10 s: three pass (two through A, one through B), the next
    ones are refused through either with 429 and Retry-After, and change nothing."""
    s = ws_settings(servers, ephemeral={"rate_per_s": 0.1, "burst": 3})
    a, b = await pair_of(client_for, s)
    await new_thread(b, "t1")
    await new_thread(b, "t2")
    limited = sample("tierproxy_ephemeral_events_total", outcome="rate_limited")
    call = Exchange(a, openapi.document(s))
    async with a.ws_connect("/v1/ws") as ws, b.ws_connect("/v1/ws") as pub:
        await subscribe(ws, "t1")
        for sidecar in (a, a, b):
            await publish(sidecar, "t1")
        async with unchanged(redis):
            refusal = await call("POST", EVENTS, events_url("t1"), 429, json=TYPING)
            resp = await b.post(events_url("t1"), json=TYPING)
            await ws_publish(pub, "t1", TYPING)
            frame_ = await frame(pub)
        assert refusal["error"]["code"] == "rate_limited"
        wait_ms = refusal["error"]["detail"]["retry_after_ms"]
        assert 0 < wait_ms <= 10_000
        await error(resp, 429, "rate_limited")
        assert 1 <= int(resp.headers["Retry-After"]) <= 10
        assert int(resp.headers["Retry-After"]) == math.ceil(
            (await resp.json())["error"]["detail"]["retry_after_ms"] / 1000)
        assert (frame_["code"], frame_["op"], frame_["thread_id"]) == (
            "rate_limited", "publish", "t1")
        assert 0 < frame_["retry_after_ms"] <= 10_000
        await publish(b, "t2")  # another thread has its own rate
        assert [(await frame(ws))["type"] for _ in range(3)] == ["ephemeral"] * 3
        await nothing_more(ws)
    assert sample("tierproxy_ephemeral_events_total", outcome="rate_limited") == limited + 3


# ---- bad input, unknown threads


BAD_BODIES: list[tuple[Any, str]] = [
    ([], "event"), ("typing", "event"), ({}, "type"), ({"data": 1}, "type"),
    ({"type": 5}, "type"), ({"type": ""}, "type"), ({"type": "a b"}, "type"),
    ({"type": "x" * 65}, "type"), ({"type": "t\n"}, "type"), ({"type": "t", "ts": 1}, "ts"),
    ({"type": "t", "data": 1, "thread_id": "t1"}, "thread_id"),
]


async def test_bad_bodies_change_nothing(pair: tuple[Client, Client],
                                         redis: aioredis.Redis) -> None:
    a, b = pair
    await new_thread(b, "t1")
    async with a.ws_connect("/v1/ws") as ws, b.ws_connect("/v1/ws") as pub:
        await subscribe(ws, "t1")
        async with unchanged(redis):
            for doc, field in BAD_BODIES:
                detail = await error(await b.post(events_url("t1"), json=doc), 422,
                                     "invalid_field")
                assert detail["field"] == field, doc
                await ws_publish_raw(pub, {"op": "publish", "thread_id": "t1", "event": doc})
                refusal = await frame(pub)
                assert (refusal["code"], refusal["op"]) == ("invalid_field", "publish"), doc
            huge = b'{"type": "t", "data": 123456789012345678901234567890}'
            await error(await b.post(events_url("t1"), data=huge,
                                     headers={"Content-Type": "application/json"}), 422,
                        "invalid_field")
            await pub.send_str('{"op": "publish", "thread_id": "t1", "event": '
                               + huge.decode() + "}")  # not rounded to a float: refused
            assert (await frame(pub))["code"] == "invalid_field"
            await error(await b.post(events_url("t1"), data=b'{"type": "t"}'), 415,
                        "unsupported_media_type")
            await error(await b.post(events_url("t1"), data=b"{",
                                     headers={"Content-Type": "application/json"}), 400,
                        "malformed")
            await error(await b.post(events_url("bad%20id"), json=TYPING), 422, "invalid_field")
            for bad in ({"op": "publish", "thread_id": "t1"},
                        {"op": "publish", "thread_id": "bad id", "event": TYPING},
                        {"op": "publish", "thread_id": "t1", "event": TYPING, "after_seq": 1}):
                await ws_publish_raw(pub, bad)
                assert (await frame(pub))["code"] == "invalid_field", bad
        await nothing_more(ws)
        await nothing_more(pub)


async def ws_publish_raw(ws: WS, frame_: Any) -> None:
    await send(ws, frame_)


async def test_unknown_and_deleted_threads(pair: tuple[Client, Client],
                                           redis: aioredis.Redis) -> None:
    a, b = pair
    call = Exchange(b)
    async with unchanged(redis):
        await call("POST", EVENTS, events_url("nope"), 404, json=TYPING)
    await new_thread(b, "gone")
    await body(await b.delete("/v1/threads/gone"), 200)
    async with unchanged(redis):
        doc = await call("POST", EVENTS, events_url("gone"), 404, json=TYPING)
        assert doc["error"]["message"] == "thread gone was deleted"
        async with a.ws_connect("/v1/ws") as ws:
            await ws_publish(ws, "nope", TYPING)
            refusal = await frame(ws)
            assert (refusal["code"], refusal["op"], refusal["thread_id"]) == (
                "not_found", "publish", "nope")
            await nothing_more(ws)


async def test_a_thread_only_postgresql_holds_is_read_through(
        pair: tuple[Client, Client], redis: aioredis.Redis, pg: asyncpg.Connection,
        settings: Settings) -> None:
    a, b = pair
    await new_thread(b, "t1")
    await wait_for(lambda: settled(redis))
    assert await pg.fetchval("SELECT count(*) FROM threads WHERE thread_id = 't1'") == 1
    thread_key = keys.thread(keys.shard_of("t1", settings.redis.shards), "t1")
    assert await redis.delete(thread_key) == 1  # as once its cache TTL ran out
    await publish(a, "t1")
    assert await redis.hget(thread_key, "seq") == b"0"


# ---- the Python client


async def test_the_client_publishes_and_its_subscription_yields_them(
        pair: tuple[Client, Client]) -> None:
    a, b = pair
    fast = tp.RetryPolicy(attempts=2, total_s=5.0, base_s=0.01, cap_s=0.05)
    async with tp.Client(str(a.make_url("")), retry=fast) as ca, \
            tp.Client(str(b.make_url("")), retry=fast) as cb:
        await cb.put_thread("t1")
        async with ca.subscribe("t1") as sub:
            done = await cb.publish_event("t1", "typing", {"user": "u1"})
            await cb.append("t1", "final", role="assistant")
            events = [await anext(sub), await anext(sub)]
        assert (events[0].type, events[0].ephemeral, events[0].ts_ms) == (
            "ephemeral", TYPING, done["ts"])
        assert (events[1].type, events[1].seq) == ("message.created", 1)
        assert sub.positions == {"t1": 1}
        with pytest.raises(tp.NotFound):
            await cb.publish_event("nope", "typing")
        with pytest.raises(tp.Invalid):
            await cb.publish_event("t1", "not a type")


# ---- pieces


@pytest.mark.parametrize(("doc", "accepted"), [
    ({"type": "typing"}, True), ({"type": "a.B_c:d-1", "data": [1, {"x": None}]}, True),
    ({"type": "t", "data": "\x00"}, True), ({"type": "x" * 64, "data": 1.5}, True),
    ({"type": "x" * 65}, False), ({"type": ""}, False), ({"type": "é"}, False),
    ({"data": 1}, False), ({"type": "t", "other": 1}, False), ([], False), (None, False),
])
def test_the_body_schema_agrees_with_parse_event(doc: Any, accepted: bool) -> None:
    schema = schema_validator({"$ref": "#/components/schemas/EphemeralEvent"})
    try:
        parse_event(doc, 16_384)
        parsed = True
    except ValueError:
        parsed = False
    assert (schema.is_valid(doc), parsed) == (accepted, accepted)


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("ephemeral.max_event_bytes", "0", "must be greater than 0"),
    ("ephemeral.max_event_bytes", "1048577", "must be at most 1048576"),
    ("ephemeral.rate_per_s", "0", "must be greater than 0"),
    ("ephemeral.rate_per_s", "-1.5", "must be greater than 0"),
    ("ephemeral.burst", "0", "must be greater than 0"),
    ("ephemeral.burst", "1.5", "expected int"),
])
def test_settings_are_validated(key: str, value: str, problem: str) -> None:
    refused(key, problem, env={"TIERPROXY_" + key.replace(".", "_").upper(): value})
