"""The nemesis checker checked: small histories it must flag (and the allowances it must keep
quiet about), and the sampler seeing a trim past pending entries, a TTL on unflushed data and
a stale refill in a real Redis and PostgreSQL."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from proxy import keys
from tests.conftest import Servers
from tests.faults.checker import check_history
from tests.faults.conftest import SHARDS
from tests.faults.endstate import (
    Row,
    check_clickhouse,
    check_erased,
    check_feed,
    check_pg,
    erased_messages,
    erased_threads,
    erased_tokens,
)
from tests.faults.health import Probe, check_health
from tests.faults.history import FAIL, INFO, OK
from tests.faults.nemesis import Fault, FaultEvent
from tests.faults.sampler import Sampler
from tests.faults.violations import LABELS, Violations
from tests.faults.workload import Op

WALL = 1_800_000_000.0  # wall clock of the synthetic histories: started + WALL


def op(kind: str, entity: str, at: tuple[float, float], status: int | None = 200,
       doc: dict[str, Any] | None = None, tid: str = "", **fields: Any) -> Op:
    outcome = INFO if status is None else OK if status < 300 else FAIL
    return Op(0, kind, 0, tid, entity, "X", "/", started=at[0], ended=at[1],
              wall_started=WALL + at[0], wall_ended=WALL + at[1], outcome=outcome,
              status=status, doc=doc, tier="redis" if status and status < 300 else None,
              **fields)


def state(version: int, value: str = "x", expires_at: float | None = None) -> dict[str, Any]:
    expires = (datetime.fromtimestamp(expires_at, UTC).isoformat() if expires_at is not None
               else None)
    return {"key": "k", "version": version, "value": value, "expires_at": expires,
            "deleted": False}


def labels(ops: list[Op], events: list[FaultEvent] | None = None) -> list[str]:
    out = Violations()
    check_history(ops, events or [], out)
    return [label for label, _ in out.items]


def test_a_read_older_than_an_acknowledged_write_is_flagged() -> None:
    assert labels([op("put_state", "k", (0, 1), 201, state(1), body={"value": "x"}),
                   op("put_state", "k", (1, 2), 200, state(2, "y"), body={"value": "y"}),
                   op("get_state", "k", (3, 4), 200, state(1))]) == ["5"]


def test_a_read_concurrent_with_a_write_may_miss_it() -> None:
    assert labels([op("put_state", "k", (0, 1), 201, state(1), body={"value": "x"}),
                   op("put_state", "k", (2, 4), 200, state(2, "y"), body={"value": "y"}),
                   op("get_state", "k", (3, 5), 200, state(1))]) == []


def test_an_older_read_after_a_newer_one_is_a_regression() -> None:
    assert labels([op("put_state", "k", (0, 9), None, body={"value": "x"}),
                   op("get_state", "k", (1, 2), 200, state(3)),
                   op("get_state", "k", (3, 4), 200, state(2))]) == ["8"]


@pytest.mark.parametrize(("ttl", "flagged"), [(None, ["5"]), (1, [])])
def test_a_404_is_right_only_if_the_entry_may_be_gone(ttl: float | None,
                                                       flagged: list[str]) -> None:
    body = {"value": "x"} if ttl is None else {"value": "x", "ttl": ttl}
    expires = None if ttl is None else WALL + 1 + ttl
    assert labels([op("put_state", "k", (0, 1), 201, state(1, expires_at=expires), body=body),
                   op("get_state", "k", (5, 6), 404)]) == flagged


def test_an_uncertain_delete_or_a_postgres_outage_explains_a_404() -> None:
    put = op("put_state", "k", (0, 1), 201, state(1), body={"value": "x"})
    assert labels([put, op("delete_state", "k", (2, 3), None), op("get_state", "k", (4, 5),
                                                                   404)]) == []
    outage = FaultEvent(Fault(0, "pg-stop", -1, 1), began=3, active=3, healed=4, ended=4.5)
    assert labels([put, op("get_state", "k", (4, 5), 404)], [outage]) == []


def test_an_expired_entry_served_is_flagged() -> None:
    assert labels([op("get_state", "k", (5, 6), 200, state(1, expires_at=WALL + 4))]) == ["5"]


def test_one_seq_for_two_messages_and_two_creations_of_one_are_flagged() -> None:
    def append(mid: str, seq: int, at: float) -> Op:
        return op("append", mid, (at, at + 1), 201, {"message_id": mid, "seq": seq,
                                                     "version": 1}, tid="t")
    assert labels([append("a", 3, 0), append("b", 3, 2)]) == ["2"]
    assert sorted(labels([append("a", 3, 0), append("a", 4, 2)])) == ["2", "2"]


def test_one_cseq_for_two_changes_is_flagged() -> None:
    def change(kind: str, mid: str, version: int, cseq: int, at: float) -> Op:
        return op(kind, mid, (at, at + 1), 200, {"message_id": mid, "seq": 1 if mid == "a"
                                                  else 2, "version": version, "cseq": cseq,
                                                  "content": "x", "deleted": False}, tid="t")
    thread = op("put_thread", "t", (0, 1), 201, {"version": 1, "cseq": 1}, tid="t")
    assert labels([thread, change("append", "a", 1, 2, 1), change("edit", "a", 2, 3, 2),
                   change("append", "b", 1, 4, 3)]) == []
    assert labels([thread, change("append", "a", 1, 1, 1)]) == ["2"]  # the thread's cseq
    assert labels([change("append", "a", 1, 2, 1), change("append", "b", 1, 2, 2)]) == ["2"]
    assert labels([change("append", "a", 1, 2, 1), change("edit", "a", 2, 2, 2)]) == ["2"]


def test_a_deleted_threads_message_served_and_a_lost_if_match_are_flagged() -> None:
    gone = op("delete_thread", "t", (0, 1), 200, {"version": 2, "deleted": True}, tid="t")
    read = op("get_message", "a", (2, 3), 200, {"message_id": "a", "seq": 1, "version": 1,
                                               "content": "x", "deleted": False}, tid="t")
    assert labels([gone, read]) == ["5"]
    again = op("delete_thread", "t", (2, 3), 200, {"version": 3, "deleted": True}, tid="t")
    assert labels([gone, again]) == ["5"]
    again.method, again.params = "DELETE", {"erase": "true"}  # erasing its content: allowed
    assert labels([gone, again]) == []
    assert labels([op("put_state", "k", (0, 1), 200, state(5), if_match=3,
                      body={"value": "x"})]) == ["api"]


def test_a_page_with_a_gap_is_flagged() -> None:
    items = [{"seq": s, "message_id": f"m{s}", "version": 1, "content": "x", "deleted": False}
             for s in (1, 3)]
    page = op("page", "t", (0, 1), 200, {"last_seq": 3, "items": items}, tid="t",
              params={"after": "0", "limit": "3"})
    assert labels([page]) == ["2"]


def test_a_read_marker_that_goes_back_is_flagged() -> None:
    """Not once a later answer began after the higher one ended; a concurrent one may lag."""
    def marker(kind: str, seq: int, at: tuple[float, float], asked: int = 0) -> Op:
        return op(kind, "u1", at, 200, {"thread_id": "t", "user_id": "u1", "seq": seq}, tid="t",
                  body={"seq": asked} if kind == "put_marker" else None)
    moved = marker("put_marker", 5, (0, 1), asked=5)
    assert labels([moved, marker("get_marker", 5, (2, 3))]) == []
    assert labels([moved, marker("get_marker", 2, (0.5, 3))]) == []
    assert labels([moved, marker("get_marker", 2, (2, 3))]) == ["8"]
    assert labels([moved, marker("put_marker", 3, (2, 3), asked=3)]) == ["8"]
    assert labels([marker("put_marker", 3, (0, 1), asked=4)]) == ["api"]


def test_health_is_honest_per_process() -> None:
    """Once a sidecar said postgres down, it must not say up before PostgreSQL is back; a
    restarted one (another port) starts again from up. /readyz must not be 200 without Redis."""
    pg_stop = FaultEvent(Fault(0, "pg-stop", -1, 2), began=0, active=1, healed=4, ended=5)
    redis = FaultEvent(Fault(0, "redis-restart", -1, 2), began=6, active=6, healed=8, ended=9)

    def probe(url: str, at: float, postgres: str = "", ready: int = 503) -> Probe:
        what = "status" if postgres else "ready"
        return Probe(0, url, what, at, at + 0.1, 200 if postgres else ready, postgres or None)

    found = Violations()
    check_health([probe("a", 1.5, "down"), probe("b", 2.0, "up"), probe("a", 2.5, "up"),
                  probe("a", 6.5, ready=200), probe("a", 7.0)], [pg_stop, redis], [], found)
    assert [text[:30] for _, text in found.items] == [
        "s0 /v1/status said postgres up", "s0 /readyz said ready at 6.50 "]


def test_an_outage_no_sidecar_reported_is_flagged_once_past_the_detection_time() -> None:
    pg_stop = FaultEvent(Fault(0, "pg-stop", -1, 5), began=0, active=1, healed=6, ended=7)

    def found(*at: float) -> list[str]:
        out = Violations()
        probes = [Probe(0, "a", "status", t, t + 0.1, 200, "up") for t in at]
        check_health(probes, [pg_stop], [], out)
        return [text[:35] for _, text in out.items]

    assert found(1.5, 3.5) == []  # within DETECT_S of the stop: not judged
    assert found(1.5, 4.5) == ["no sidecar's /v1/status said postgr"]


# ---- the sampler, on real servers


@pytest.fixture
async def sampler(servers: Servers, redis: aioredis.Redis,
                  pg: asyncpg.Connection) -> Any:
    found = Violations()
    sampler = Sampler(servers.redis_url, servers.postgres_url, SHARDS, found.add)
    yield sampler, found
    await sampler.stop()


async def test_the_sampler_sees_a_trim_past_entries_not_yet_acknowledged(
        sampler: Any, redis: aioredis.Redis, pg: asyncpg.Connection) -> None:
    s, found = sampler
    stream = keys.log(0)
    for group in ("pg", "ch"):
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    ids = [await redis.xadd(stream, {"k": "s"}) for _ in range(3)]
    await redis.xreadgroup("pg", "c", {stream: ">"}, count=2)  # two pending in pg
    await s.sample(pg)  # remembers ch's oldest undelivered entry
    assert found.items == []
    await redis.xtrim(stream, minid=ids[2], approximate=False)
    await s.sample(pg)
    assert [label for label, _ in found.items] == ["3", "3", "3"], found.items


async def test_the_sampler_sees_a_ttl_on_unflushed_data_and_a_stale_refill(
        sampler: Any, redis: aioredis.Redis, pg: asyncpg.Connection) -> None:
    s, found = sampler
    key = keys.state(keys.shard_of("k", SHARDS), "k")
    await pg.execute("INSERT INTO state_entries (key, value, version) VALUES ('k', '1', 5)")
    await redis.hset(key, mapping={"v": "5", "del": "0", "pend": "0"})
    await s.sample(pg)
    assert found.items == []
    await redis.hset(key, "v", "6")
    await redis.pexpire(key, 60_000)  # v6 is not in PostgreSQL
    await s.sample(pg)
    await redis.hset(key, "v", "4")  # older than PostgreSQL's v5
    await s.sample(pg)
    assert [label for label, _ in found.items] == ["4", "8"], found.items


# ---- the end state's changes feed and erasure checks (pure)


def feed_labels(items: list[tuple[str, int, int]], ops: list[Op], last: int = 9) -> list[str]:
    """items: (message id or '' for the thread, version, cseq)."""
    feed = {"last_cseq": last, "items": [
        {"kind": "message", "doc": {"message_id": m, "version": v, "cseq": c}} if m else
        {"kind": "thread", "doc": {"thread_id": "t", "version": v, "cseq": c}}
        for m, v, c in items]}
    out = Violations()
    check_feed("t", feed, ops, out)
    return [label for label, _ in out.items]


def acked(kind: str, mid: str, version: int, cseq: int, at: float = 0) -> Op:
    doc = {"version": version, "cseq": cseq, **({"message_id": mid} if mid else {})}
    return op(kind, mid or "t", (at, at + 1), 200, doc, tid="t")


def test_a_feed_in_order_with_every_acknowledged_change_passes() -> None:
    ops = [acked("put_thread", "", 1, 1), acked("append", "a", 1, 2), acked("edit", "a", 2, 4),
           acked("append", "b", 1, 3), acked("delete_message", "b", 2, 5),
           acked("append", "c", 1, 0),  # served from ClickHouse: no cseq, not checked
           op("edit", "a", (5, 6), None, tid="t")]  # uncertain: landed, as v3 cseq 6
    assert feed_labels([("", 1, 1), ("b", 2, 5), ("a", 3, 6)], ops, last=6) == []


def test_a_feed_out_of_order_repeated_or_past_last_cseq_is_flagged() -> None:
    assert feed_labels([("a", 1, 3), ("b", 1, 2)], []) == ["2"]
    assert feed_labels([("a", 1, 2), ("b", 1, 2)], []) == ["2"]
    assert feed_labels([("a", 1, 2), ("a", 2, 3)], []) == ["2"]
    assert feed_labels([("a", 1, 12)], []) == ["2"]


def test_a_feed_missing_or_behind_an_acknowledged_change_is_flagged() -> None:
    ops = [acked("append", "a", 1, 2), acked("edit", "a", 2, 4)]
    assert feed_labels([], ops) == ["5", "5"]
    assert feed_labels([("a", 1, 2)], ops) == ["5"]  # v2 missing
    assert feed_labels([("a", 2, 3)], ops) == ["8"]  # below the cseq v2 was answered
    assert feed_labels([("a", 2, 5)], ops) == ["2"]  # one version, two cseqs
    assert feed_labels([("", 1, 5)], [acked("put_thread", "", 1, 1)]) == []  # threads: >=


def test_erased_content_found_in_any_tier_is_flagged() -> None:
    ops = [acked("append", "a", 1, 2), acked("edit", "a", 2, 3),
           acked("conflict", "a", 0, 0), acked("append", "b", 1, 4)]
    for o, content in zip(ops, ["x-c0n1z", "x-c0n2z", "x-c0n1z-other", "x-c0n3z"], strict=True):
        o.body = {"content": content}
    ops[2].outcome, ops[2].status = FAIL, 409
    erase = acked("delete_message", "a", 3, 5)
    erase.method, erase.params = "DELETE", {"erase": "true"}
    delete = acked("delete_message", "b", 2, 6)
    delete.method = "DELETE"
    tokens = erased_tokens([*ops, erase, delete])
    assert sorted(tokens) == ["x-c0n1z", "x-c0n2z"]  # not b's: deleted, not erased

    def found(tiers: dict[str, list[str]]) -> list[str]:
        out = Violations()
        check_erased(tokens, tiers, out)
        return [text.split(" after")[0] for _, text in out.items]

    assert found({"postgres": ["(b,x-c0n3z)", "(a,)"], "redis": [], "clickhouse": [""]}) == []
    assert found({"redis": ["b'{\"content\":\"x-c0n2z\"}'"], "clickhouse": ["x-c0n1z {}"]}) == [
        "clickhouse still holds 'x-c0n1z'", "redis still holds 'x-c0n2z'"]


def test_an_erased_message_may_miss_its_earlier_versions_in_clickhouse() -> None:
    """The erase deletes the entries ClickHouse has not taken (README: Erasure); its own
    version must still be there, and a message not erased must have every version."""
    pg = {("m", "a"): Row(3, True, thread_id="t", seq=1),
          ("m", "b"): Row(2, False, "x", thread_id="t", seq=2)}
    rows: list[list[Any]] = [["m:a:3", 1, 1, 1, "t"], ["m:b:2", 1, 2, 2, "t"]]
    erase = acked("delete_message", "a", 3, 5)
    erase.method, erase.params = "DELETE", {"erase": "true"}

    def found(ops: list[Op], rows: list[list[Any]]) -> list[str]:
        out = Violations()
        check_clickhouse(rows, pg, out, erased_messages(ops))
        return [text.split(" (")[0] for _, text in out.items]

    assert found([], rows) == ["event m:a:1", "event m:a:2", "event m:b:1"]
    assert found([erase], rows) == ["event m:b:1"]
    assert found([erase], rows[1:]) == ["event m:a:3", "event m:b:1"]


def _thread_erased() -> tuple[list[Op], Op]:
    """a (v1, edited to v2) and b in thread t, c in thread u; then t erased."""
    ops = [acked("append", "a", 1, 2), acked("edit", "a", 2, 3), acked("append", "b", 1, 4),
           op("append", "c", (0, 1), 200, {"version": 1, "message_id": "c"}, tid="u")]
    for o, content, seq in zip(ops, ["x-c0n1z", "x-c0n2z", "x-c0n3z", "x-c0n4z"], [1, 1, 2, 1],
                               strict=True):
        o.body, o.doc["seq"] = {"content": content}, seq
        o.status = 201 if o.kind == "append" else 200
    erase = acked("delete_thread", "", 2, 5, at=2)
    erase.method, erase.params = "DELETE", {"erase": "true"}
    return ops, erase


def test_a_thread_erase_covers_every_text_written_in_it() -> None:
    ops, erase = _thread_erased()
    assert erased_tokens(ops) == {}
    assert sorted(erased_tokens([*ops, erase])) == ["x-c0n1z", "x-c0n2z", "x-c0n3z"]
    assert erased_threads([*ops, erase]) == {"t"}


def test_an_erased_threads_messages_may_be_blank_and_miss_their_events() -> None:
    """A thread erase blanks its messages in PostgreSQL at the version they had, and may delete
    every log entry of them ClickHouse had not taken."""
    ops, erase = _thread_erased()
    pg = {("m", "a"): Row(2, False, "", thread_id="t", seq=1),
          ("m", "b"): Row(1, False, "", thread_id="t", seq=2),
          ("m", "c"): Row(1, False, "x-c0n4z", thread_id="u", seq=1),
          ("t", "t"): Row(2, True, thread_id="t", seq=2)}
    rows: list[list[Any]] = [["t:t:1", 1, 0, 0, "t"], ["t:t:2", 1, 0, 0, "t"],
                             ["m:c:1", 1, 1, 1, "u"]]

    def labels(history: list[Op]) -> list[str]:
        out = Violations()
        index = check_history(history, [], Violations())
        check_pg(index, pg, out, erased_threads(history))
        check_clickhouse(rows, pg, out, erased_messages(history), erased_threads(history))
        return sorted(text.split(" ")[0] + " " + text.split(" ")[1] for _, text in out.items)

    assert labels([*ops, erase]) == []
    assert labels(ops + [op("delete_thread", "t", (2, 3), 200, {"version": 2}, tid="t")]) == [
        "event m:a:1", "event m:a:2", "event m:b:1", "message a", "message b"]


ARCHITECTURE = Path(__file__).resolve().parents[3] / "shared" / "ARCHITECTURE.md"


@pytest.mark.skipif(not ARCHITECTURE.exists(), reason="../shared/ARCHITECTURE.md not beside the "
                    "checkout")
def test_the_labels_are_architectures_invariants() -> None:
    """One numbering: the checker's labels are ARCHITECTURE.md's invariants, each one of them
    (a renumbered or added invariant must be relabelled here too)."""
    text = ARCHITECTURE.read_text().split("## Invariants", 1)[1].split("\n## ", 1)[0]
    numbers = re.findall(r"^(\d+)\. ", text, re.MULTILINE)
    assert numbers and set(LABELS) - {"api"} == set(numbers)


def test_a_message_its_threads_erase_dropped_before_its_flush_may_miss_postgres() -> None:
    """Its append sat unflushed (a dead letter) when its thread was erased: the erase removes
    it from Redis (README: Erasure), so PostgreSQL never gets the row; not so without an
    erase."""
    ops, erase = _thread_erased()
    pg = {("m", "a"): Row(2, False, "", thread_id="t", seq=1),
          ("m", "c"): Row(1, False, "x-c0n4z", thread_id="u", seq=1),
          ("t", "t"): Row(2, True, thread_id="t", seq=2)}

    def labels(history: list[Op]) -> list[str]:
        out = Violations()
        check_pg(check_history(history, [], Violations()), pg, out, erased_threads(history))
        return [label for label, _ in out.items]

    assert labels([*ops, erase]) == []
    assert "1" in labels(ops)  # b: acknowledged, not in postgres


def test_write_through_lets_a_write_through_postgres_take_over_what_redis_held() -> None:
    """Write-through mode: a state write and an append Redis acknowledged, then a write through
    PostgreSQL given the same version and seq (RELIABILITY.md: the edit lost to the later
    write, the message moved to the thread's end). Allowed only in that order."""
    def history(redis_first: bool) -> list[Op]:
        early, late = (0.0, 1.0), (5.0, 6.0)
        put = op("put_state", "k", early if redis_first else late, 200, state(2, "r"),
                 body={"value": "r"})
        through = op("put_state", "k", late if redis_first else early, 200, state(2, "p"),
                     body={"value": "p"})
        app = op("append", "m1", early, 201, {"version": 1, "seq": 3, "message_id": "m1"},
                 tid="t")
        app_through = op("append", "m2", late, 201,
                         {"version": 1, "seq": 3, "message_id": "m2"}, tid="t")
        for o in (through, app_through):
            o.tier = "postgres"
        return [put, through, app, app_through]

    def labels(ops: list[Op], write_through: bool = True) -> list[str]:
        out = Violations()
        check_history(ops, [], out, write_through)
        return sorted(label for label, _ in out.items)

    assert labels(history(redis_first=True)) == []
    assert labels(history(redis_first=True), write_through=False) == ["2", "2"]
    assert labels(history(redis_first=False)) == ["2"]  # Redis after PostgreSQL: a race
