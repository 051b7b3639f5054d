"""WebSocket push on real Redis and PostgreSQL: two sidecars in this process share one Redis;
subscribers on one, writers on the other. Every wait has a deadline; no sleep synchronises."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from proxy import hub as hub_module
from proxy import keys, routes, wsframes
from proxy.hub import WebSocketHub
from proxy.settings import Settings
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import append, body, wait_for

Client = TestClient[Any, Any]
WS = aiohttp.ClientWebSocketResponse
DEADLINE_S = 15.0


async def new_thread(client: Client, tid: str) -> None:
    await body(await client.put(f"/v1/threads/{tid}", json={"title": tid}), 201)


async def write_many(client: Client, tid: str, count: int, writers: int = 4) -> list[Any]:
    """`count` appends from `writers` concurrent writers; the acknowledged docs."""
    per = [count // writers + (1 if i < count % writers else 0) for i in range(writers)]

    async def writer(n: int) -> list[Any]:
        return [await append(client, tid, f"m{i}") for i in range(n)]

    done = await asyncio.gather(*(writer(n) for n in per))
    return [doc for docs in done for doc in docs]


async def recv(ws: WS, timeout_s: float = DEADLINE_S) -> Any:
    msg = await ws.receive(timeout=timeout_s)
    assert msg.type is WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return orjson.loads(msg.data)


async def send(ws: WS, frame: Any) -> None:
    await ws.send_str(orjson.dumps(frame).decode())


async def subscribe(ws: WS, tid: str, after_seq: int | None = None) -> Any:
    frame: dict[str, Any] = {"op": "subscribe", "thread_id": tid}
    if after_seq is not None:
        frame["after_seq"] = after_seq
    await send(ws, frame)
    reply = await recv(ws)
    assert reply["type"] == "subscribed" and reply["thread_id"] == tid, reply
    return reply


async def created_seqs(ws: WS, tid: str, until: int, timeout_s: float = DEADLINE_S) -> list[int]:
    """The seqs of the message.created events of `tid`, as received, until `until` arrives."""
    seqs: list[int] = []
    async with asyncio.timeout(timeout_s):
        while not seqs or seqs[-1] < until:
            ev = await recv(ws)
            if ev["type"] == "message.created" and ev["thread_id"] == tid:
                assert ev["message"]["seq"] == ev["seq"]
                seqs.append(ev["seq"])
    return seqs


def the_hub(client: Client) -> WebSocketHub:
    return client.app[routes.HUB]


async def hub_listening(client: Client, shards: int) -> None:
    hub = the_hub(client)
    await wait_for(lambda: _true(len(hub.subscribed_shards) == shards))


async def _true(value: bool) -> bool:
    return value


def ws_settings(servers: Servers, **sections: dict[str, Any]) -> Settings:
    """Test settings with a short shutdown deadline: these tests leave nothing to flush."""
    return make_settings(servers, **{"shutdown": {"deadline_s": 1.0}, **sections})


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return ws_settings(servers)


@pytest.fixture
async def pair(client_for: AppClient, settings: Settings) -> tuple[Client, Client]:
    """Sidecar A (subscribers) and sidecar B (writers) on the same Redis."""
    a, b = await client_for(settings), await client_for(settings)
    await hub_listening(a, settings.redis.shards)
    return a, b


# ---- fan-out and order


async def test_fan_out_across_sidecars_in_order(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    await new_thread(b, "t2")
    async with a.ws_connect("/v1/ws") as ws:
        assert (await subscribe(ws, "t1"))["last_seq"] == 0
        docs, _ = await asyncio.gather(write_many(b, "t1", 100), write_many(b, "t2", 20))
        events = []
        async with asyncio.timeout(DEADLINE_S):
            while len(events) < 100:
                events.append(await recv(ws))
    assert all(ev["type"] == "message.created" and ev["thread_id"] == "t1" for ev in events)
    assert [ev["seq"] for ev in events] == list(range(1, 101))
    by_seq = {doc["seq"]: doc for doc in docs}
    assert all(ev["message"] == by_seq[ev["seq"]] for ev in events)
    assert all(isinstance(ev["ts"], int) for ev in events)


async def test_subscribers_on_both_sidecars(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(a, "t1")
    async with a.ws_connect("/v1/ws") as wa, b.ws_connect("/v1/ws") as wb:
        await subscribe(wa, "t1")
        await subscribe(wb, "t1")
        await asyncio.gather(write_many(a, "t1", 15, 3), write_many(b, "t1", 15, 3))
        assert await created_seqs(wa, "t1", 30) == list(range(1, 31))
        assert await created_seqs(wb, "t1", 30) == list(range(1, 31))


async def test_live_subscribe_starts_after_last_seq(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    await write_many(b, "t1", 5, 1)
    async with a.ws_connect("/v1/ws") as ws:
        assert (await subscribe(ws, "t1"))["last_seq"] == 5
        await append(b, "t1")
        assert await created_seqs(ws, "t1", 6) == [6]


async def test_edits_and_thread_events_pass_through(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    first = await append(b, "t1")
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1", after_seq=0)
        assert (await recv(ws))["seq"] == 1
        mid = first["message_id"]
        await body(await b.patch(f"/v1/threads/t1/messages/{mid}", json={"content": "x"}), 200)
        await body(await b.delete(f"/v1/threads/t1/messages/{mid}"), 200)
        await body(await b.put("/v1/threads/t1", json={"title": "renamed"}), 200)
        await append(b, "t1")
        got = [await recv(ws) for _ in range(4)]
    assert [ev["type"] for ev in got] == ["message.updated", "message.deleted",
                                         "thread.updated", "message.created"]
    assert got[0]["seq"] == 1 and got[0]["message"]["content"] == "x"
    assert got[1]["message"]["deleted"] is True
    assert got[2]["thread"]["title"] == "renamed"
    assert got[3]["seq"] == 2


async def test_unsubscribe_stops_events(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        await send(ws, {"op": "unsubscribe", "thread_id": "t1"})
        await wait_for(lambda: _true(not the_hub(a).by_thread))
        await append(b, "t1")
        await send(ws, {"op": "ping"})
        assert await recv(ws) == {"type": "pong"}  # no event came first


# ---- gapless resume


async def test_resume_delivers_exactly_the_missed_then_live(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        await write_many(b, "t1", 10)
        assert await created_seqs(ws, "t1", 10) == list(range(1, 11))
    await write_many(b, "t1", 10)  # while disconnected
    async with a.ws_connect("/v1/ws") as ws:
        assert (await subscribe(ws, "t1", after_seq=10))["last_seq"] == 20
        assert await created_seqs(ws, "t1", 20) == list(range(11, 21))
        await write_many(b, "t1", 5)
        assert await created_seqs(ws, "t1", 25) == list(range(21, 26))
        await send(ws, {"op": "ping"})
        assert await recv(ws) == {"type": "pong"}  # nothing else was sent


@pytest.mark.parametrize(("page", "queue_size"), [(200, 1000), (7, 64)])
async def test_resume_while_writers_race_the_backfill(
        client_for: AppClient, servers: Servers, monkeypatch: pytest.MonkeyPatch,
        page: int, queue_size: int) -> None:
    """Backfill from seq 40 of 400 (some below the Redis window: PostgreSQL) while writers
    append 400 more; small pages and queue make the race long and hold events back."""
    monkeypatch.setattr(hub_module, "BACKFILL_PAGE", page)
    s = ws_settings(servers, ws={"queue_size": queue_size}, redis={"window": 100})
    a, b = await client_for(s), await client_for(s)
    await hub_listening(a, s.redis.shards)
    await new_thread(b, "t1")
    await write_many(b, "t1", 400, 8)
    async with a.ws_connect("/v1/ws") as ws:
        writers = asyncio.ensure_future(write_many(b, "t1", 400, 8))
        try:
            await subscribe(ws, "t1", after_seq=40)
            seqs = await created_seqs(ws, "t1", 800, timeout_s=60)
        finally:
            await writers
    assert seqs == list(range(41, 801))


async def kill_pubsub(client: Client, redis: aioredis.Redis, shards: int) -> None:
    """Kill every pub/sub connection of the Redis; wait until the client's hub listens again."""
    hub, connects = the_hub(client), the_hub(client).pubsub_connects
    assert await redis.client_kill_filter(_type="pubsub") >= 1
    await wait_for(lambda: _true(hub.pubsub_connects > connects))
    await hub_listening(client, shards)


async def test_pubsub_reconnect_resyncs(pair: tuple[Client, Client],
                                        redis: aioredis.Redis, settings: Settings) -> None:
    """Killing the sidecars' pub/sub connections loses what is published meanwhile; the
    subscriptions re-read it, so the subscriber still sees every seq once, in order."""
    a, b = pair
    await new_thread(b, "t1")
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        writers = asyncio.ensure_future(write_many(b, "t1", 300, 4))
        try:
            for _ in range(3):
                await kill_pubsub(a, redis, settings.redis.shards)
        finally:
            await writers
        assert await created_seqs(ws, "t1", 300) == list(range(1, 301))


# ---- slow consumers


def slow_closes() -> float:
    return sample("tierproxy_ws_slow_consumer_closes_total")


async def test_client_that_never_reads_is_closed(client_for: AppClient,
                                                 servers: Servers) -> None:
    s = ws_settings(servers, ws={"queue_size": 8})
    a, b = await client_for(s), await client_for(s)
    await hub_listening(a, s.redis.shards)
    hub = the_hub(a)
    await new_thread(b, "t1")
    closes_before = slow_closes()
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        conn = next(iter(hub.connections))
        big = "x" * 60_000
        deadline = time.monotonic() + 60
        while not conn.closed:  # the client reads nothing: TCP buffers fill, then the queue
            assert time.monotonic() < deadline, "never closed"
            await append(b, "t1", big)
            assert conn.queue.qsize() <= s.ws.queue_size
        assert conn.close_code == 4008 and conn.peak <= s.ws.queue_size
        assert conn.queue.qsize() == 0  # dropped
        assert slow_closes() == closes_before + 1
        while (msg := await ws.receive(timeout=DEADLINE_S)).type is WSMsgType.TEXT:
            pass  # what was already on the wire, then the close
        assert msg.type is WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4008, "slow consumer: resume with after_seq")
    await wait_for(lambda: _true(not hub.connections and not hub.by_thread))


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_metrics(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    await append(b, "t1")
    names = ["tierproxy_ws_connections", "tierproxy_ws_subscriptions",
             "tierproxy_ws_events_sent_total", "tierproxy_ws_delivery_seconds_count"]
    before = {n: sample(n) for n in names}
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1", after_seq=0)  # one backfilled event, then one live
        await append(b, "t1")
        assert await created_seqs(ws, "t1", 2) == [1, 2]
        assert sample(names[0]) == before[names[0]] + 1
        assert sample(names[1]) == before[names[1]] + 1
        assert sample(names[2]) == before[names[2]] + 2
        assert sample(names[3]) == before[names[3]] + 1  # live events only
    await wait_for(lambda: _true(sample(names[0]) == before[names[0]]))
    assert sample(names[1]) == before[names[1]]


# ---- auth and bad frames


async def test_auth_required_when_a_token_is_set(client_for: AppClient,
                                                 servers: Servers) -> None:
    client = await client_for(ws_settings(servers, api={"token": "s3cret"}))
    for path, headers in [("/v1/ws", {}), ("/v1/ws?token=wrong", {}),
                          ("/v1/ws", {"Authorization": "Bearer wrong"})]:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await client.ws_connect(path, headers=headers)
        assert e.value.status == 401
    for path, headers in [("/v1/ws?token=s3cret", {}),
                          ("/v1/ws", {"Authorization": "Bearer s3cret"})]:
        async with client.ws_connect(path, headers=headers) as ws:
            await send(ws, {"op": "ping"})
            assert await recv(ws) == {"type": "pong"}
    resp = await client.get("/v1/threads/t1?token=s3cret")  # the query token is for /v1/ws only
    assert resp.status == 401


BAD_FRAMES: list[tuple[Any, str]] = [
    (b"not json", "malformed"),
    ([1, 2], "malformed"),
    ({"thread_id": "t1"}, "unknown_op"),
    ({"op": "shout", "thread_id": "t1"}, "unknown_op"),
    ({"op": "publish", "thread_id": "t1"}, "invalid_field"),  # no event (issue 12.5)
    ({"op": "subscribe"}, "invalid_field"),
    ({"op": "subscribe", "thread_id": "bad id!"}, "invalid_field"),
    ({"op": "subscribe", "thread_id": "t1", "after_seq": -1}, "invalid_field"),
    ({"op": "subscribe", "thread_id": "t1", "after_seq": "3"}, "invalid_field"),
    ({"op": "subscribe", "thread_id": "t1", "extra": 1}, "invalid_field"),
    ({"op": "subscribe", "thread_id": "nope"}, "not_found"),
]


async def test_bad_frames_get_an_error_and_the_socket_stays(client_for: AppClient,
                                                            servers: Servers) -> None:
    client = await client_for(ws_settings(servers, ws={"max_subscriptions": 2}))
    for tid in ("t1", "t2", "t3"):
        await new_thread(client, tid)
    async with client.ws_connect("/v1/ws") as ws:
        for frame, code in BAD_FRAMES:
            if frame == b"not json":
                await ws.send_str("not json")
            else:
                await send(ws, frame)
            err = await recv(ws)
            assert err["type"] == "error" and err["code"] == code, (frame, err)
            assert isinstance(err["message"], str) and err["message"]
        await ws.send_bytes(b'{"op": "ping"}')
        assert (await recv(ws))["code"] == "malformed"
        await subscribe(ws, "t1")
        await subscribe(ws, "t2")
        await subscribe(ws, "t1")  # again: replaces, does not count twice
        await send(ws, {"op": "subscribe", "thread_id": "t3"})
        assert (await recv(ws))["code"] == "too_many_subscriptions"
        await send(ws, {"op": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def test_plain_http_get_is_a_json_400(client: Client) -> None:
    resp = await client.get("/v1/ws")
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "http_error"


# ---- shutdown


async def test_shutdown_closes_sockets_with_1001(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await new_thread(b, "t1")
    async with a.ws_connect("/v1/ws") as ws:
        await subscribe(ws, "t1")
        closing = asyncio.ensure_future(a.server.close())
        try:
            msg = await ws.receive(timeout=DEADLINE_S)
        finally:
            await closing
        assert msg.type is WSMsgType.CLOSE and msg.data == 1001


# ---- internals


def test_backfill_frame_matches_the_live_one() -> None:
    doc = b'{"seq":7,"message_id":"m","thread_id":"t1"}'
    live = (b'{"type":"message.created","thread_id":"t1","seq":7,"ts":1,"message":' + doc
            + b"}")
    seq, frame = wsframes.backfill_frame("t1", doc)
    assert seq == 7
    assert {**orjson.loads(live), "ts": None} == {**orjson.loads(frame), "ts": None}
    ev = wsframes.parse_event(live)
    assert ev is not None and (ev.type, ev.thread_id, ev.seq, ev.ts_ms) == (
        "message.created", "t1", 7, 1)


def test_channels_are_one_per_shard(settings: Settings) -> None:
    assert len({keys.events(s) for s in range(settings.redis.shards)}) == settings.redis.shards

