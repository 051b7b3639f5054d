"""The end state after healing: the write-behind drained, then PostgreSQL, reads through every
sidecar, every thread's changes feed, ClickHouse, and every tier searched for erased content,
checked against the whole history.

Allowances: an uncertain write may have landed or not, and adds at most one version; a
message no answer named (an anonymous append without an answer) may be in PostgreSQL once,
found by its unique content; every version an entity went through (1..its last) is one
ClickHouse event, whoever wrote it, and no other event exists (an erased message's earlier
versions may be missing: the erase deleted their log entries). A thread erase blanks its
messages in PostgreSQL without a new version, and any of their ClickHouse events may be missing.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from proxy import keys
from tests.faults.checker import Entity, Index, written_content
from tests.faults.history import INFO
from tests.faults.violations import Violations
from tests.faults.workload import WRITES, Caller, Op
from tests.helpers import key_value

CREATES = frozenset({"append", "append_anon", "retry", "conflict"})
ERASABLE = frozenset({"append", "append_anon", "retry", "edit"})  # a conflict stores nothing


@dataclass(frozen=True)
class Row:
    version: int
    deleted: bool
    content: Any = None  # message text or state value (None once deleted)
    thread_id: str = ""
    seq: int = 0  # messages: its seq; threads: last_seq
    expires_ms: float | None = None


async def read_pg(conn: asyncpg.Connection) -> dict[Entity, Row]:
    out: dict[Entity, Row] = {}
    for r in await conn.fetch("SELECT thread_id, version, last_seq, deleted FROM threads"):
        out[("t", r["thread_id"])] = Row(r["version"], r["deleted"], seq=r["last_seq"])
    for r in await conn.fetch("SELECT message_id, thread_id, seq, version, content, deleted"
                              " FROM messages"):
        out[("m", r["message_id"])] = Row(r["version"], r["deleted"],
                                          None if r["deleted"] else r["content"],
                                          r["thread_id"], r["seq"])
    for r in await conn.fetch("SELECT key, version, value::text AS value, expires_at, deleted"
                              " FROM state_entries"):
        expires = r["expires_at"].timestamp() * 1000 if r["expires_at"] else None
        value = orjson.loads(r["value"]) if r["value"] is not None else None
        out[("s", r["key"])] = Row(r["version"], r["deleted"], value, expires_ms=expires)
    return out


async def backlog(r: aioredis.Redis, shards: int) -> list[str]:
    """What is not flushed yet: per shard and group, pending or undelivered entries; dead
    letters."""
    problems = []
    for shard in range(shards):
        stream = keys.log(shard)
        if await r.exists(stream):
            for g in await r.xinfo_groups(stream):
                last = g["last-delivered-id"].decode()
                undelivered = await r.xrange(stream, min="(" + last, count=1)
                if g["pending"] or undelivered:
                    problems.append(f"shard {shard} group {g['name'].decode()}: "
                                    f"{g['pending']} pending, undelivered: {bool(undelivered)}")
        if dead := await r.xlen(keys.dead_letters(shard)):
            problems.append(f"shard {shard}: {dead} dead letters")
    return problems


# ---- PostgreSQL


def check_pg(index: Index, pg: dict[Entity, Row], out: Violations,
             erased: frozenset[str] = frozenset()) -> None:
    """1 and 2 on the rows of every entity the history touched (and of no other); the
    messages of `erased` threads (erase_threads) have no content to compare."""
    for entity in sorted(set(index.writes) | set(pg)):
        row, ops = pg.get(entity), index.writes.get(entity, [])
        top = max((v for v, _ in index.claims.get(entity, [])), default=0)
        if entity[0] == "m" and _thread_of(ops) in erased and (row is None or row.version < top):
            continue  # its thread's erase removed what Redis had not flushed of it
        if row is None or row.version < top:
            if top:
                out.add("1", f"{_name(entity)} acknowledged at v{top}, postgres has "
                        f"{'nothing' if row is None else f'v{row.version}'}")
            continue
        if entity[0] == "m" and not any(o.ok or o.uncertain for o in ops if o.kind in CREATES):
            continue  # a message no answer named: matched by content below
        _check_row(index, entity, row, ops, top, out, row.thread_id in erased)
    _check_unnamed(index, pg, out, erased)
    _check_threads(index, pg, out, erased)


def _thread_of(ops: list[Op]) -> str:
    return next((o.thread_id for o in ops if o.thread_id), "")


def _check_row(index: Index, entity: Entity, row: Row, ops: list[Op], top: int,
               out: Violations, blanked: bool) -> None:
    uncertain = [o for o in ops if o.uncertain]
    seen = max(top, index.seen[entity].before(float("inf")))
    if row.version > seen + len(uncertain):
        out.add("2", f"{_name(entity)} is at v{row.version} in postgres; answers went up to "
                f"v{seen} and {len(uncertain)} writes were uncertain")
    at = [op for v, op in index.claims.get(entity, []) if v == row.version]
    if at and at[0].kind.startswith("delete") != row.deleted:
        out.add("2", f"{_name(entity)} v{row.version} is {'' if row.deleted else 'not '}"
                f"deleted in postgres, acknowledged as {at[0].brief()}")
    candidates = at or uncertain
    if entity[0] != "t" and not blanked and candidates and all(written_content(o) != row.content
                                               for o in candidates):
        out.add("2", f"{_name(entity)} v{row.version} holds {row.content!r} in postgres, "
                f"written as {[written_content(o) for o in candidates[:3]]!r}")
    seqs = {int(o.doc["seq"]) for o in ops if o.ok and "seq" in o.doc
            and id(o) not in index.taken_over}  # a taken-over append moved
    if entity[0] == "m" and seqs and seqs != {row.seq}:
        out.add("2", f"{_name(entity)} has seq {row.seq} in postgres, answers said {seqs}")


def _check_unnamed(index: Index, pg: dict[Entity, Row], out: Violations,
                   erased: frozenset[str]) -> None:
    """Messages whose id no answer gave must each be one unanswered anonymous append (whose
    content an erased thread no longer shows)."""
    unanswered = defaultdict(list)
    for op in index.ops:
        if op.kind == "append_anon" and op.uncertain and op.body:
            unanswered[op.body["content"]].append(op)
    for entity, row in pg.items():
        ops = index.writes.get(entity, [])
        if entity[0] != "m" or any(o.ok or o.uncertain for o in ops if o.kind in CREATES):
            continue
        if ops:
            out.add("2", f"{_name(entity)} is in postgres, but every append of it was refused: "
                    f"{ops[0].brief()}")
        elif row.thread_id in erased:
            continue
        elif not unanswered.get(row.content):
            out.add("2", f"{_name(entity)} ({row.content!r}) is in postgres, written by no op")
        else:
            unanswered[row.content].pop()


def _check_threads(index: Index, pg: dict[Entity, Row], out: Violations,
                   erased: frozenset[str]) -> None:
    """2: each thread's seqs are 1..last_seq, once each (an erased thread's may have gaps:
    see check_pg)."""
    seqs: dict[str, list[int]] = defaultdict(list)
    for entity, row in pg.items():
        if entity[0] == "m":
            seqs[row.thread_id].append(row.seq)
    for entity, row in pg.items():
        if entity[0] == "t":
            found = sorted(seqs.get(entity[1], []))
            expected = range(1, row.seq + 1)
            if found != list(expected) and not (entity[1] in erased
                                                and len(set(found)) == len(found)
                                                and set(found) <= set(expected)):
                out.add("2", f"thread {entity[1]} has last_seq {row.seq} and message seqs "
                        f"{_ranges(found)} in postgres")


def _ranges(seqs: list[int]) -> str:
    """1..5, 7, 7, 9.. : compact, duplicates kept."""
    if len(seqs) <= 12:
        return str(seqs)
    missing = sorted(set(range(1, seqs[-1] + 1)) - set(seqs))
    dupes = sorted(s for s in set(seqs) if seqs.count(s) > 1)
    return f"1..{seqs[-1]} ({len(seqs)} rows, missing {missing[:8]}, twice {dupes[:8]})"


# ---- reads through every sidecar after healing


async def final_reads(caller: Caller, sidecars: list[int], pg: dict[Entity, Row],
                      seed: int) -> list[Op]:
    """Every thread (and all its pages), every state key and a sample of messages, through
    every sidecar given (those ready after healing; one that stops answering is left)."""
    ops = []
    mids = sorted(e[1] for e in pg if e[0] == "m")
    sample = random.Random(f"{seed}:final").sample(mids, min(60, len(mids)))
    for i in sidecars:
        mine: list[Op] = []
        for kind, name in sorted(pg):
            if kind == "t":
                mine.append(await caller.send(_read(i, name, name, f"/v1/threads/{name}",
                                                    "get_thread")))
                mine += await _pages(caller, i, name)
            elif kind == "s":
                mine.append(await caller.send(_read(i, "", name, f"/v1/state/{name}",
                                                    "get_state")))
            if _silent(mine):
                break
        for mid in sample if not _silent(mine) else []:
            tid = pg[("m", mid)].thread_id
            mine.append(await caller.send(_read(i, tid, mid,
                                                f"/v1/threads/{tid}/messages/{mid}",
                                                "get_message")))
        ops += mine
    return ops


def _silent(ops: list[Op]) -> bool:
    """The last three reads got no answer: the sidecar is gone (reported, not waited for)."""
    return len(ops) >= 3 and all(o.outcome == INFO for o in ops[-3:])


async def _pages(caller: Caller, i: int, tid: str) -> list[Op]:
    """A thread's messages, page after page (1000 each) from the first."""
    ops, after = [], 0
    while True:
        op = await caller.send(_read(i, tid, tid, f"/v1/threads/{tid}/messages", "page",
                                     {"after": str(after), "limit": "1000"}))
        ops.append(op)
        cursor = op.doc.get("next_cursor") if op.ok else None
        if not cursor:
            return ops
        after = int(cursor["after"])


def _read(i: int, tid: str, entity: str, path: str, kind: str,
          params: dict[str, str] | None = None) -> Op:
    return Op(-2, kind, i, tid, entity, "GET", path, params=params)


def check_final_reads(ops: list[Op], pg: dict[Entity, Row], out: Violations) -> None:
    """5: after healing, every sidecar serves exactly what PostgreSQL holds."""
    pages: dict[tuple[int, str], list[Op]] = defaultdict(list)
    for op in ops:
        if not op.ok and op.status != 404:
            out.add("9", f"a read after healing failed: {op.brief()}")
        elif op.kind == "page":
            pages[(op.sidecar, op.thread_id)].append(op)
        else:
            _check_final_read(op, pg, out)
    for (_, tid), chunk in sorted(pages.items()):
        _check_final_pages(tid, chunk, pg, out)


def _check_final_read(op: Op, pg: dict[Entity, Row], out: Violations) -> None:
    entity = ("s" if op.kind == "get_state" else "m" if op.kind == "get_message" else "t",
              op.entity)
    row = pg[entity]
    gone = row.deleted or (entity[0] == "m" and pg[("t", row.thread_id)].deleted)
    if entity[0] == "s" and row.expires_ms is not None and not gone:
        if row.expires_ms <= op.wall_started * 1000:
            gone = True
        elif row.expires_ms < op.wall_ended * 1000:
            return  # expired during the read: either answer is right
    if gone or not op.ok:
        if gone != (op.status == 404):
            out.add("5", f"after healing, {_name(entity)} is {'gone' if gone else 'live'} in "
                    f"postgres (v{row.version}): {op.brief()}")
        return
    version, last_seq = int(op.doc["version"]), op.doc.get("last_seq", row.seq)
    if (version, last_seq) != (row.version, row.seq):
        label = "1" if (version, last_seq) > (row.version, row.seq) else "5"
        seqs = f" last_seq {last_seq}, postgres {row.seq}" if entity[0] == "t" else ""
        out.add(label, f"after healing, {_name(entity)} is served at v{version}, postgres has "
                f"v{row.version}{seqs}: {op.brief()}")


def _check_final_pages(tid: str, chunk: list[Op], pg: dict[Entity, Row],
                       out: Violations) -> None:
    gone = pg[("t", tid)].deleted
    if gone or not all(op.ok for op in chunk):
        if not all((op.status == 404) == gone for op in chunk):
            out.add("5", f"after healing, thread {tid} is {'gone' if gone else 'live'} in "
                    f"postgres, its pages say: " + "; ".join(op.brief() for op in chunk[:2]))
        return
    want = sorted((r.seq, e[1], r.version) for e, r in pg.items()
                  if e[0] == "m" and r.thread_id == tid)
    got = [(i["seq"], i["message_id"], i["version"]) for op in chunk for i in op.doc["items"]]
    if got != want:
        diff = sorted(set(got) ^ set(want))[:4]
        out.add("5", f"after healing, the pages of thread {tid} differ from postgres "
                f"({len(got)} vs {len(want)} items; e.g. {diff}): {chunk[0].brief()}")


# ---- ClickHouse

# Read-marker moves (issue 12.2) are events of no entity version PostgreSQL goes through (it
# keeps the highest seq only): left out here; their history is checked (checker.py).
EVENTS_SQL = ("SELECT event_id, count() AS n, min(seq), max(seq), any(thread_id) FROM events"
              " FINAL WHERE event != 'read.updated' GROUP BY event_id")
RAW_COUNT_SQL = "SELECT count() FROM events"


def check_clickhouse(rows: list[list[Any]], pg: dict[Entity, Row], out: Violations,
                     erased: frozenset[Entity] = frozenset(),
                     erased_threads: frozenset[str] = frozenset(),
                     moved: dict[Entity, set[int]] | None = None) -> None:
    """7: one visible event per entity version (FINAL), each version of every entity, at the
    message's seq in PostgreSQL (or, `moved`, the seq a taken-over append was answered with:
    its event keeps the seq it was logged with). An erase (`erased`: acknowledged or maybe
    landed) deletes its message's earlier log entries that ClickHouse has not taken yet
    (README: Erasure), so of such a message only its last version must be there; of a message
    of an erased thread, none, and it may have events PostgreSQL never got (check_pg)."""
    moved = moved or {}
    expected = {f"{e[0]}:{e[1]}:{v}": (e, r) for e, r in pg.items()
                for v in range(1, r.version + 1)}
    got = {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}
    thread_of = {str(r[0]): str(r[4]) for r in rows}
    optional = {f"{e[0]}:{e[1]}:{v}" for e in erased if e in pg
                for v in range(1, pg[e].version)}
    optional |= {f"{e[0]}:{e[1]}:{v}" for e, r in pg.items()
                 if e[0] == "m" and r.thread_id in erased_threads
                 for v in range(1, r.version + 1)}
    for event_id in sorted(set(expected) - set(got) - optional)[:50]:
        out.add("7", f"event {event_id} (a version postgres went through) is not in clickhouse")
    for event_id in sorted(set(got) - set(expected))[:50]:
        if thread_of[event_id] not in erased_threads:  # see check_pg: never in postgres
            out.add("7", f"event {event_id} is in clickhouse, but postgres never had that "
                    "version")
    for event_id, (n, lo, hi) in sorted(got.items()):
        if n > 1:
            out.add("7", f"event {event_id} is visible {n} times in clickhouse (FINAL)")
        entity, row = expected.get(event_id, (("", ""), None))
        if row is not None and entity[0] == "m" and (lo, hi) != (row.seq, row.seq) and not (
                lo == hi and lo in moved.get(entity, ())):
            out.add("7", f"event {event_id} holds seq {lo}..{hi} in clickhouse, postgres "
                    f"{row.seq}")


def _name(entity: Entity) -> str:
    return {"t": "thread", "m": "message", "s": "state"}[entity[0]] + " " + entity[1]


# ---- the changes feed (issue 12.3) after healing


async def read_feed(caller: Caller, i: int, tid: str) -> tuple[dict[str, Any] | None, list[Op]]:
    """A thread's whole changes feed from cseq 0 through sidecar i, page after page: the
    last page's last_cseq and every page's items (None if a page failed or 404'd)."""
    ops, after, items = [], 0, []
    while True:
        op = await caller.send(_read(i, tid, tid, f"/v1/threads/{tid}/changes", "changes",
                                     {"after_cseq": str(after), "limit": "1000"}))
        ops.append(op)
        if not op.ok:
            return None, ops
        items += op.doc["items"]
        cursor = op.doc.get("next_cursor")
        if not cursor:
            return {"last_cseq": int(op.doc["last_cseq"]), "items": items}, ops
        after = int(cursor["after_cseq"])


def check_feed(tid: str, feed: dict[str, Any], ops: list[Op], out: Violations) -> None:
    """2: cseqs strictly increasing, none above last_cseq, each entity once. Against every
    acknowledged write answer of the thread with a cseq (ClickHouse-served ones carry 0): the
    entity's feed cseq is no lower (8), its version no lower (5), and at the same version a
    message has the same cseq (2: one change, one number). A thread's cseq is only checked
    to be no lower: its doc may change (last_seq) without a new version."""
    docs: dict[Entity, dict[str, Any]] = {}
    last, prev = feed["last_cseq"], 0
    for item in feed["items"]:
        doc = item["doc"]
        entity = ("m", doc["message_id"]) if item["kind"] == "message" else ("t", tid)
        cseq = int(doc["cseq"])
        if cseq <= prev or cseq > last:
            out.add("2", f"the changes feed of thread {tid} has cseq {cseq} after {prev} "
                    f"(last_cseq {last})")
        if entity in docs:
            out.add("2", f"the changes feed of thread {tid} holds {_name(entity)} twice "
                    f"(cseqs {docs[entity]['cseq']} and {cseq})")
        docs[entity], prev = doc, max(prev, cseq)
    for op in ops:
        if op.ok and op.thread_id == tid and op.kind in WRITES and op.doc.get("cseq"):
            _check_feed_entry(tid, docs, op, out)


def _check_feed_entry(tid: str, docs: dict[Entity, dict[str, Any]], op: Op,
                      out: Violations) -> None:
    entity = ("m", op.doc["message_id"]) if "message_id" in op.doc else ("t", tid)
    doc, cseq, version = docs.get(entity), int(op.doc["cseq"]), int(op.doc["version"])
    if doc is None:
        out.add("5", f"{_name(entity)} is not in thread {tid}'s changes feed, yet a write to it "
                f"was acknowledged with cseq {cseq}: {op.brief()}")
    elif int(doc["version"]) < version:
        out.add("5", f"thread {tid}'s changes feed has {_name(entity)} at v{doc['version']}, "
                f"v{version} was acknowledged: {op.brief()}")
    elif int(doc["cseq"]) < cseq:
        out.add("8", f"thread {tid}'s changes feed has {_name(entity)} at cseq {doc['cseq']}, "
                f"below the acknowledged cseq {cseq}: {op.brief()}")
    elif (entity[0] == "m" and int(doc["version"]) == version
          and int(doc["cseq"]) != cseq):
        out.add("2", f"thread {tid}'s changes feed has {_name(entity)} v{version} at cseq "
                f"{doc['cseq']}, acknowledged at cseq {cseq}: {op.brief()}")


# ---- erasure (issue 12.4): erased content gone from every tier


def erased_messages(ops: list[Op]) -> frozenset[Entity]:
    """The messages an erase may have reached (acknowledged or uncertain)."""
    return frozenset(("m", op.entity) for op in ops
                     if op.kind == "delete_message" and op.erase and (op.ok or op.uncertain))


def erased_threads(ops: list[Op]) -> frozenset[str]:
    """The threads an erase may have reached (acknowledged or uncertain)."""
    return frozenset(op.thread_id for op in ops if op.kind == "delete_thread" and op.erase
                     and (op.ok or op.uncertain))


def erased_tokens(ops: list[Op]) -> dict[str, Op]:
    """Every text written (or maybe written) to a message whose erasure, or its thread's, was
    acknowledged, with that erasure: each tag is unique (workload.Generator._tag), so finding
    it anywhere after healing is content that survived its erasure. (After a thread's erase no
    write to it lands: every message write in it came before.)"""
    erased = {op.entity: op for op in ops if op.ok and op.kind == "delete_message" and op.erase}
    threads = {op.thread_id: op for op in ops
               if op.ok and op.kind == "delete_thread" and op.erase}
    return {written_content(op): erased.get(op.entity) or threads[op.thread_id] for op in ops
            if (op.entity in erased or op.thread_id in threads) and op.kind in ERASABLE
            and (op.ok or op.uncertain) and isinstance(written_content(op), str)}


def check_erased(tokens: dict[str, Op], tiers: dict[str, list[str]], out: Violations) -> None:
    """10: no text of a tier (rows or values as text) holds an erased message's content."""
    for tier, texts in sorted(tiers.items()):
        for token, erase in sorted(tokens.items()):
            if any(token in text for text in texts):
                out.add("10", f"{tier} still holds {token!r} after its message was erased: "
                        f"{erase.brief()}")


async def redis_texts(r: aioredis.Redis) -> list[str]:
    """Every key's value as text: hashes (docs), sorted sets, strings, and every stream's
    entries (the write-behind logs, dead letters)."""
    texts = []
    async for key in r.scan_iter(count=1000):
        texts.append(f"{key!r} {await key_value(r, key)!r}")
    return texts


PG_TEXTS_SQL = "SELECT m::text FROM messages m"  # content and metadata, every column
CH_TEXTS_SQL = ("SELECT concat(content, ' ', metadata, ' ', title) FROM events"
                " WHERE content != '' OR metadata != '{}' OR title != ''")
