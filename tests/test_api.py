"""The HTTP API on real Redis: every route's success path and every documented error status.

Every rejected request is also checked to leave Redis exactly as it was (`unchanged`).
"""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from proxy import keys
from proxy.app import create_app
from proxy.backends import GROUPS
from proxy.embedded import RedisServer
from proxy.settings import Settings
from tests import helpers
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import PAUSED, append, body, error, log_entries, wait_for

Client = TestClient[Any, Any]
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


async def new_thread(client: Client, tid: str = "t1", **fields: Any) -> Any:
    return await body(await client.put(f"/v1/threads/{tid}", json=fields), 201)


async def seqs_of(client: Client, query: str) -> tuple[list[int], Any]:
    page = await body(await client.get(f"/v1/threads/t1/messages?{query}"), 200)
    return [m["seq"] for m in page["items"]], page["next_cursor"]


@pytest.fixture
def settings(servers: Servers) -> Settings:
    """Write-behind paused: the log and every key stay exactly as the API wrote them."""
    return make_settings(servers, **PAUSED)


def unchanged(r: aioredis.Redis) -> AbstractAsyncContextManager[helpers.Dump]:
    return helpers.unchanged(r, settle=False)


def log_of(settings: Settings, entity_id: str) -> str:
    return keys.log(keys.shard_of(entity_id, settings.redis.shards))


# ---- threads


async def test_put_thread_creates_then_updates(client: Client) -> None:
    resp = await client.put("/v1/threads/t1", json={"title": "Hello", "owner_id": "u1",
                                                    "metadata": {"a": [1, 2]}})
    created = await body(resp, 201)
    assert resp.headers["ETag"] == '"1"' and resp.headers["X-Tier"] == "redis"
    assert created == {"version": 1, "cseq": 1, "created_at": created["created_at"],
                       "thread_id": "t1",
                       "title": "Hello", "owner_id": "u1", "metadata": {"a": [1, 2]},
                       "updated_at": created["updated_at"], "deleted": False, "last_seq": 0}
    assert STAMP.match(created["created_at"]) and STAMP.match(created["updated_at"])
    resp = await client.put("/v1/threads/t1", json={"title": "Renamed"})
    updated = await body(resp, 200)
    assert resp.headers["ETag"] == '"2"'
    assert updated == {**created, "version": 2, "cseq": 2, "title": "Renamed", "owner_id": "",
                       "metadata": {}, "updated_at": updated["updated_at"]}
    assert updated["updated_at"] >= created["updated_at"]
    resp = await client.get("/v1/threads/t1")
    assert await body(resp, 200) == updated
    assert resp.headers["ETag"] == '"2"' and resp.headers["X-Tier"] == "redis"


async def test_thread_writes_are_logged(client: Client, redis: aioredis.Redis,
                                        settings: Settings) -> None:
    v1 = await new_thread(client, title="a")
    v2 = await body(await client.put("/v1/threads/t1", json={"title": "b"}), 200)
    v3 = await body(await client.delete("/v1/threads/t1"), 200)
    entries = await log_entries(redis, log_of(settings, "t1"))
    assert [(e["k"], e["id"], e["v"], e["e"]) for e in entries] == [
        ("t", "t1", "1", "thread.created"), ("t", "t1", "2", "thread.updated"),
        ("t", "t1", "3", "thread.deleted")]
    docs = [orjson.loads(e["d"]) for e in entries]
    assert docs == [{k: v for k, v in doc.items() if k != "last_seq"} for doc in (v1, v2, v3)]


async def test_put_thread_if_match(client: Client, redis: aioredis.Redis) -> None:
    await new_thread(client)
    async with unchanged(redis):
        resp = await client.put("/v1/threads/t1", json={}, headers={"If-Match": '"7"'})
        assert await error(resp, 412, "precondition_failed") == {"version": "1"}
    resp = await client.put("/v1/threads/t1", json={}, headers={"If-Match": '"1"'})
    assert (await body(resp, 200))["version"] == 2
    resp = await client.put("/v1/threads/t1", json={}, headers={"If-Match": "*"})
    assert (await body(resp, 200))["version"] == 3
    async with unchanged(redis):
        resp = await client.delete("/v1/threads/t1", headers={"If-Match": '"2"'})
        assert await error(resp, 412, "precondition_failed") == {"version": "3"}
    resp = await client.delete("/v1/threads/t1", headers={"If-Match": '"3"'})
    assert (await body(resp, 200))["version"] == 4


async def test_get_thread_has_last_seq(client: Client) -> None:
    await new_thread(client)
    for _ in range(3):
        await append(client)
    thread = await body(await client.get("/v1/threads/t1"), 200)
    assert thread["last_seq"] == 3 and thread["version"] == 1


async def test_unknown_thread(client: Client, redis: aioredis.Redis) -> None:
    async with unchanged(redis):
        await error(await client.get("/v1/threads/nope"), 404, "not_found")
        await error(await client.delete("/v1/threads/nope"), 404, "not_found")
        await error(await client.get("/v1/threads/nope/messages"), 404, "not_found")
        await error(await client.get("/v1/threads/nope/messages/m1"), 404, "not_found")
        resp = await client.patch("/v1/threads/nope/messages/m1", json={"content": "x"})
        await error(resp, 404, "not_found")
        await error(await client.delete("/v1/threads/nope/messages/m1"), 404, "not_found")
        resp = await client.put("/v1/threads/nope", json={}, headers={"If-Match": '"1"'})
        await error(resp, 412, "precondition_failed")


async def test_deleted_thread_is_gone(client: Client, redis: aioredis.Redis) -> None:
    await new_thread(client, title="x")
    await append(client, message_id="m1")
    resp = await client.delete("/v1/threads/t1")
    doc = await body(resp, 200)
    assert doc["deleted"] is True and doc["version"] == 2 and doc["last_seq"] == 1
    assert resp.headers["ETag"] == '"2"'
    async with unchanged(redis):
        await error(await client.get("/v1/threads/t1"), 404, "not_found")
        await error(await client.put("/v1/threads/t1", json={"title": "y"}), 409, "conflict")
        await error(await client.delete("/v1/threads/t1"), 404, "not_found")
        resp = await client.post("/v1/threads/t1/messages", json={"role": "u", "content": "c"})
        await error(resp, 404, "not_found")
        await error(await client.get("/v1/threads/t1/messages"), 404, "not_found")
        await error(await client.get("/v1/threads/t1/messages/m1"), 404, "not_found")
        resp = await client.patch("/v1/threads/t1/messages/m1", json={"content": "x"})
        await error(resp, 404, "not_found")
        await error(await client.delete("/v1/threads/t1/messages/m1"), 404, "not_found")


# ---- messages


async def test_append_message(client: Client, redis: aioredis.Redis,
                              settings: Settings) -> None:
    await new_thread(client)
    resp = await client.post("/v1/threads/t1/messages",
                             json={"role": "user", "content": "hello", "metadata": {"k": 1}})
    first = await body(resp, 201)
    assert resp.headers["ETag"] == '"1"' and resp.headers["X-Tier"] == "redis"
    assert ULID.match(first["message_id"])
    assert first == {"seq": 1, "cseq": 2, "version": 1, "message_id": first["message_id"],
                     "thread_id": "t1", "role": "user", "content": "hello",
                     "metadata": {"k": 1}, "created_at": first["created_at"],
                     "updated_at": first["created_at"], "deleted": False}
    assert STAMP.match(first["created_at"])
    second = await append(client, message_id="client-id.1:x", role="assistant", content="yo")
    assert (second["seq"], second["message_id"], second["metadata"]) == (2, "client-id.1:x", {})
    entries = [e for e in await log_entries(redis, log_of(settings, "t1")) if e["k"] == "m"]
    assert [(e["id"], e["tid"], e["v"], e["e"], orjson.loads(e["d"])) for e in entries] == [
        (first["message_id"], "t1", "1", "message.created", first),
        ("client-id.1:x", "t1", "1", "message.created", second)]


async def test_append_to_unknown_thread(client: Client, redis: aioredis.Redis) -> None:
    async with unchanged(redis):
        resp = await client.post("/v1/threads/nope/messages", json={"role": "u", "content": "c"})
        await error(resp, 404, "not_found")


async def test_idempotent_append(client: Client, redis: aioredis.Redis) -> None:
    await new_thread(client)
    original = await append(client, message_id="m1", metadata={"a": 1, "b": 2})
    await append(client, message_id="m2")
    async with unchanged(redis):
        again = await append(client, status=200, message_id="m1", metadata={"b": 2, "a": 1})
        assert again == original
        for other in ({"content": "other"}, {"role": "system"}, {"metadata": {"a": 1}}):
            msg = {"message_id": "m1", "role": "user", "content": "hi",
                   "metadata": {"a": 1, "b": 2}, **other}
            resp = await client.post("/v1/threads/t1/messages", json=msg)
            await error(resp, 409, "conflict")
    assert (await body(await client.get("/v1/threads/t1"), 200))["last_seq"] == 2


async def test_message_ids_are_per_thread(client: Client, redis: aioredis.Redis) -> None:
    await new_thread(client, "t1")
    await new_thread(client, "t2")
    one = await append(client, "t1", message_id="m1", content="one")
    two = await append(client, "t2", message_id="m1", content="two")
    assert (one["seq"], two["seq"]) == (1, 1)
    assert await body(await client.get("/v1/threads/t2/messages/m1"), 200) == two
    await append(client, "t1", message_id="m9")
    async with unchanged(redis):
        await error(await client.get("/v1/threads/t2/messages/m9"), 404, "not_found")


async def test_pages_by_seq_with_cursors(client: Client) -> None:
    await new_thread(client)
    for i in range(5):
        await append(client, message_id=f"m{i + 1}")
    page = await body(await client.get("/v1/threads/t1/messages"), 200)
    assert (page["thread_id"], page["last_seq"], page["next_cursor"]) == ("t1", 5, None)
    assert [m["message_id"] for m in page["items"]] == ["m1", "m2", "m3", "m4", "m5"]
    assert page["items"][2] == await body(await client.get("/v1/threads/t1/messages/m3"), 200)
    expected = {
        "limit=2": ([4, 5], {"before": 4}),
        "before=4&limit=2": ([2, 3], {"before": 2}),
        "before=2&limit=2": ([1], None),
        "before=1": ([], None),
        "before=99&limit=3": ([3, 4, 5], {"before": 3}),
        "after=0&limit=2": ([1, 2], {"after": 2}),
        "after=2&limit=2": ([3, 4], {"after": 4}),
        "after=4&limit=2": ([5], None),
        "after=5": ([], None),
        "after=99": ([], None),
        "limit=1000": ([1, 2, 3, 4, 5], None),
        "limit=1": ([5], {"before": 5}),
    }
    for query, want in expected.items():
        assert await seqs_of(client, query) == want, query


async def test_page_of_empty_thread(client: Client) -> None:
    await new_thread(client)
    page = await body(await client.get("/v1/threads/t1/messages"), 200)
    assert page == {"thread_id": "t1", "last_seq": 0, "next_cursor": None, "items": []}


async def test_walk_all_pages_both_ways(client: Client) -> None:
    await new_thread(client)
    for _ in range(23):
        await append(client)
    forward: list[int] = []
    cursor = "after=0"
    while cursor:
        seqs, nxt = await seqs_of(client, f"{cursor}&limit=5")
        forward += seqs
        cursor = f"after={nxt['after']}" if nxt else ""
    backward: list[int] = []
    cursor = "limit=5"
    while cursor:
        seqs, nxt = await seqs_of(client, cursor)
        backward = seqs + backward
        cursor = f"before={nxt['before']}&limit=5" if nxt else ""
    assert forward == backward == list(range(1, 24))


async def test_get_message(client: Client, redis: aioredis.Redis) -> None:
    await new_thread(client)
    sent = await append(client, message_id="m1", metadata={"deleted": True})
    resp = await client.get("/v1/threads/t1/messages/m1")
    assert await body(resp, 200) == sent
    assert resp.headers["ETag"] == '"1"' and resp.headers["X-Tier"] == "redis"
    async with unchanged(redis):
        await error(await client.get("/v1/threads/t1/messages/m2"), 404, "not_found")


async def test_patch_message(client: Client, redis: aioredis.Redis,
                             settings: Settings) -> None:
    await new_thread(client)
    sent = await append(client, message_id="m1", role="user", content="a", metadata={"x": 1})
    resp = await client.patch("/v1/threads/t1/messages/m1", json={"content": "b"})
    v2 = await body(resp, 200)
    assert resp.headers["ETag"] == '"2"' and resp.headers["X-Tier"] == "redis"
    assert v2 == {**sent, "version": 2, "cseq": sent["cseq"] + 1, "content": "b",
                  "updated_at": v2["updated_at"]}
    assert STAMP.match(v2["updated_at"]) and v2["updated_at"] >= sent["created_at"]
    async with unchanged(redis):
        resp = await client.patch("/v1/threads/t1/messages/m1", json={"content": "c"},
                                  headers={"If-Match": '"1"'})
        assert await error(resp, 412, "precondition_failed") == {"version": "2"}
    resp = await client.patch("/v1/threads/t1/messages/m1", headers={"If-Match": '"2"'},
                              json={"role": "assistant", "metadata": {"y": [2]}})
    v3 = await body(resp, 200)
    assert resp.headers["ETag"] == '"3"'
    assert v3 == {**v2, "version": 3, "cseq": v2["cseq"] + 1, "role": "assistant",
                  "metadata": {"y": [2]}, "updated_at": v3["updated_at"]}
    assert await body(await client.get("/v1/threads/t1/messages/m1"), 200) == v3
    entries = [e for e in await log_entries(redis, log_of(settings, "t1")) if e["k"] == "m"]
    assert [(e["v"], e["e"], orjson.loads(e["d"])) for e in entries] == [
        ("1", "message.created", sent), ("2", "message.updated", v2),
        ("3", "message.updated", v3)]
    async with unchanged(redis):
        resp = await client.patch("/v1/threads/t1/messages/m2", json={"content": "x"})
        await error(resp, 404, "not_found")


async def test_delete_message_leaves_a_tombstone(client: Client, redis: aioredis.Redis,
                                                 settings: Settings) -> None:
    await new_thread(client)
    for i in range(3):
        await append(client, message_id=f"m{i + 1}", metadata={"i": i})
    async with unchanged(redis):
        resp = await client.delete("/v1/threads/t1/messages/m2", headers={"If-Match": '"5"'})
        assert await error(resp, 412, "precondition_failed") == {"version": "1"}
    resp = await client.delete("/v1/threads/t1/messages/m2", headers={"If-Match": '"1"'})
    tomb = await body(resp, 200)
    assert resp.headers["ETag"] == '"2"'
    assert (tomb["seq"], tomb["version"], tomb["deleted"]) == (2, 2, True)
    assert (tomb["content"], tomb["metadata"]) == ("", {})
    page = await body(await client.get("/v1/threads/t1/messages"), 200)
    assert [(m["seq"], m["deleted"]) for m in page["items"]] == [(1, False), (2, True), (3, False)]
    assert page["items"][1] == tomb
    async with unchanged(redis):
        await error(await client.get("/v1/threads/t1/messages/m2"), 404, "not_found")
        await error(await client.delete("/v1/threads/t1/messages/m2"), 404, "not_found")
        resp = await client.patch("/v1/threads/t1/messages/m2", json={"content": "x"})
        await error(resp, 404, "not_found")
    assert (await append(client))["seq"] == 4  # a seq is never reused
    last = (await log_entries(redis, log_of(settings, "t1")))[-2]
    assert (last["id"], last["v"], last["e"]) == ("m2", "2", "message.deleted")


# ---- state


async def test_state_put_get_delete(client: Client, redis: aioredis.Redis,
                                    settings: Settings) -> None:
    resp = await client.put("/v1/state/k1", json={"value": {"a": [1, "x", None]}})
    v1 = await body(resp, 201)
    assert resp.headers["ETag"] == '"1"' and resp.headers["X-Tier"] == "redis"
    assert v1 == {"version": 1, "key": "k1", "value": {"a": [1, "x", None]},
                  "expires_at": None, "updated_at": v1["updated_at"], "deleted": False}
    resp = await client.get("/v1/state/k1")
    assert await body(resp, 200) == v1 and resp.headers["ETag"] == '"1"'
    resp = await client.put("/v1/state/k1", json={"value": None})
    v2 = await body(resp, 200)
    assert (v2["version"], v2["value"], resp.headers["ETag"]) == (2, None, '"2"')
    resp = await client.delete("/v1/state/k1")
    v3 = await body(resp, 200)
    assert (v3["version"], v3["deleted"], v3["value"], resp.headers["ETag"]) == (
        3, True, None, '"3"')
    async with unchanged(redis):
        await error(await client.get("/v1/state/k1"), 404, "not_found")
        await error(await client.delete("/v1/state/k1"), 404, "not_found")
        await error(await client.get("/v1/state/nope"), 404, "not_found")
        await error(await client.delete("/v1/state/nope"), 404, "not_found")
    again = await body(await client.put("/v1/state/k1", json={"value": 7}), 201)
    assert again["version"] == 4  # versions keep counting across a delete
    entries = await log_entries(redis, log_of(settings, "k1"))
    assert [(e["k"], e["id"], e["v"], e["e"]) for e in entries] == [
        ("s", "k1", "1", "state.updated"), ("s", "k1", "2", "state.updated"),
        ("s", "k1", "3", "state.deleted"), ("s", "k1", "4", "state.updated")]
    assert orjson.loads(entries[2]["d"]) == v3


async def test_state_if_match(client: Client, redis: aioredis.Redis) -> None:
    async with unchanged(redis):
        resp = await client.put("/v1/state/k1", json={"value": 1}, headers={"If-Match": '"1"'})
        assert await error(resp, 412, "precondition_failed") == {"version": None}
        resp = await client.delete("/v1/state/k1", headers={"If-Match": '"1"'})
        assert await error(resp, 412, "precondition_failed") == {"version": None}
    await body(await client.put("/v1/state/k1", json={"value": 1}), 201)
    async with unchanged(redis):
        resp = await client.put("/v1/state/k1", json={"value": 2}, headers={"If-Match": '"9"'})
        assert await error(resp, 412, "precondition_failed") == {"version": "1"}
        resp = await client.delete("/v1/state/k1", headers={"If-Match": "garbage"})
        assert await error(resp, 412, "precondition_failed") == {"version": "1"}
    resp = await client.put("/v1/state/k1", json={"value": 2}, headers={"If-Match": '"1"'})
    assert (await body(resp, 200))["version"] == 2 and resp.headers["ETag"] == '"2"'
    resp = await client.delete("/v1/state/k1", headers={"If-Match": '"2"'})
    assert (await body(resp, 200))["version"] == 3
    async with unchanged(redis):
        resp = await client.put("/v1/state/k1", json={"value": 3}, headers={"If-Match": '"3"'})
        assert await error(resp, 412, "precondition_failed") == {"version": None}


async def test_state_ttl_expires(client: Client, redis: aioredis.Redis,
                                 settings: Settings) -> None:
    resp = await client.put("/v1/state/long", json={"value": "v", "ttl": 60})
    assert STAMP.match((await body(resp, 201))["expires_at"])
    assert (await body(await client.get("/v1/state/long"), 200))["value"] == "v"
    await body(await client.put("/v1/state/short", json={"value": "v", "ttl": 0.3}), 201)

    async def gone() -> bool:
        return (await client.get("/v1/state/short")).status == 404

    await wait_for(gone, timeout_s=10)
    shard = keys.shard_of("short", settings.redis.shards)
    assert await redis.pttl(keys.state(shard, "short")) == -1  # unflushed: never a Redis TTL
    async with unchanged(redis):
        await error(await client.get("/v1/state/short"), 404, "not_found")
        await error(await client.delete("/v1/state/short"), 404, "not_found")
        resp = await client.put("/v1/state/short", json={"value": 1}, headers={"If-Match": '"1"'})
        assert await error(resp, 412, "precondition_failed") == {"version": None}
    resp = await client.put("/v1/state/short", json={"value": "new"})
    assert (await body(resp, 201))["version"] == 2
    assert (await body(await client.get("/v1/state/short"), 200))["expires_at"] is None


# ---- errors everywhere


async def test_unknown_routes_are_json_404(client: Client, redis: aioredis.Redis) -> None:
    async with unchanged(redis):
        for path in ("/nope", "/v1", "/v1/threads/t1/messages/m1/x",
                     "/v1/state", "/v2/threads/t1"):
            await error(await client.get(path), 404, "not_found")
        await error(await client.post("/v1/nope", json={}), 404, "not_found")


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("POST", "/v1/threads/t1", {"PUT", "GET", "DELETE"}),
    ("PATCH", "/v1/threads/t1", {"PUT", "GET", "DELETE"}),
    ("PUT", "/v1/threads/t1/messages", {"POST", "GET"}),
    ("DELETE", "/v1/threads/t1/messages", {"POST", "GET"}),
    ("POST", "/v1/threads/t1/messages/m1", {"GET", "PATCH", "DELETE"}),
    ("PUT", "/v1/threads/t1/messages/m1", {"GET", "PATCH", "DELETE"}),
    ("POST", "/v1/state/k1", {"PUT", "GET", "DELETE"}),
    ("PATCH", "/v1/state/k1", {"PUT", "GET", "DELETE"}),
    ("POST", "/healthz", {"GET"}),
])
async def test_wrong_method_is_json_405(client: Client, redis: aioredis.Redis, method: str,
                                        path: str, allow: set[str]) -> None:
    async with unchanged(redis):
        resp = await client.request(method, path, json={})
        await error(resp, 405, "method_not_allowed")
        assert set(resp.headers["Allow"].split(",")) == allow


# ---- bad input: every case is rejected and leaves Redis unchanged


@pytest.fixture
async def seeded(client: Client) -> AsyncIterator[Client]:
    """Data that rejected requests must not touch: a thread with messages, and a state key."""
    await new_thread(client, title="t")
    for i in range(3):
        await append(client, message_id=f"m{i + 1}", metadata={"i": i})
    await body(await client.put("/v1/state/k1", json={"value": {"n": 1}, "ttl": 3600}), 201)
    yield client


ID_ROUTES = [  # (method, path template, field the id lands in, body)
    ("PUT", "/v1/threads/{}", "thread_id", {"title": "x"}),
    ("GET", "/v1/threads/{}", "thread_id", None),
    ("DELETE", "/v1/threads/{}", "thread_id", None),
    ("POST", "/v1/threads/{}/messages", "thread_id", {"role": "u", "content": "c"}),
    ("GET", "/v1/threads/{}/messages", "thread_id", None),
    ("GET", "/v1/threads/{}/messages/m1", "thread_id", None),
    ("PATCH", "/v1/threads/{}/messages/m1", "thread_id", {"content": "c"}),
    ("DELETE", "/v1/threads/{}/messages/m1", "thread_id", None),
    ("GET", "/v1/threads/t1/messages/{}", "message_id", None),
    ("PATCH", "/v1/threads/t1/messages/{}", "message_id", {"content": "c"}),
    ("DELETE", "/v1/threads/t1/messages/{}", "message_id", None),
    ("PUT", "/v1/state/{}", "key", {"value": 1}),
    ("GET", "/v1/state/{}", "key", None),
    ("DELETE", "/v1/state/{}", "key", None),
]
BAD_IDS = ["a b", "x*", "x?", "[a]", "{1}", "a{1}", "a" * 129, "é", "Ü1", "a\nb", "t1\n",
           "\nt1", "a\x00b", "a%2Fb", "a\\b", "a\"b", "a'b", "a,b", "k1 "]


@pytest.mark.parametrize(("method", "template", "field", "payload"), ID_ROUTES)
async def test_bad_ids_are_rejected(seeded: Client, redis: aioredis.Redis, method: str,
                                    template: str, field: str, payload: Any) -> None:
    """aiohttp's router does not match a segment with `{` or `}` (404); every other bad id
    reaches the handler and is a 422 naming the field."""
    async with unchanged(redis):
        for bad in BAD_IDS:
            resp = await seeded.request(method, URL.build(path=template.format(bad)),
                                        json=payload)
            if "{" in bad or "}" in bad:
                await error(resp, 404, "not_found")
            else:
                assert await error(resp, 422, "invalid_field") == {"field": field}, bad


async def test_bad_message_id_in_body(seeded: Client, redis: aioredis.Redis) -> None:
    async with unchanged(redis):
        for bad in [*BAD_IDS, "", 5, ["m1"], {"id": "m1"}]:
            resp = await seeded.post("/v1/threads/t1/messages",
                                     json={"message_id": bad, "role": "u", "content": "c"})
            assert await error(resp, 422, "invalid_field") == {"field": "message_id"}, bad


async def test_null_message_id_means_generate(client: Client) -> None:
    await new_thread(client)
    assert ULID.match((await append(client, message_id=None))["message_id"])


async def test_longest_id_is_accepted(client: Client) -> None:
    tid, mid = "t" * 128, "m" * 128
    await new_thread(client, tid)
    assert (await append(client, tid, message_id=mid))["message_id"] == mid
    resp = await client.get(f"/v1/threads/{tid}/messages/{mid}")
    assert (await body(resp, 200))["thread_id"] == tid


LIMITS = {"content": 65_536, "metadata": 16_384}
MSG = "/v1/threads/t1/messages"
ONE = "/v1/threads/t1/messages/m1"
BAD_BODIES: list[tuple[str, str, Any, int, str, Any]] = [
    # (method, path, body: dict/list = JSON, bytes = raw JSON text, status, code, detail)
    ("POST", MSG, {"role": "u", "content": "c", "seq": 1}, 422, "invalid_field",
     {"field": "seq"}),
    ("POST", MSG, {"role": "u", "content": "c", "version": 2}, 422, "invalid_field",
     {"field": "version"}),
    ("POST", MSG, {"content": "c"}, 422, "invalid_field", {"field": "role"}),
    ("POST", MSG, {"role": "u"}, 422, "invalid_field", {"field": "content"}),
    ("POST", MSG, {}, 422, "invalid_field", None),
    ("POST", MSG, {"role": 5, "content": "c"}, 422, "invalid_field", {"field": "role"}),
    ("POST", MSG, {"role": "", "content": "c"}, 422, "invalid_field", {"field": "role"}),
    ("POST", MSG, {"role": "r" * 65, "content": "c"}, 422, "invalid_field", {"field": "role"}),
    ("POST", MSG, {"role": "u", "content": None}, 422, "invalid_field", {"field": "content"}),
    ("POST", MSG, {"role": "u", "content": ["c"]}, 422, "invalid_field", {"field": "content"}),
    ("POST", MSG, {"role": "u", "content": "c" * (LIMITS["content"] + 1)}, 422,
     "invalid_field", {"field": "content"}),
    ("POST", MSG, {"role": "u", "content": "é" * (LIMITS["content"] + 1)}, 422,
     "invalid_field", {"field": "content"}),
    ("POST", MSG, {"role": "u", "content": "a\x00b"}, 422, "invalid_field",
     {"field": "content"}),
    ("POST", MSG, {"role": "u", "content": "c", "metadata": []}, 422, "invalid_field",
     {"field": "metadata"}),
    ("POST", MSG, {"role": "u", "content": "c", "metadata": "x"}, 422, "invalid_field",
     {"field": "metadata"}),
    ("POST", MSG, {"role": "u", "content": "c", "metadata": None}, 422, "invalid_field",
     {"field": "metadata"}),
    ("POST", MSG, {"role": "u", "content": "c", "metadata": {"a": "\x00"}}, 422,
     "invalid_field", {"field": "metadata"}),
    ("POST", MSG, {"role": "u", "content": "c", "metadata": {"a": "x" * LIMITS["metadata"]}},
     422, "invalid_field", {"field": "metadata"}),
    ("POST", MSG, b'{"role":"u","content":"c","metadata":{"n":18446744073709551616}}', 422,
     "invalid_field", {"field": "metadata"}),
    ("POST", MSG, b'{"role":"u","content":"c","metadata":{"n":[-9223372036854775809]}}', 422,
     "invalid_field", {"field": "metadata"}),
    ("POST", MSG, [{"role": "u", "content": "c"}], 422, "invalid_field", {"field": "body"}),
    ("POST", MSG, b'"text"', 422, "invalid_field", {"field": "body"}),
    ("POST", MSG, b"null", 422, "invalid_field", {"field": "body"}),
    ("PUT", "/v1/threads/t1", {"title": 5}, 422, "invalid_field", {"field": "title"}),
    ("PUT", "/v1/threads/t1", {"title": "t" * 1025}, 422, "invalid_field", {"field": "title"}),
    ("PUT", "/v1/threads/t1", {"owner_id": "o" * 129}, 422, "invalid_field",
     {"field": "owner_id"}),
    ("PUT", "/v1/threads/t1", {"owner_id": None}, 422, "invalid_field", {"field": "owner_id"}),
    ("PUT", "/v1/threads/t1", {"metadata": [1]}, 422, "invalid_field", {"field": "metadata"}),
    ("PUT", "/v1/threads/t1", {"last_seq": 9}, 422, "invalid_field", {"field": "last_seq"}),
    ("PUT", "/v1/threads/t1", b'{"metadata":{"n":99999999999999999999}}', 422,
     "invalid_field", {"field": "metadata"}),
    ("PUT", "/v1/threads/t1", [], 422, "invalid_field", {"field": "body"}),
    ("PATCH", ONE, {}, 422, "invalid_field", {"field": "body"}),
    ("PATCH", ONE, {"seq": 3}, 422, "invalid_field", {"field": "seq"}),
    ("PATCH", ONE, {"deleted": False}, 422, "invalid_field", {"field": "deleted"}),
    ("PATCH", ONE, {"content": 5}, 422, "invalid_field", {"field": "content"}),
    ("PATCH", ONE, {"role": ""}, 422, "invalid_field", {"field": "role"}),
    ("PATCH", ONE, {"metadata": 1}, 422, "invalid_field", {"field": "metadata"}),
    ("PATCH", ONE, b'{"metadata":{"n":18446744073709551616}}', 422, "invalid_field",
     {"field": "metadata"}),
    ("PATCH", ONE, {"content": "c" * (LIMITS["content"] + 1)}, 422, "invalid_field",
     {"field": "content"}),
    ("PUT", "/v1/state/k1", {}, 422, "invalid_field", {"field": "value"}),
    ("PUT", "/v1/state/k1", {"value": 1, "version": 3}, 422, "invalid_field",
     {"field": "version"}),
    ("PUT", "/v1/state/k1", {"value": 1, "ttl": 0}, 422, "invalid_field", {"field": "ttl"}),
    ("PUT", "/v1/state/k1", {"value": 1, "ttl": -1}, 422, "invalid_field", {"field": "ttl"}),
    ("PUT", "/v1/state/k1", {"value": 1, "ttl": "5"}, 422, "invalid_field", {"field": "ttl"}),
    ("PUT", "/v1/state/k1", {"value": 1, "ttl": True}, 422, "invalid_field", {"field": "ttl"}),
    ("PUT", "/v1/state/k1", {"value": 1, "ttl": 10 * 365 * 86400 + 1}, 422, "invalid_field",
     {"field": "ttl"}),
    ("PUT", "/v1/state/k1", b'{"value":{"n":18446744073709551616}}', 422, "invalid_field",
     {"field": "value"}),
    ("PUT", "/v1/state/k1", b'{"value":1,"ttl":18446744073709551616}', 422, "invalid_field",
     {"field": "ttl"}),
    ("PUT", "/v1/state/k1", b"[]", 422, "invalid_field", {"field": "body"}),
    # malformed JSON: 400
    ("POST", MSG, b'{"role":"u","content":', 400, "malformed", None),
    ("POST", MSG, b"", 400, "malformed", None),
    ("POST", MSG, b"not json", 400, "malformed", None),
    ("POST", MSG, b'{"role":"u","content":"c"} {}', 400, "malformed", None),
    ("POST", MSG, b'{"role":"u","content":"\xff"}', 400, "malformed", None),
    ("POST", MSG, b'{"role":"u","content":"\\ud800"}', 400, "malformed", None),
    ("POST", MSG, b'{"role":"u","content":"c","metadata":{"n":NaN}}', 400, "malformed", None),
    ("POST", MSG, b'{"role":"u","content":"c","metadata":{"n":1e400}}', 400, "malformed",
     None),
    ("POST", MSG, b'{"role":"u","content":"c","metadata":{"n":1' + b"0" * 400 + b"}}", 400,
     "malformed", None),  # beyond a double, orjson refuses it (valid JSON, but never storable)
    ("POST", MSG, b'{"role":"u","content":"c","metadata":' + b"[" * 2000 + b"]" * 2000 + b"}",
     400, "malformed", None),
    ("PUT", "/v1/threads/t1", b"{'title': 'x'}", 400, "malformed", None),
    ("PATCH", ONE, b'{"content":"x",}', 400, "malformed", None),
    ("PUT", "/v1/state/k1", b'{"value":}', 400, "malformed", None),
]


@pytest.mark.parametrize(("method", "path", "payload", "status", "code", "detail"),
                         BAD_BODIES)
async def test_bad_bodies_are_rejected(seeded: Client, redis: aioredis.Redis, method: str,
                                       path: str, payload: Any, status: int, code: str,
                                       detail: Any) -> None:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    async with unchanged(redis):
        resp = await seeded.request(method, path, data=raw,
                                    headers={"Content-Type": "application/json"})
        got = await error(resp, status, code)
        if detail is not None or status == 400:
            assert got == detail


WRITES = [("PUT", "/v1/threads/t1", {"title": "x"}),
          ("POST", MSG, {"role": "u", "content": "c"}),
          ("PATCH", ONE, {"content": "x"}),
          ("PUT", "/v1/state/k1", {"value": 1})]


@pytest.mark.parametrize(("method", "path", "payload"), WRITES)
async def test_non_json_media_type_is_415(seeded: Client, redis: aioredis.Redis, method: str,
                                          path: str, payload: Any) -> None:
    async with unchanged(redis):
        for content_type in [None, "text/plain", "application/x-www-form-urlencoded",
                             "application/jsonx", "application/merge-patch+json",
                             "multipart/form-data; boundary=x", "text/json"]:
            headers = {"Content-Type": content_type} if content_type else {}
            resp = await seeded.request(method, path, data=orjson.dumps(payload),
                                        headers=headers)
            detail = await error(resp, 415, "unsupported_media_type")
            assert detail == {"content_type": (content_type or "application/octet-stream")
                              .split(";")[0]}


async def test_json_with_charset_is_accepted(client: Client) -> None:
    resp = await client.put("/v1/threads/t1", data=b'{"title":"\xc3\xa9"}',
                            headers={"Content-Type": "application/json; charset=utf-8"})
    assert (await body(resp, 201))["title"] == "é"


@pytest.mark.parametrize(("method", "path", "payload"), WRITES)
async def test_body_over_limit_is_413(seeded: Client, redis: aioredis.Redis,
                                      settings: Settings, method: str, path: str,
                                      payload: Any) -> None:
    limit = settings.api.max_body_bytes
    raw = b'{"x":"' + b"a" * (limit - 7) + b'"}'
    assert len(raw) == limit + 1
    async with unchanged(redis):
        resp = await seeded.request(method, path, data=io.BytesIO(raw),
                                    headers={"Content-Type": "application/json"})
        assert resp.request_info.headers["Content-Length"] == str(limit + 1)
        assert await error(resp, 413, "too_large") == {"limit": limit}


async def test_body_at_limit_is_accepted(client: Client, settings: Settings) -> None:
    limit = settings.api.max_body_bytes
    raw = b'{"value":"' + b"a" * (limit - 12) + b'"}'
    assert len(raw) == limit
    resp = await client.put("/v1/state/k1", data=io.BytesIO(raw),
                            headers={"Content-Type": "application/json"})
    assert len((await body(resp, 201))["value"]) == limit - 12


async def chunks(total: int, size: int = 65_536) -> AsyncIterator[bytes]:
    """A JSON-looking body sent chunked (no Content-Length)."""
    yield b'{"value":"'
    sent = 0
    while sent < total:
        yield b"a" * size
        sent += size
    yield b'"}'


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _ in WRITES])
async def test_chunked_body_over_limit_is_413(seeded: Client, redis: aioredis.Redis,
                                              settings: Settings, method: str,
                                              path: str) -> None:
    limit = settings.api.max_body_bytes
    async with unchanged(redis):
        resp = await seeded.request(method, path, data=chunks(2 * limit),
                                    headers={"Content-Type": "application/json"})
        assert "Content-Length" not in resp.request_info.headers
        assert await error(resp, 413, "too_large") == {"limit": limit}


async def test_chunked_body_under_limit_is_accepted(client: Client) -> None:
    resp = await client.put("/v1/state/k1", data=chunks(200_000, 10_000),
                            headers={"Content-Type": "application/json"})
    assert len((await body(resp, 201))["value"]) == 200_000


async def test_endless_chunked_body_gets_413(client: Client, redis: aioredis.Redis,
                                             settings: Settings) -> None:
    """The server answers once the limit is passed, without waiting for the body to end
    (the generator is bounded only so a broken server cannot hang the test forever)."""
    async with unchanged(redis):
        resp = await client.put("/v1/state/k1", data=chunks(1 << 36),
                                headers={"Content-Type": "application/json"})
        assert await error(resp, 413, "too_large") == {"limit": settings.api.max_body_bytes}


BAD_PARAMS = {  # query -> the parameter named in detail
    "limit=0": "limit", "limit=abc": "limit", "limit=-1": "limit", "limit=1.5": "limit",
    "limit=": "limit", "limit=1001": "limit", "limit=%C2%B2": "limit", "limit=%D9%A1": "limit",
    "limit=" + "9" * 5000: "limit", "limit=+5": "limit", "limit=%205": "limit",
    "after=-1": "after", "after=x": "after", "after=" + "9" * 30: "after",
    "after=9007199254740993": "after", "before=0": "before", "before=": "before",
    "before=1e3": "before", "before=" + "9" * 21: "before",
}


async def test_bad_query_params_are_400(seeded: Client, redis: aioredis.Redis) -> None:
    async with unchanged(redis):
        for query, param in BAD_PARAMS.items():
            resp = await seeded.get(URL(f"/v1/threads/t1/messages?{query}", encoded=True))
            assert await error(resp, 400, "malformed") == {"param": param}, query
        for query in ("before=2&after=1", "after=1&before=2", "foo=1", "limit=5&cursor=x"):
            resp = await seeded.get(f"/v1/threads/t1/messages?{query}")
            assert await error(resp, 400, "malformed") is None, query


@pytest.mark.parametrize(("method", "path", "payload"), [
    *WRITES, ("DELETE", "/v1/threads/t1", None), ("DELETE", ONE, None),
    ("DELETE", "/v1/state/k1", None)])
async def test_bad_durability_header_is_400(seeded: Client, redis: aioredis.Redis,
                                            method: str, path: str, payload: Any) -> None:
    async with unchanged(redis):
        resp = await seeded.request(method, path, json=payload,
                                    headers={"X-Durability": "eventually"})
        assert await error(resp, 400, "malformed") == {"header": "X-Durability"}


async def test_numbers_round_trip_exactly(client: Client) -> None:
    """Integers up to 64 bits are stored as sent (no float rounding anywhere)."""
    await new_thread(client)
    meta = {"u64": 2**64 - 1, "i64": -(2**63), "big53": 2**53 + 1, "f": 0.1}
    raw = orjson.dumps({"role": "u", "content": "c", "metadata": meta})
    resp = await client.post("/v1/threads/t1/messages", data=raw,
                             headers={"Content-Type": "application/json"})
    assert (await body(resp, 201))["metadata"] == meta
    got = await client.get(f"/v1/threads/t1/messages/{(await resp.json())['message_id']}")
    assert b'"u64":18446744073709551615' in await got.read()
    resp = await client.put("/v1/state/k1", data=b'{"value":[9007199254740993,1.5]}',
                            headers={"Content-Type": "application/json"})
    assert (await body(resp, 201))["value"] == [2**53 + 1, 1.5]


async def test_content_at_limit_is_accepted(client: Client) -> None:
    await new_thread(client)
    text = "é" * LIMITS["content"]
    assert (await append(client, content=text))["content"] == text
    meta = {"a": "x" * (LIMITS["metadata"] - 8)}
    assert len(orjson.dumps(meta)) == LIMITS["metadata"]
    assert (await append(client, metadata=meta))["metadata"] == meta


async def test_text_round_trips(client: Client) -> None:
    """Quotes, backslashes, emoji, RTL and JSON-looking text come back byte for byte."""
    await new_thread(client)
    tricky = 'a"b\\c\n\t\u202eRTL 😀 \\N {"deleted":true} \'; DROP TABLE x; --'
    sent = await append(client, message_id="m1", role=tricky, content=tricky,
                        metadata={tricky: tricky})
    got = await body(await client.get("/v1/threads/t1/messages/m1"), 200)
    assert got == sent and got["content"] == tricky and got["metadata"] == {tricky: tricky}


# ---- startup safety


async def test_groups_exist_on_every_shard(client: Client, redis: aioredis.Redis,
                                           settings: Settings) -> None:
    streams = {k async for k in redis.scan_iter(_type="stream")}
    assert streams == {keys.log(s).encode() for s in range(settings.redis.shards)}
    for shard in range(settings.redis.shards):
        groups = await redis.xinfo_groups(keys.log(shard))
        assert sorted((g["name"], g["last-delivered-id"], g["pending"]) for g in groups) == [
            (b"ch", b"0-0", 0), (b"pg", b"0-0", 0)]


async def test_groups_start_at_the_first_entry(client_for: AppClient, redis: aioredis.Redis,
                                               settings: Settings) -> None:
    """A stream that already holds entries but no group: the groups are made at 0, so the
    flushers are handed the old entry (each parks holding it: pending 1)."""
    stream = keys.log(0)
    await redis.xadd(stream, {"k": "s", "id": "x", "v": "1", "e": "state.updated", "ts": "1",
                              "d": '{"version":1,"key":"x","value":1,"expires_at":null,'
                                   '"updated_at":"2026-01-01T00:00:00.000Z","deleted":false}'})
    await client_for(settings)

    async def handed_over() -> bool:
        return sorted((g["name"], g["pending"]) for g in await redis.xinfo_groups(stream)) == [
            (b"ch", 1), (b"pg", 1)]

    await wait_for(handed_over)


async def test_second_startup_keeps_existing_groups(client_for: AppClient,
                                                    redis: aioredis.Redis,
                                                    settings: Settings) -> None:
    """Groups another sidecar made (BUSYGROUP) are kept as they are, never reset to 0."""
    stream = keys.log(1)
    entry = await redis.xadd(stream, {"k": "s", "id": "y", "v": "1", "e": "state.updated",
                                      "ts": "1", "d": "{}"})
    for group in GROUPS:
        await redis.xgroup_create(stream, group, id="$")
    await client_for(settings)
    await client_for(settings)
    for shard in range(settings.redis.shards):
        names = sorted(g["name"] for g in await redis.xinfo_groups(keys.log(shard)))
        assert names == [b"ch", b"pg"]
    groups = await redis.xinfo_groups(stream)
    assert [(g["last-delivered-id"], g["pending"]) for g in groups] == [(entry, 0), (entry, 0)]


async def test_refuses_a_redis_that_may_evict_unflushed_keys(tmp_path: Path,
                                                             settings: Settings) -> None:
    server = RedisServer(tmp_path / "redis", extra_args=["--maxmemory-policy", "allkeys-lru"])
    server.start()
    evicting = aioredis.Redis.from_url(server.url)
    try:
        unsafe = settings.replace("redis", url=server.url)
        for policy in ("allkeys-lru", "allkeys-lfu", "allkeys-random"):
            await evicting.config_set("maxmemory-policy", policy)
            app = TestServer(create_app(unsafe))
            with pytest.raises(RuntimeError, match=f"maxmemory-policy is '{policy}'") as failed:
                await app.start_server()
            await app.close()
            assert "volatile-lru" in str(failed.value)  # the message names safe settings
        assert await evicting.dbsize() == 0  # refused before creating anything
        await evicting.config_set("maxmemory-policy", "noeviction")
        app = TestServer(create_app(unsafe))
        await app.start_server()
        await app.close()
    finally:
        await evicting.aclose()
        server.stop()


async def test_durability_header_values_are_accepted(client: Client) -> None:
    for value in ("acknowledged", "persisted", "PERSISTED"):
        headers = {"X-Durability": value}
        resp = await client.put(f"/v1/threads/{value}", json={}, headers=headers)
        await body(resp, 201)
        resp = await client.post(f"/v1/threads/{value}/messages", headers=headers,
                                 json={"message_id": "m1", "role": "u", "content": "c"})
        await body(resp, 201)
        resp = await client.patch(f"/v1/threads/{value}/messages/m1", json={"content": "d"},
                                  headers=headers)
        assert (await body(resp, 200))["version"] == 2
        resp = await client.put(f"/v1/state/{value}", json={"value": 1}, headers=headers)
        await body(resp, 201)


# ---- after a flush (write-behind running): reads come back through PostgreSQL


async def expire_thread(redis: aioredis.Redis, settings: Settings, tid: str) -> None:
    """Once flushed, a thread's keys carry the cache TTL; drop them as its expiry would."""
    await wait_for(lambda: helpers.settled(redis))
    s = keys.shard_of(tid, settings.redis.shards)
    assert await redis.pttl(keys.thread(s, tid)) > 0  # flushed and released
    await redis.delete(keys.thread(s, tid), keys.messages(s, tid), keys.window(s, tid))


async def test_reads_after_the_cache_expired(client_for: AppClient, servers: Servers,
                                             redis: aioredis.Redis) -> None:
    live = make_settings(servers)
    client = await client_for(live)
    thread = await new_thread(client, "t1", title="x")
    sent = [await append(client, "t1", message_id=f"m{i}", content=f"c{i}") for i in (1, 2)]
    await expire_thread(redis, live, "t1")
    resp = await client.get("/v1/threads/t1/messages/m2")
    assert await body(resp, 200) == sent[1]
    assert resp.headers["X-Tier"] == "postgres"
    page = await body(await client.get("/v1/threads/t1/messages"), 200)
    assert page["items"] == sent
    assert await body(await client.get("/v1/threads/t1"), 200) == {**thread, "last_seq": 2}
    await error(await client.get("/v1/threads/t1/messages/m3"), 404, "not_found")


async def test_message_ids_are_per_thread_after_a_flush(client_for: AppClient,
                                                        servers: Servers,
                                                        redis: aioredis.Redis) -> None:
    live = make_settings(servers)
    client = await client_for(live)
    for tid in ("t1", "t2"):
        await new_thread(client, tid)
        await append(client, tid, message_id="m1", content=f"in {tid}")
    await expire_thread(redis, live, "t2")
    got = await body(await client.get("/v1/threads/t2/messages/m1"), 200)
    assert (got["thread_id"], got["content"]) == ("t2", "in t2")


CONDITIONAL = [(m, p, b) for m, p, b in WRITES if m != "POST"] + [
    ("DELETE", ONE, None), ("DELETE", "/v1/threads/t1", None), ("DELETE", "/v1/state/k1", None)]


@pytest.mark.parametrize("value", ['""', "", '"*"', "W/", '"1", "2"', "1 2"])
async def test_if_match_that_names_no_version_never_matches(seeded: Client,
                                                            redis: aioredis.Redis,
                                                            value: str) -> None:
    """Only an absent If-Match or a bare * means "any version" (appends take no If-Match)."""
    headers = {"If-Match": value}
    async with unchanged(redis):
        for method, path, payload in CONDITIONAL:
            resp = await seeded.request(method, path, json=payload, headers=headers)
            await error(resp, 412, "precondition_failed")
    resp = await seeded.put("/v1/state/k1", json={"value": 2}, headers={"If-Match": " * "})
    assert (await body(resp, 200))["version"] == 2
