"""proxy.client against real in-process sidecars (real Redis, PostgreSQL, chDB): every
method, the error tree, retries that are safe (proved through the TCP fault proxy), pages
as iterators, ETag helpers and the blocking wrapper. WebSocket: test_client_ws.py."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import client as tp
from proxy.client.errors import error_from_response
from proxy.client.results import durability_of
from tests.conftest import AppClient, Servers, make_settings
from tests.faults.tcpproxy import FaultProxy
from tests.helpers import PAUSED, wait_for
from tests.test_erasure import redis_holding

Client = TestClient[Any, Any]
FAST = tp.RetryPolicy(attempts=3, total_s=10.0, base_s=0.01, cap_s=0.05)


def url_of(app: Client) -> str:
    return str(app.make_url(""))


@pytest.fixture
async def api(client: Client) -> AsyncIterator[tp.Client]:
    async with tp.Client(url_of(client), retry=FAST) as c:
        yield c


async def raised(kind: type[tp.APIError], call: Awaitable[Any]) -> tp.APIError:
    """The error `call` raised, which must be a `kind`."""
    with pytest.raises(kind) as e:
        await call
    return e.value


async def seqs(it: AsyncIterator[dict[str, Any]]) -> list[int]:
    return [m["seq"] async for m in it]


# ---- threads, messages, pages


async def test_threads_round_trip(api: tp.Client) -> None:
    w = await api.put_thread("t1", title="a", owner_id="u1", metadata={"k": 1})
    assert (w.created, w.status, w.version, w.durability, w.attempts) == (
        True, 201, 1, "acknowledged", 1)
    assert w.doc["title"] == "a" and w.doc["metadata"] == {"k": 1}
    w = await api.put_thread("t1", title="b")
    assert (w.created, w.status, w.version) == (False, 200, 2)
    r = await api.get_thread("t1")
    assert (r.doc["title"], r.doc["last_seq"], r.version, r.tier) == ("b", 0, 2, "redis")
    d = await api.delete_thread("t1", if_match=2)
    assert d.doc["deleted"] is True and d.version == 3
    await raised(tp.NotFound, api.get_thread("t1"))
    assert (await raised(tp.Conflict, api.put_thread("t1"))).status == 409


async def test_if_match_on_threads(api: tp.Client) -> None:
    await api.put_thread("t1")
    e = await raised(tp.PreconditionFailed, api.put_thread("t1", title="x", if_match=5))
    assert (e.status, e.code, e.detail, e.ambiguous, e.attempts) == (
        412, "precondition_failed", {"version": "1"}, False, 1)
    assert (await api.put_thread("t1", title="x", if_match=1)).version == 2


async def test_ids_that_are_dots_travel_as_ids(api: tp.Client) -> None:
    for tid in ("..", ".", "a:b.c"):
        await api.put_thread(tid, title=tid)
        assert (await api.get_thread(tid)).doc["thread_id"] == tid


async def test_append_generates_sortable_ids(api: tp.Client) -> None:
    await api.put_thread("t1")
    written = [await api.append("t1", f"m{i}") for i in range(3)]
    assert [w.doc["seq"] for w in written] == [1, 2, 3]
    assert all(w.created and w.status == 201 and w.version == 1 for w in written)
    ids = [w.doc["message_id"] for w in written]
    assert ids == sorted(ids) and all(len(i) == 26 for i in ids)


async def test_append_with_own_id_is_idempotent(api: tp.Client) -> None:
    await api.put_thread("t1")
    first = await api.append("t1", "hi", role="assistant", message_id="m1")
    again = await api.append("t1", "hi", role="assistant", message_id="m1")
    assert first.created and not again.created and again.status == 200
    assert again.doc == first.doc
    e = await raised(tp.Conflict, api.append("t1", "other", message_id="m1"))
    assert e.code == "conflict"


async def test_get_edit_delete_message(api: tp.Client) -> None:
    await api.put_thread("t1")
    mid = (await api.append("t1", "hi")).doc["message_id"]
    r = await api.get_message("t1", mid)
    assert (r.doc["content"], r.version) == ("hi", 1)
    w = await api.edit_message("t1", mid, content="edited", if_match=1)
    assert (w.doc["content"], w.version, w.created) == ("edited", 2, False)
    await raised(tp.PreconditionFailed, api.edit_message("t1", mid, content="x", if_match=1))
    w = await api.edit_message("t1", mid, role="assistant", metadata={"m": True})
    assert (w.doc["role"], w.doc["metadata"], w.version) == ("assistant", {"m": True}, 3)
    d = await api.delete_message("t1", mid, if_match=3)
    assert d.doc["deleted"] is True and d.doc["content"] == ""
    await raised(tp.NotFound, api.get_message("t1", mid))


@pytest.fixture
async def seeded(api: tp.Client) -> tp.Client:
    await api.put_thread("t1")
    for i in range(25):
        await api.append("t1", f"m{i}")
    return api


async def test_pages_forward_and_backward(seeded: tp.Client) -> None:
    api = seeded
    forward = [[m["seq"] for m in p.items] async for p in api.pages("t1", after=0, limit=10)]
    assert forward == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    backward = [[m["seq"] for m in p.items] async for p in api.pages("t1", limit=10)]
    assert backward == [list(range(16, 26)), list(range(6, 16)), list(range(1, 6))]
    assert await seqs(api.messages("t1", after=0, limit=7)) == list(range(1, 26))
    assert await seqs(api.messages("t1", limit=7)) == list(range(25, 0, -1))
    assert await seqs(api.messages("t1", after=20)) == [21, 22, 23, 24, 25]
    assert await seqs(api.messages("t1", before=6, limit=2)) == [5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="not both"):
        await seqs(api.messages("t1", after=1, before=5))


async def test_one_page_and_its_cursor(seeded: tp.Client) -> None:
    page = await seeded.list_messages("t1", limit=5)
    assert (page.thread_id, page.last_seq, page.next_cursor, page.tier) == (
        "t1", 25, {"before": 21}, "redis")
    assert [m["seq"] for m in page.items] == [21, 22, 23, 24, 25]
    page = await seeded.list_messages("t1", after=22)
    assert page.next_cursor is None and [m["seq"] for m in page.items] == [23, 24, 25]


# ---- state and ETags


async def test_state_with_etags(api: tp.Client) -> None:
    w = await api.put_state("k", {"a": 1}, ttl_s=60)
    assert (w.created, w.version) == (True, 1)
    r = await api.get_state("k")
    assert (r.doc["value"], r.version) == ({"a": 1}, 1) and r.doc["expires_at"] is not None
    assert (await api.put_state("k", 2, if_match=r.version)).version == 2
    e = await raised(tp.PreconditionFailed, api.put_state("k", 3, if_match=1))
    assert e.detail == {"version": "2"}
    assert (await api.delete_state("k", if_match=2)).doc["deleted"] is True
    await raised(tp.NotFound, api.get_state("k"))
    await raised(tp.NotFound, api.delete_state("k"))
    await raised(tp.PreconditionFailed, api.put_state("k", 1, if_match=3))  # absent: no match
    assert tp.etag(7) == '"7"'


async def test_update_state_is_a_compare_and_set_loop(api: tp.Client) -> None:
    await api.put_state("counter", 0)

    async def bump() -> None:
        for _ in range(5):
            await api.update_state("counter", lambda n: n + 1, attempts=100)

    await asyncio.gather(*(bump() for _ in range(8)))
    r = await api.get_state("counter")
    assert r.doc["value"] == 40 and r.version == 41
    w = await api.update_state("fresh", lambda v: {"was": v})  # absent: change(None)
    assert w.created and w.doc["value"] == {"was": None}


# ---- operations and durability


async def test_operations(api: tp.Client, ch: Any) -> None:
    status = await api.status()
    assert set(status["sinks"]) >= {"pg", "ch"} and "dead_letters" in status
    assert await api.replay_dead_letters() == 0
    assert await api.ready() is True
    health = await api.request("GET", "/healthz")
    assert (health.status, health.json()) == (200, {"status": "ok"})
    await api.put_thread("s1")
    await raised(tp.NotFound, api.thread_stats("s1"))  # no message events yet
    await api.append("s1", "hello", role="user")
    await api.append("s1", "hi", role="assistant")

    async def counted() -> dict[str, Any] | None:
        try:
            stats = await api.thread_stats("s1")
        except tp.NotFound:
            return None
        return stats if stats["messages"] == 2 else None

    assert (await wait_for(counted, timeout_s=20))["content_bytes"] == 7


async def test_persisted_writes_are_in_postgresql_on_return(
        client: Client, pg: asyncpg.Connection) -> None:
    async with tp.Client(url_of(client), durability="persisted") as api:
        w = await api.put_thread("t1")
        assert (w.status, w.durability) == (201, "persisted")
        m = await api.append("t1", "kept", durability="persisted")
        a = await api.append("t1", "fast", durability="acknowledged")
    assert m.durability == "persisted" and a.durability == "acknowledged"
    rows = await pg.fetch("SELECT content FROM messages WHERE message_id = $1",
                          m.doc["message_id"])
    assert [r["content"] for r in rows] == ["kept"]


# ---- inbox, read markers, the changes feed, erasure (issue 12)


async def test_inbox_pages_newest_activity_first_with_unread(api: tp.Client) -> None:
    for tid in ("i1", "i2", "i3"):
        await api.put_thread(tid, owner_id="own")
    await api.append("i1", "newest activity")
    page = await api.inbox("own", limit=2)
    assert ([t["thread_id"] for t in page.items], page.owner_id, page.tier) == (
        ["i1", "i3"], "own", "redis")
    assert isinstance(page.next_cursor, str) and "unread" not in page.items[0]
    rest = await api.inbox("own", limit=2, before=page.next_cursor)
    assert ([t["thread_id"] for t in rest.items], rest.next_cursor) == (["i2"], None)
    walked = [[t["thread_id"] for t in p.items]
              async for p in api.inbox_pages("own", user_id="u1", limit=1)]
    assert walked == [["i1"], ["i3"], ["i2"]]
    assert [t["unread"] async for p in api.inbox_pages("own", user_id="u1")
            for t in p.items] == [1, 0, 0]
    assert (await raised(tp.Invalid, api.inbox("bad id"))).detail == {"field": "owner_id"}


async def test_read_markers_move_forward_only(api: tp.Client) -> None:
    await api.put_thread("r1")
    for i in range(3):
        await api.append("r1", f"m{i}")
    assert await api.get_read_marker("r1", "u1") == tp.Marker("r1", "u1", 0, 3, "redis")
    moved = await api.put_read_marker("r1", "u1", 2)
    assert (moved.seq, moved.unread, moved.durability) == (2, None, "acknowledged")
    assert (await api.put_read_marker("r1", "u1", 1)).seq == 2  # never back
    assert (await api.get_read_marker("r1", "u1")).unread == 1
    persisted = await api.put_read_marker("r1", "u1", 3, durability="persisted")
    assert (persisted.seq, persisted.durability) == (3, "persisted")
    assert (await raised(tp.Invalid, api.put_read_marker("r1", "u1", 9))).status == 422
    await raised(tp.NotFound, api.get_read_marker("nope", "u1"))


async def test_changes_pages_each_entity_once_at_its_latest_change(api: tp.Client) -> None:
    await api.put_thread("c1")  # cseq 1
    mids = [(await api.append("c1", f"m{i}")).doc["message_id"] for i in range(3)]  # 2..4
    await api.edit_message("c1", mids[0], content="edited")  # 5
    await api.delete_message("c1", mids[1])  # 6
    page = await api.changes("c1", after_cseq=1, limit=2)
    assert (page.thread_id, page.last_cseq, page.next_cursor, page.tier) == (
        "c1", 6, {"after_cseq": 5}, "redis")
    items = [i async for p in api.change_pages("c1", limit=2) for i in p.items]
    assert [(i["kind"], i["doc"]["cseq"]) for i in items] == [
        ("thread", 1), ("message", 4), ("message", 5), ("message", 6)]
    assert (await api.changes("c1", after_cseq=6)).items == []
    e = await raised(tp.Resync, api.changes("c1", after_cseq=7))
    assert (e.status, e.cseq) == (409, 6)


async def test_erase_removes_the_content_from_redis(api: tp.Client,
                                                    redis: aioredis.Redis) -> None:
    await api.put_thread("e1", title="secret-title-e1")
    mid = (await api.append("e1", "secret-message-e1")).doc["message_id"]
    await api.append("e1", "kept")
    assert (await api.delete_message("e1", mid, erase=True)).doc["deleted"]
    assert not await redis_holding(redis, "secret-message-e1")
    assert await redis_holding(redis, "secret-title-e1")
    assert (await api.delete_thread("e1", erase=True)).doc["deleted"]
    assert not await redis_holding(redis, "secret-title-e1")
    assert not await redis_holding(redis, "kept")


async def test_a_202_says_whether_it_created(api: tp.Client) -> None:
    """The suite's Redis has no replica: `replicated` is answered 202 (acknowledged), and
    `created` must still tell a creation from a replacement."""
    new = await api.put_thread("d1", durability="replicated")
    assert (new.status, new.created, new.durability) == (202, True, "acknowledged")
    again = await api.put_thread("d1", title="x", durability="replicated")
    assert (again.status, again.created) == (202, False)
    first = await api.append("d1", "m", message_id="m1", durability="replicated")
    repeat = await api.append("d1", "m", message_id="m1", durability="replicated")
    assert (first.status, first.created, repeat.status, repeat.created) == (
        202, True, 202, False)
    state = await api.put_state("k1", 1, durability="replicated")
    assert (state.status, state.created) == (202, True)


# ---- errors


async def test_error_mapping(api: tp.Client) -> None:
    e = await raised(tp.NotFound, api.get_thread("nope"))
    assert (e.status, e.code, isinstance(e, LookupError)) == (404, "not_found", True)
    assert "nope" in e.message and str(e).startswith("404 not_found: ")
    await api.put_thread("t1")
    e = await raised(tp.Invalid, api.append("t1", "x", role=""))
    assert (e.status, e.detail, isinstance(e, ValueError)) == (422, {"field": "role"}, True)
    e = await raised(tp.Malformed, api.list_messages("t1", limit=0))
    assert (e.status, e.detail) == (400, {"param": "limit"})
    e = await raised(tp.UnsupportedMediaType, api.request(
        "POST", "/v1/threads/t1/messages", data=b"hi", headers={"Content-Type": "text/plain"}))
    assert e.status == 415
    answer = await api.request("GET", "/v1/threads/nope", expect_error=True)
    assert answer.status == 404 and answer.json()["error"]["code"] == "not_found"


async def test_too_large_body(client_for: AppClient, servers: Servers) -> None:
    app = await client_for(make_settings(servers, api={"max_body_bytes": 2048}))
    async with tp.Client(url_of(app)) as api:
        await api.put_thread("t1")
        e = await raised(tp.TooLarge, api.append("t1", "x" * 5000))
    assert (e.status, e.code, e.detail) == (413, "too_large", {"limit": 2048})


async def test_bearer_token(client_for: AppClient, servers: Servers) -> None:
    app = await client_for(make_settings(servers, api={"token": "s3cret"}))
    async with tp.Client(url_of(app), token="wrong") as api:
        e = await raised(tp.Unauthorized, api.get_thread("t1"))
    assert e.status == 401 and isinstance(e, PermissionError) and e.attempts == 1
    async with tp.Client(url_of(app), token="s3cret") as api:
        assert (await api.put_thread("t1")).created


def test_errors_that_are_not_the_api_json() -> None:
    e = error_from_response(502, {}, b"<html>bad gateway</html>")
    assert type(e) is tp.APIError and (e.status, e.code) == (502, "http_error")
    assert "bad gateway" in e.message
    e = error_from_response(429, {"Retry-After": "3"}, b"")
    assert isinstance(e, tp.Backpressure) and e.retry_after_s == 3.0


# ---- retries


async def test_backpressure_is_a_503_with_retry_after(client_for: AppClient,
                                                      servers: Servers) -> None:
    """Flushing paused and a backlog bound of 2: the third write is refused (503)."""
    app = await client_for(make_settings(servers, **PAUSED, flush={"max_backlog": 2}))
    async with tp.Client(url_of(app), retry=tp.NO_RETRY) as api:
        await api.put_thread("t1")
        await api.append("t1", "one")
        await wait_for(lambda: _backlog_at_least(api, 2))
        e = await raised(tp.Backpressure, api.append("t1", "two"))
        assert (e.status, e.code, e.retry_after_s, e.attempts, e.ambiguous) == (
            503, "backpressure", 1.0, 1, False)
        # Retried once after Retry-After, refused again; a deadline shorter than
        # Retry-After stops before waiting.
        once_more = tp.RetryPolicy(attempts=2, total_s=30.0)
        assert (await raised(tp.Backpressure, _with(app, once_more, "t1"))).attempts == 2
        short = tp.RetryPolicy(attempts=5, total_s=0.5)
        assert (await raised(tp.Backpressure, _with(app, short, "t1"))).attempts == 1


async def _backlog_at_least(api: tp.Client, n: int) -> bool:
    return bool((await api.status())["sinks"]["pg"]["backlog"] >= n)


async def _with(app: Client, policy: tp.RetryPolicy, tid: str) -> tp.Written:
    async with tp.Client(url_of(app), retry=policy) as api:
        return await api.append(tid, "again")


@pytest.fixture
def fault(client: Client) -> Iterator[FaultProxy]:
    """A TCP fault proxy in front of the sidecar."""
    with FaultProxy("127.0.0.1", client.make_url("").port or 0) as proxy:
        yield proxy


async def lost_answer(proxy: FaultProxy, call: Awaitable[Any],
                      applied: Callable[[], Awaitable[bool]]) -> asyncio.Future[Any]:
    """Send `call` while the proxy drops replies; once the server has applied it, heal and
    cut the connection, so the client sees a reset after its request was processed."""
    await asyncio.to_thread(proxy.set_mode, "drop_replies")
    pending = asyncio.ensure_future(call)
    try:
        await wait_for(applied)
    finally:
        await asyncio.to_thread(proxy.set_mode, "pass")
        await asyncio.to_thread(proxy.cut)
    await asyncio.wait([pending])
    return pending


async def test_append_retried_after_a_cut_lands_once(api: tp.Client,
                                                     fault: FaultProxy) -> None:
    async with tp.Client(f"http://127.0.0.1:{fault.port}", retry=FAST) as through:
        await through.put_thread("t1")

        async def landed() -> bool:
            return (await api.get_thread("t1")).doc["last_seq"] == 1

        written = (await lost_answer(fault, through.append("t1", "once"), landed)).result()
    assert (written.attempts, written.created, written.status) == (2, True, 200)
    assert await seqs(api.messages("t1", after=0)) == [1]
    assert (await api.get_message("t1", written.doc["message_id"])).doc["content"] == "once"


async def one_message(api: tp.Client) -> tuple[str, Callable[[], Awaitable[bool]]]:
    """A thread t1 with one message: its id, and a check that it was edited once."""
    await api.put_thread("t1")
    mid = (await api.append("t1", "hi")).doc["message_id"]

    async def edited() -> bool:
        return (await api.get_message("t1", mid)).version == 2

    return mid, edited


async def test_patch_without_if_match_is_not_repeated(api: tp.Client,
                                                      fault: FaultProxy) -> None:
    mid, edited = await one_message(api)
    async with tp.Client(f"http://127.0.0.1:{fault.port}", retry=FAST) as through:
        done = await lost_answer(fault, through.edit_message("t1", mid, content="x"), edited)
    e = done.exception()
    assert isinstance(e, tp.TransportError)
    assert (e.sent, e.attempts, e.ambiguous) == (True, 1, True)
    assert (await api.get_message("t1", mid)).version == 2  # applied once, not again


async def test_patch_with_if_match_repeated_gets_an_ambiguous_412(api: tp.Client,
                                                                  fault: FaultProxy) -> None:
    mid, edited = await one_message(api)
    async with tp.Client(f"http://127.0.0.1:{fault.port}", retry=FAST) as through:
        call = through.edit_message("t1", mid, content="x", if_match=1)
        e = (await lost_answer(fault, call, edited)).exception()
    assert isinstance(e, tp.PreconditionFailed)
    assert (e.attempts, e.ambiguous, e.detail) == (2, True, {"version": "2"})


async def test_delete_repeated_after_a_lost_answer_is_an_ambiguous_404(
        api: tp.Client, fault: FaultProxy) -> None:
    await api.put_state("k", 1)

    async def gone() -> bool:
        try:
            await api.get_state("k")
        except tp.NotFound:
            return True
        return False

    async with tp.Client(f"http://127.0.0.1:{fault.port}", retry=FAST) as through:
        e = (await lost_answer(fault, through.delete_state("k"), gone)).exception()
    assert isinstance(e, tp.NotFound) and (e.attempts, e.ambiguous) == (2, True)


async def test_refused_connections_are_retried_then_raised() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with tp.Client(f"http://127.0.0.1:{port}", retry=FAST) as api:
        with pytest.raises(tp.TransportError) as e:
            await api.edit_message("t1", "m1", content="x")  # never sent: safe to repeat
    assert (e.value.sent, e.value.attempts, e.value.ambiguous) == (False, 3, False)
    assert isinstance(e.value, ConnectionError)


async def test_connections_are_reused(fault: FaultProxy) -> None:
    async with tp.Client(f"http://127.0.0.1:{fault.port}") as api:
        await api.put_thread("t1")
        for i in range(20):
            await api.append("t1", f"m{i}")
            await api.get_thread("t1")
        assert fault.connections == 1


def test_durability_reached() -> None:
    """A 2xx other than 202 reached the level asked for; a 202 says in X-Durability what it
    reached (the server's contract: never a 2xx that claims more than happened)."""
    assert durability_of(201, {}, None) == "acknowledged"
    assert durability_of(201, {}, "persisted") == "persisted"
    assert durability_of(202, {"X-Durability": "acknowledged"}, "persisted") == "acknowledged"
    assert durability_of(202, {}, "replicated") == "acknowledged"
    assert tp.Written({}, True, 1, "acknowledged", 202).accepted_only


def test_backoff_has_full_jitter_and_honours_retry_after() -> None:
    policy = tp.RetryPolicy(base_s=0.1, cap_s=1.0)
    for attempt in range(1, 10):
        ceiling = min(1.0, 0.1 * 2 ** attempt)
        assert all(0 <= policy.backoff_s(attempt) <= ceiling for _ in range(50))
        assert policy.backoff_s(attempt, retry_after_s=3.0) == 3.0


# ---- the blocking wrapper, and what the client imports


def _script(url: str) -> dict[str, Any]:
    """What a script would do, with no event loop of its own."""
    with tp.SyncClient(url) as c:
        c.put_thread("t1", title="sync", owner_id="o1")
        for i in range(5):
            c.append("t1", f"m{i}")
        every = [m["seq"] for m in c.messages("t1", after=0, limit=2)]
        newest_first = c.messages("t1")
        newest = next(newest_first)["seq"]
        newest_first.close()  # left early: closing it closes the async generator
        try:
            c.get_state("nope")
            missing = None
        except tp.NotFound as e:
            missing = e.status
        with c.subscribe("t1", after_seq=3) as sub:
            events = [next(sub).seq, next(sub).seq]
            live = c.append("t1", "live")  # cseq 7 (the thread's put was 1)
            events.append(next(sub).seq)
        c.edit_message("t1", live.doc["message_id"], content="edited")  # cseq 8
        with c.subscribe("t1", after_cseq=6) as sub:  # the changes feed: edits too
            changes = [(ev.type, ev.cseq) for ev in [next(sub)]]  # replayed: live's edit
            c.append("t1", "after")  # seq 7, cseq 9: live
            changes.append(((ev := next(sub)).type, ev.cseq))
        c.put_read_marker("t1", "u1", 4)
        feed = [len(p.items) for p in c.change_pages("t1", after_cseq=1, limit=4)]
        return {"every": every, "newest": newest, "missing": missing, "events": events,
                "changes": changes,
                "title": c.get_thread("t1").doc["title"], "feed": feed,
                "unread": c.get_read_marker("t1", "u1").unread,
                "inbox": [len(p.items) for p in c.inbox_pages("o1", limit=1)]}


async def test_sync_client(client: Client) -> None:
    got = await asyncio.to_thread(_script, url_of(client))
    assert got == {"every": [1, 2, 3, 4, 5], "newest": 5, "missing": 404, "events": [4, 5, 6],
                   "changes": [("message.updated", 8), ("message.created", 9)],
                   "title": "sync", "feed": [4, 3], "unread": 3, "inbox": [1]}


async def test_a_closed_client_refuses_calls(client: Client) -> None:
    api = tp.Client(url_of(client))
    await api.put_thread("t1")
    await api.close()
    with pytest.raises(RuntimeError, match="closed"):
        await api.get_thread("t1")


def test_imports_only_aiohttp_and_orjson() -> None:
    code = ("import sys, proxy.client; print(sorted({m.split('.')[0] for m in sys.modules}"
            " & {'redis', 'asyncpg', 'clickhouse_connect', 'chdb', 'prometheus_client'}),"
            " sorted(m for m in sys.modules if m.startswith('proxy')"
            " and not m.startswith('proxy.client')))")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "['proxy']"]
