"""proxy.client's Subscription on real sidecars: subscribers on sidecar A, writers on B (one
Redis). Resume after the server closes with 4008 (a real slow consumer) or 1001, and after
cut connections, while writers keep appending: every seq once, in order. No sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy import client as tp
from proxy import routes
from proxy.hub import CLOSE_GOING_AWAY, GOING_AWAY_REASON, WebSocketHub
from proxy.settings import Settings
from tests.conftest import AppClient, Servers, make_settings
from tests.faults.tcpproxy import FaultProxy
from tests.helpers import wait_for

Client = TestClient[Any, Any]
DEADLINE_S = 30.0


def url_of(app: Client) -> str:
    return str(app.make_url(""))


def hub_of(app: Client) -> WebSocketHub:
    return app.app[routes.HUB]


async def _true(value: bool) -> bool:
    return value


def ws_settings(servers: Servers, **sections: dict[str, Any]) -> Settings:
    """A short shutdown deadline: these tests leave nothing to flush."""
    return make_settings(servers, **{"shutdown": {"deadline_s": 1.0}, **sections})


async def sidecars(client_for: AppClient, s: Settings) -> tuple[Client, Client]:
    """A (subscribers) and B (writers), A's hub listening to every shard."""
    a, b = await client_for(s), await client_for(s)
    hub = hub_of(a)
    await wait_for(lambda: _true(len(hub.subscribed_shards) == s.redis.shards))
    return a, b


@pytest.fixture
async def pair(client_for: AppClient, servers: Servers) -> tuple[Client, Client]:
    return await sidecars(client_for, ws_settings(servers))


@pytest.fixture
async def apis(pair: tuple[Client, Client]) -> AsyncIterator[tuple[tp.Client, tp.Client]]:
    async with tp.Client(url_of(pair[0])) as a, tp.Client(url_of(pair[1])) as b:
        yield a, b


async def write_many(api: tp.Client, tid: str, count: int, writers: int = 4,
                     content: str = "m") -> None:
    async def writer(n: int) -> None:
        for _ in range(n):
            await api.append(tid, content)

    await asyncio.gather(*(writer(count // writers + (i < count % writers))
                           for i in range(writers)))


async def created(sub: tp.Subscription, tid: str, until: int) -> list[int]:
    """The seqs of `tid`'s message.created events as handed out, until `until` arrives."""
    got: list[int] = []
    async with asyncio.timeout(DEADLINE_S):
        async for ev in sub:
            if ev.type == "message.created" and ev.thread_id == tid:
                assert ev.message is not None and ev.message["seq"] == ev.seq
                got.append(ev.seq or 0)
                if ev.seq == until:
                    return got
    raise AssertionError(f"the subscription ended at {got[-1:]} before seq {until}")


# ---- delivery


async def test_backfill_then_live(apis: tuple[tp.Client, tp.Client]) -> None:
    a, b = apis
    await b.put_thread("t1")
    await write_many(b, "t1", 5, 1)
    async with a.subscribe("t1", after_seq=0) as sub:
        backfill = [await anext(sub) for _ in range(5)]
        await write_many(b, "t1", 5, 1)
        live = [await anext(sub) for _ in range(5)]
    assert [e.seq for e in backfill + live] == list(range(1, 11))
    assert all(e.backfilled for e in backfill) and not any(e.backfilled for e in live)
    assert all(isinstance(e.ts_ms, int) for e in live)
    assert sub.positions == {"t1": 10} and sub.connects == 1


async def test_live_subscribe_starts_at_the_subscribe_point(
        apis: tuple[tp.Client, tp.Client]) -> None:
    a, b = apis
    await b.put_thread("t1")
    await write_many(b, "t1", 3, 1)
    async with a.subscribe("t1") as sub:
        assert sub.positions == {"t1": 3}  # subscribed: every later write is delivered
        await b.append("t1", "after")
        assert (await anext(sub)).seq == 4


async def test_several_threads_on_one_socket(apis: tuple[tp.Client, tp.Client]) -> None:
    a, b = apis
    for tid in ("t1", "t2", "t3"):
        await b.put_thread(tid)
    async with a.subscribe("t1", "t2", after_seq=0) as sub:
        await b.append("t1", "x")
        await b.append("t2", "y")
        got = {(e.thread_id, e.seq) for e in [await anext(sub), await anext(sub)]}
        assert got == {("t1", 1), ("t2", 1)}
        await sub.remove("t2")
        await sub.add("t3", after_seq=0)
        await b.append("t2", "ignored")
        await b.append("t3", "z")
        assert ((e := await anext(sub)).thread_id, e.seq) == ("t3", 1)
        assert sub.positions == {"t1": 1, "t3": 1}


async def test_edits_and_thread_events_pass_through(apis: tuple[tp.Client, tp.Client]) -> None:
    a, b = apis
    await b.put_thread("t1")
    async with a.subscribe("t1") as sub:
        mid = (await b.append("t1", "hi")).doc["message_id"]
        await b.edit_message("t1", mid, content="edited")
        await b.delete_message("t1", mid)
        await b.put_thread("t1", title="renamed")
        got = [await anext(sub) for _ in range(4)]
    assert [e.type for e in got] == ["message.created", "message.updated", "message.deleted",
                                     "thread.updated"]
    assert got[1].message is not None and got[1].message["content"] == "edited"
    assert got[2].message is not None and got[2].message["deleted"] is True
    assert got[3].thread is not None and got[3].thread["title"] == "renamed"


async def test_unknown_thread_is_not_found_and_the_rest_goes_on(
        apis: tuple[tp.Client, tp.Client]) -> None:
    a, b = apis
    await b.put_thread("t1")
    sub = a.subscribe("t1", "nope", after_seq=0)
    with pytest.raises(tp.NotFound) as e:
        await sub.connect()
    assert (e.value.thread_id, e.value.code, e.value.status) == ("nope", "not_found", None)
    async with sub:
        await b.append("t1", "x")
        assert (await anext(sub)).seq == 1
    assert sub.positions == {"t1": 1}


async def test_bearer_token(client_for: AppClient, servers: Servers) -> None:
    app = await client_for(ws_settings(servers, api={"token": "s3cret"}))
    async with tp.Client(url_of(app), token="s3cret") as api:
        await api.put_thread("t1")
        await api.append("t1", "x")
        async with api.subscribe("t1", after_seq=0) as sub:
            assert (await anext(sub)).seq == 1
    async with tp.Client(url_of(app), token="wrong") as api:
        with pytest.raises(tp.Unauthorized) as e:
            await api.subscribe("t1").connect()
    assert e.value.status == 401 and e.value.attempts == 1


# ---- resume: no gap, no duplicate


async def test_resume_after_4008_slow_consumer(client_for: AppClient,
                                               servers: Servers) -> None:
    """The client stops reading while big messages are written: its socket buffers fill,
    then the server's send queue, and the server closes with 4008. Reading again yields
    what was buffered, then the rest from the resumed subscription."""
    s = ws_settings(servers, ws={"queue_size": 8})
    app_a, app_b = await sidecars(client_for, s)
    async with tp.Client(url_of(app_a)) as a, tp.Client(url_of(app_b)) as b:
        await b.put_thread("t1")
        async with a.subscribe("t1", after_seq=0) as sub:
            conn = next(iter(hub_of(app_a).connections))
            written = 0
            async with asyncio.timeout(60):
                while not conn.closed:
                    await b.append("t1", "x" * 60_000)
                    written += 1
            assert conn.close_code == 4008
            await write_many(b, "t1", 5)  # while disconnected
            assert await created(sub, "t1", written + 5) == list(range(1, written + 6))
        assert sub.connects >= 2 and sub.last_close_code == 4008


async def consume(sub: tp.Subscription, tid: str, until: int) -> list[int]:
    async with sub:
        return await created(sub, tid, until)


async def test_resume_after_1001_while_writing(pair: tuple[Client, Client]) -> None:
    """Three times: the server closes the socket (1001) while 100 appends are under way."""
    app_a, app_b = pair
    async with tp.Client(url_of(app_a)) as a, tp.Client(url_of(app_b)) as b:
        await b.put_thread("t1")
        sub = a.subscribe("t1", after_seq=0)
        reader = asyncio.ensure_future(consume(sub, "t1", 400))
        for n in range(1, 4):
            await wait_for(lambda n=n: _true(sub.connects == n and _one_conn(app_a)))
            writing = asyncio.ensure_future(write_many(b, "t1", 100))
            next(iter(hub_of(app_a).connections)).close(CLOSE_GOING_AWAY, GOING_AWAY_REASON)
            await writing
        await write_many(b, "t1", 100)
        assert await reader == list(range(1, 401))
    assert sub.connects == 4 and sub.last_close_code == 1001


def _one_conn(app: Client) -> bool:
    return len(hub_of(app).connections) == 1


@pytest.fixture
def fault(pair: tuple[Client, Client]) -> Iterator[FaultProxy]:
    """A TCP fault proxy in front of sidecar A."""
    with FaultProxy("127.0.0.1", pair[0].make_url("").port or 0) as proxy:
        yield proxy


async def test_resume_after_cut_connections_while_writing(pair: tuple[Client, Client],
                                                          fault: FaultProxy) -> None:
    """Three times: the connection is reset while 100 appends to each of two threads
    followed on one socket are under way."""
    _, app_b = pair
    async with tp.Client(f"http://127.0.0.1:{fault.port}") as a, \
            tp.Client(url_of(app_b)) as b:
        await b.put_thread("t1")
        await b.put_thread("t2")
        sub = a.subscribe("t1", "t2", after_seq=0)
        readers = asyncio.ensure_future(_two_threads(sub, 400))
        for n in range(1, 4):
            await wait_for(lambda n=n: _true(sub.connects == n))
            writing = asyncio.ensure_future(asyncio.gather(write_many(b, "t1", 100),
                                                           write_many(b, "t2", 100)))
            await asyncio.to_thread(fault.cut)
            await writing
        await asyncio.gather(write_many(b, "t1", 100), write_many(b, "t2", 100))
        t1, t2 = await readers
    assert t1 == list(range(1, 401)) and t2 == list(range(1, 401))
    assert sub.connects == 4


async def _two_threads(sub: tp.Subscription, until: int) -> tuple[list[int], list[int]]:
    got: dict[str, list[int]] = {"t1": [], "t2": []}
    async with sub, asyncio.timeout(DEADLINE_S):
        async for ev in sub:
            if ev.type == "message.created":
                got[ev.thread_id].append(ev.seq or 0)
                if all(seqs[-1:] == [until] for seqs in got.values()):
                    break
    return got["t1"], got["t2"]


async def test_reconnecting_gives_up_then_resumes_when_asked(pair: tuple[Client, Client],
                                                             fault: FaultProxy) -> None:
    """While the sidecar cannot be reached, the reconnect policy's attempts are spent and
    TransportError is raised; iterating again later resumes where it stopped."""
    _, app_b = pair
    policy = tp.RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05)
    async with tp.Client(f"http://127.0.0.1:{fault.port}") as a, \
            tp.Client(url_of(app_b)) as b:
        await b.put_thread("t1")
        async with a.subscribe("t1", after_seq=0, reconnect=policy) as sub:
            await b.append("t1", "1")
            assert (await anext(sub)).seq == 1
            await asyncio.to_thread(fault.set_mode, "down")
            with pytest.raises(tp.TransportError) as e:
                await anext(sub)
            assert e.value.attempts == 3
            await b.append("t1", "2")
            await asyncio.to_thread(fault.set_mode, "pass")
            assert (await anext(sub)).seq == 2
        assert sub.connects == 2


async def test_resume_after_a_silent_connection(pair: tuple[Client, Client],
                                                fault: FaultProxy) -> None:
    """Black-holed (no close, no reset): the heartbeat's ping gets no pong, the socket is
    dropped and resumed once the path works again."""
    _, app_b = pair
    async with tp.Client(f"http://127.0.0.1:{fault.port}") as a, \
            tp.Client(url_of(app_b)) as b:
        await b.put_thread("t1")
        async with a.subscribe("t1", after_seq=0, heartbeat_s=1.0) as sub:
            await b.append("t1", "1")
            assert (await anext(sub)).seq == 1
            await asyncio.to_thread(fault.set_mode, "blackhole")
            following = asyncio.ensure_future(anext(sub))
            await b.append("t1", "2")
            await wait_for(lambda: _true(sub.last_close_code is not None))
            await asyncio.to_thread(fault.set_mode, "pass")
            await asyncio.to_thread(fault.cut)  # the reconnect attempt sent into the hole
            assert (await following).seq == 2
        assert sub.last_close_code == 1006 and sub.connects >= 2


# ---- following the changes (after_cseq); resume turned off


async def changes_until(sub: tp.Subscription, cseq: int) -> list[tuple[str, int]]:
    """(type, cseq) of the events handed out until the one of `cseq`."""
    got: list[tuple[str, int]] = []
    async with asyncio.timeout(DEADLINE_S):
        async for ev in sub:
            assert ev.cseq is not None, ev
            got.append((ev.type, ev.cseq))
            if ev.cseq >= cseq:
                return got
    raise AssertionError(f"the subscription ended at {got[-1:]} before cseq {cseq}")


async def test_after_cseq_resumes_with_every_change_once(pair: tuple[Client, Client],
                                                         fault: FaultProxy) -> None:
    """Edits and deletes made while the socket is cut are replayed on resume (a seq
    subscription would not see them), each change once, in cseq order."""
    _, app_b = pair
    async with tp.Client(f"http://127.0.0.1:{fault.port}") as a, \
            tp.Client(url_of(app_b)) as b:
        await b.put_thread("t1")  # cseq 1
        mids = [(await b.append("t1", f"m{i}")).doc["message_id"] for i in range(3)]  # 2-4
        async with a.subscribe("t1", after_cseq=1) as sub:
            assert await changes_until(sub, 4) == [("message.created", c) for c in (2, 3, 4)]
            await asyncio.to_thread(fault.set_mode, "down")
            await asyncio.to_thread(fault.cut)
            await b.edit_message("t1", mids[0], content="edited")  # 5
            await b.delete_message("t1", mids[1])  # 6
            await b.put_thread("t1", title="renamed")  # 7
            await asyncio.to_thread(fault.set_mode, "pass")
            assert await changes_until(sub, 7) == [
                ("message.updated", 5), ("message.deleted", 6), ("thread.updated", 7)]
            await b.append("t1", "live")  # 8
            assert await changes_until(sub, 8) == [("message.created", 8)]
        assert sub.positions == {"t1": 8} and sub.connects == 2


async def test_a_position_past_the_thread_raises_resync(
        apis: tuple[tp.Client, tp.Client]) -> None:
    a, b = apis
    await b.put_thread("t1")
    await b.append("t1", "one")
    async with a.subscribe("t1", after_cseq=9) as sub:
        with pytest.raises(tp.Resync) as e:
            await anext(sub)
    assert (e.value.thread_id, e.value.cseq, e.value.code) == ("t1", 2, "resync")
    assert sub.positions == {}
    with pytest.raises(ValueError, match="not both"):
        a.subscribe("t1", after_seq=0, after_cseq=0)


async def test_resume_false_ends_the_iteration_when_the_socket_ends(
        pair: tuple[Client, Client], fault: FaultProxy) -> None:
    _, app_b = pair
    async with tp.Client(f"http://127.0.0.1:{fault.port}") as a, \
            tp.Client(url_of(app_b)) as b:
        await b.put_thread("t1")
        async with a.subscribe("t1", after_seq=0, resume=False) as sub:
            await b.append("t1", "1")
            assert (await anext(sub)).seq == 1
            await asyncio.to_thread(fault.cut)
            async with asyncio.timeout(DEADLINE_S):
                assert [ev async for ev in sub] == []
            await b.append("t1", "2")
            with pytest.raises(StopAsyncIteration):
                await anext(sub)
        assert (sub.connects, sub.positions) == (1, {"t1": 1})
