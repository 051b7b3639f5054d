"""Every Lua script's refusals leave Redis byte-identical (Lua never rolls back, so each script
checks everything before its first write). Each case runs one script on real Redis against a
prepared state and compares a full dump of Redis before and after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy import keys
from proxy.backends import GROUPS
from proxy.luascripts import scripts
from tests.helpers import unchanged

SCRIPTS = scripts()
S = 0  # every key here is on shard 0
TOKEN = "tok"  # a load fence token registered for every entity below


def thread_keys(tid: str) -> list[str]:
    return [keys.thread(S, tid), keys.messages(S, tid), keys.window(S, tid), keys.log(S),
            keys.fence(S, "t", tid), keys.recent(S, tid), keys.overlay(S, tid)]


def put_keys(tid: str, owner: str = "", believed: str = "") -> list[str]:
    """thread_put's: the thread's keys, the erase's dead letters and cold cache, the inbox
    index keys (the new owner's, the believed one's), then its changes set."""
    return [*thread_keys(tid), keys.dead_letters(S), keys.cold(S, tid), keys.inbox(S, owner),
            keys.inbox(S, believed), keys.changes(S, tid)]


def append_keys(tid: str, owner: str = "") -> list[str]:
    """message_append's: thread_put's first six, the believed owner's inbox index, then the
    changes set."""
    return [*thread_keys(tid)[:6], keys.inbox(S, owner), keys.changes(S, tid)]


def update_keys(tid: str) -> list[str]:
    """message_update's: the cold cache for the fence, the dead letters, the changes set."""
    return [*thread_keys(tid)[:4], keys.cold(S, tid), *thread_keys(tid)[5:],
            keys.dead_letters(S), keys.changes(S, tid)]


def fill_keys(tid: str) -> list[str]:
    """fill_thread's: the thread's keys without the log, then the changes set."""
    return [*thread_keys(tid)[:3], *thread_keys(tid)[4:], keys.changes(S, tid)]


def state_keys(key: str) -> list[str]:
    return [keys.state(S, key), keys.log(S), keys.fence(S, "k", key)]


def marker_keys(tid: str) -> list[str]:
    """read_marker.lua's: the thread's keys without the fence, then its read markers."""
    return [*thread_keys(tid)[:4], *thread_keys(tid)[5:], keys.markers(S, tid)]


def marker_args(tid: str, mode: str = "put", seq: int = 1) -> list[Any]:
    return [mode, "u1", seq, f'{{"thread_id":"{tid}","user_id":"u1","seq":{seq}}}',
            keys.events(S), 1, tid]


def append_args(tid: str, mid: str, fp: str, checked: str = "*",
                owner: str = "") -> list[Any]:
    body = f'{{"version":1,"message_id":"{mid}","thread_id":"{tid}","content":"x"}}'
    return [tid, mid, body, fp, keys.events(S), 1, checked, 0, 30_000, owner]


def thread_args(tid: str, op: str = "put", if_match: str = "", new: str = "",
                owner: str = "", believed: str = "") -> list[Any]:
    return ['{"title":"t"}', '"2026-01-01T00:00:00.000Z"', if_match, new, op, keys.events(S), 1,
            tid, owner, believed]


def state_args(key: str, op: str = "put", if_match: str = "", base: str = "") -> list[Any]:
    return [f'{{"key":"{key}","value":1}}', if_match, base, op, 5, "", 5, key, TOKEN]


def ephemeral_keys(tid: str) -> list[str]:
    return [keys.thread(S, tid), keys.ephemeral_rate(S, tid)]


def ephemeral_args() -> list[Any]:
    return [keys.events(S), '{"type":"ephemeral"}', 20.0, 100]


async def run(r: aioredis.Redis, name: str, keys_: list[str], args: list[Any]) -> Any:
    return await r.eval(SCRIPTS[name], len(keys_), *keys_, *args)


@pytest.fixture
async def prepared(redis: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    """A live thread t with message m1 (fingerprint fp1), a deleted thread gone, a thread
    old filled from PostgreSQL (its ids forgotten), a state entry k, user u1's read marker
    at 1 on t, and the log's groups."""
    for g in GROUPS:
        await redis.xgroup_create(keys.log(S), g, id="0", mkstream=True)
    for entity in ("t:t", "t:gone", "t:old", "t:nope", "k:k", "k:nope"):
        kind, eid = entity.split(":")
        await run(redis, "load_fence", [keys.fence(S, kind, eid)], [TOKEN, 600_000])
    assert (await run(redis, "thread_put", put_keys("t"), thread_args("t", new=TOKEN)))[0] \
        == b"CREATED"
    assert (await run(redis, "thread_put", put_keys("gone"),
                      thread_args("gone", new=TOKEN)))[0] == b"CREATED"
    assert (await run(redis, "thread_put", put_keys("gone"), thread_args("gone", "del")))[0] \
        == b"OK"
    assert await run(redis, "fill_thread", fill_keys("old"),
                     ['{"title":"o"}', 1, '"2026-01-01T00:00:00.000Z"', 5, 0, 600_000, TOKEN,
                      1000, "", 0]) == 1
    assert (await run(redis, "message_append", append_keys("t"),
                      append_args("t", "m1", "fp1")))[0] == b"CREATED"
    assert (await run(redis, "state_put", state_keys("k"), state_args("k", base="0,1,")))[0] \
        == b"CREATED"
    # Thread t's ephemeral events are due ~100 years from now: over its rate (issue 12.5).
    await redis.set(keys.ephemeral_rate(S, "t"), str(5_000_000_000_000))
    assert await run(redis, "fill_marker", [keys.thread(S, "t"), keys.markers(S, "t"),
                                            keys.fence(S, "t", "t")], ["u1", 1, TOKEN, 1000]) == 1
    yield redis


REFUSALS: list[tuple[str, str, Any]] = [
    # (case, script call as (name, keys, args), the refusal it answers)
    ("thread_put: not in Redis, not known new", "thread_put",
     (put_keys("nope"), thread_args("nope")), [b"MISS"]),
    ("thread_put: new under a stale token", "thread_put",
     (put_keys("nope"), thread_args("nope", new="stale")), [b"MISS"]),
    ("thread_put: deleted", "thread_put", (put_keys("gone"), thread_args("gone")),
     [b"GONE", b"2"]),
    ("thread_put: delete of a new thread", "thread_put",
     (put_keys("nope"), thread_args("nope", "del", new=TOKEN)), [b"NOTFOUND"]),
    ("thread_put: another owner than believed", "thread_put",
     (put_keys("t", "u1", "u1"), thread_args("t", owner="u1", believed="u1")),
     [b"OWNER", b""]),
    ("thread_put: If-Match", "thread_put", (put_keys("t"), thread_args("t", if_match="9")),
     [b"PRECONDITION", b"1"]),
    ("message_append: another owner than believed", "message_append",
     (append_keys("t", "u1"), append_args("t", "m2", "fp2", owner="u1")),
     [b"OWNER", b""]),
    ("message_append: no thread", "message_append",
     (append_keys("nope"), append_args("nope", "m2", "fp2")), [b"MISS"]),
    ("message_append: deleted thread", "message_append",
     (append_keys("gone"), append_args("gone", "m2", "fp2")), [b"GONE"]),
    ("message_append: same id, other body", "message_append",
     (append_keys("t"), append_args("t", "m1", "fpX")), [b"CONFLICT"]),
    ("message_append: a repeat", "message_append",
     (append_keys("t"), append_args("t", "m1", "fp1")), None),
    ("message_append: an id PostgreSQL may hold", "message_append",
     (append_keys("old"), append_args("old", "m2", "fp2", checked="")), [b"CHECK"]),
    ("message_update: unknown message", "message_update",
     (update_keys("t"),
      ["t", "m9", "1", "{}", "2", "message.updated", keys.events(S), 2, 1]), [b"MISS"]),
    ("message_update: stale version", "message_update",
     (update_keys("t"),
      ["t", "m1", "7", "{}", "8", "message.updated", keys.events(S), 2, 1]),
     [b"PRECONDITION", b"1"]),
    ("message_update: deleted thread", "message_update",
     (update_keys("gone"),
      ["gone", "m1", "1", "{}", "2", "message.updated", keys.events(S), 2, 1]), [b"GONE"]),
    ("state_put: not in Redis, no base", "state_put", (state_keys("nope"),
                                                       state_args("nope")), [b"MISS"]),
    ("state_put: a base under a stale token", "state_put",
     (state_keys("nope"), [*state_args("nope", base="3,0,")[:-1], "stale"]), [b"MISS"]),
    ("state_put: If-Match", "state_put", (state_keys("k"), state_args("k", if_match="5")),
     [b"PRECONDITION", b"1"]),
    ("state_put: delete of what does not exist", "state_put",
     (state_keys("nope"), state_args("nope", "del", base="0,1,")), [b"NOTFOUND"]),
    ("fill_thread: present", "fill_thread",
     (fill_keys("t"),
      ["{}", 1, '"x"', 0, 0, 1000, TOKEN, 1, "", 0]), 0),
    ("fill_thread: stale load", "fill_thread",
     (fill_keys("nope"),
      ["{}", 1, '"x"', 0, 0, 1000, "stale", 1, "", 0]), -1),
    ("fill_state: present", "fill_state", ([keys.state(S, "k"), keys.fence(S, "k", "k")],
                                           ["{}", 1, "", 1000, 5, TOKEN]), 0),
    ("fill_state: stale load", "fill_state",
     ([keys.state(S, "nope"), keys.fence(S, "k", "nope")], ["{}", 1, "", 1000, 5, "stale"]), -1),
    ("fill_meta: stale load", "fill_meta",
     ([*thread_keys("t")[:2], keys.fence(S, "t", "t")], ["m7", 1, "fp", "{}", "stale"]), -1),
    ("fill_messages: stale load", "fill_messages",
     ([*thread_keys("t")[:3], keys.cold(S, "t"), keys.fence(S, "t", "t"), keys.recent(S, "t")],
      [1000, 200, "stale", "m7", 1, 1, "fp", '{"seq":1}']), -1),
    ("read_marker: no thread", "read_marker", (marker_keys("nope"), marker_args("nope")),
     [b"MISS"]),
    ("read_marker: deleted thread", "read_marker", (marker_keys("gone"), marker_args("gone")),
     [b"GONE"]),
    ("read_marker: past the last seq", "read_marker", (marker_keys("t"), marker_args("t", seq=2)),
     [b"AHEAD", b"1"]),
    ("read_marker: a marker only PostgreSQL may hold", "read_marker",
     (marker_keys("old"), marker_args("old")), [b"NOMARK"]),
    ("read_marker: not forward", "read_marker", (marker_keys("t"), marker_args("t", seq=0)),
     [b"KEPT", b"1"]),
    ("read_marker: a read", "read_marker", (marker_keys("t"), marker_args("t", "get")),
     [b"OK", b"1", b"2", b"0", 0]),
    ("fill_marker: no thread", "fill_marker",
     ([keys.thread(S, "nope"), keys.markers(S, "nope"), keys.fence(S, "t", "nope")],
      ["u1", 3, TOKEN, 1000]), 0),
    ("fill_marker: stale load", "fill_marker",
     ([keys.thread(S, "t"), keys.markers(S, "t"), keys.fence(S, "t", "t")],
      ["u1", 3, "stale", 1000]), -1),
    ("trim: a group missing", "trim", ([keys.log(S)], [*GROUPS, "other"]), -1),
    ("dead_letter: acknowledged by someone else", "dead_letter",
     ([keys.log(S), keys.dead_letters(S)], [GROUPS[0], "1-1", "why"]), 0),
    ("replay: nothing to replay", "replay", ([keys.dead_letters(S), keys.log(S)], [100]), 0),
    ("remove_consumers: nobody idle", "remove_consumers", ([keys.log(S)],
                                                            [GROUPS[0], "me", 60_000]), 0),
    ("raise_counters: Redis is not behind", "raise_counters",
     ([*thread_keys("t")[:3], *thread_keys("t")[5:7]], ["raise", 1, 1, "m1", 1]), 0),
    ("raise_counters: an unflushed entity is left for its flush", "raise_counters",
     ([*thread_keys("t")[:3], *thread_keys("t")[5:]], ["drop", 9, 9, "m1", 1]), 2),
    ("raise_counters: written through, behind at equal counters", "raise_counters",
     ([*thread_keys("t")[:3], *thread_keys("t")[5:]], ["behind", 1, 1, "m1", 1]), 2),
    # issue 12.5: ephemeral events (the answer over the rate: the wait, in ms, is > 0)
    ("ephemeral_publish: no thread", "ephemeral_publish",
     (ephemeral_keys("nope"), ephemeral_args()), [b"MISS"]),
    ("ephemeral_publish: deleted thread", "ephemeral_publish",
     (ephemeral_keys("gone"), ephemeral_args()), [b"GONE"]),
    ("ephemeral_publish: over the rate", "ephemeral_publish",
     (ephemeral_keys("t"), ephemeral_args()), lambda got: got[0] == b"RATE" and got[1] > 0),
]


@pytest.mark.parametrize(("case", "name", "call", "answer"), REFUSALS,
                         ids=[c[0] for c in REFUSALS])
async def test_a_refusal_changes_nothing(prepared: aioredis.Redis, case: str, name: str,
                                         call: tuple[list[str], list[Any]], answer: Any) -> None:
    async with unchanged(prepared, settle=False):
        got = await run(prepared, name, *call)
    if callable(answer):  # an answer that depends on the time
        assert answer(got), (case, got)
    elif answer is not None:
        assert got == answer, case
    else:  # a repeat answers the original
        assert got[0] == b"DUP" and b'"message_id":"m1"' in got[1], case


def test_every_script_with_a_refusal_has_a_case() -> None:
    refusing = {"thread_put", "message_append", "message_update", "state_put", "fill_thread",
                "fill_state", "fill_meta", "fill_messages", "trim", "dead_letter", "replay",
                "remove_consumers", "raise_counters", "ephemeral_publish", "read_marker",
                "fill_marker"}
    assert {name for _, name, _, _ in REFUSALS} == refusing
    # The others never refuse: they read, or always write (groups, fences, the release).
    assert set(SCRIPTS) - refusing == {"read_page", "get_message", "count_from", "create_groups",
                                       "load_fence", "release", "inbox_scan", "inbox_check",
                                       "read_changes", "raise_markers", "erase_entries"}


def test_includes_are_expanded_and_lib_parts_are_not_scripts() -> None:
    """Redis gets self-contained texts: no include line is left, the shared erase is in every
    script that uses it, and lib/ parts are not registered as scripts of their own."""
    assert not any("--#include" in text for text in SCRIPTS.values())
    assert all("local function erase(" in SCRIPTS[n] for n in ("message_update", "thread_put",
                                                               "erase_entries"))
    assert "erase" not in SCRIPTS
