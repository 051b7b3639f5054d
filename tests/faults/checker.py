"""The nemesis history checker: what every recorded answer must satisfy, given every other.

Labels are ARCHITECTURE.md's invariants (violations.LABELS; FAULTS.md's I1-I5 map onto them:
I1 -> 1, I2 -> 2 and 7, I3 -> 2, I4 -> 9, I5 -> 9) plus `api` for answers README.md
specifies that no invariant covers. The end state is checked in endstate.py, health in
health.py, what only Redis and PostgreSQL show in sampler.py.

Checked here: one write per version and one seq per message, one message per seq (2); every
read against the writes acknowledged before it and the answers seen before it (5, 8), pages
holding exactly the seqs they cover (2; 5 if a missing one was acknowledged), no answer from
a thread whose delete was acknowledged (5), no 404 for what is live (5: also a DELETE of a
live state entry), a same-id same-body append answered 200 (api), If-Match honoured (api),
read markers never move backwards (8) and a move answers at least the seq it asked (api).

Allowances, i.e. what the contract lets an answer be:

- ok (2xx) is what happened; fail with a 4xx happened not at all; info (no answer) and 5xx
  (the request timeout answers 503 after the script may have run) may or may not have landed,
  at any time after they were sent. Nothing here treats an uncertain op as having happened
  before anything; it may only explain an answer (a 404 after an uncertain delete).
- "Before" is real time in this one process: a write acknowledged (ended) before a read was
  sent (started) must be visible to it, through any sidecar (5); a version any answer showed
  must never be followed by an older one (8; degraded answers excepted).
- Versions of one entity count up by one per write, so two acknowledged writes never share
  one (2), and a compare-and-set that succeeded on If-Match v answers v + 1 (api).
- Degraded reads, `X-Tier: clickhouse` (only while PostgreSQL is down, from a ClickHouse that
  may lag), are exempt from 5 and 8, and a 404 answered while PostgreSQL was down (or within
  3 s of its restart, while circuits close again) may be one of them (sidecar 0 reads its
  lagging chDB; 1 and 2 answer 503).
- Write-through mode (`redis.write_through`, Redis outages long enough to switch): a read
  answered from PostgreSQL (`X-Tier: postgres`) while Redis is down or being reconciled
  (WRITE_THROUGH_GRACE_S past the outage) is checked against the writes acknowledged through
  PostgreSQL only (Redis's unflushed ones are not there yet). A write Redis acknowledged
  whose version, seq or change number a write through PostgreSQL was given after it is
  `taken_over` (RELIABILITY.md, Redis outage): the edit lost to the later write, the message
  moved to the end of its thread, the change renumbered; its answer does not claim them.
- A 404 of a thread, message or state entry is right only if it may have been absent: it was
  never acknowledged before, or a delete (not refused with a 4xx) was sent before the answer
  came, or (state) a TTL it was given may have run out by then. State TTLs are checked against
  the `expires_at` the sidecar answered (same machine, same clock): a read sent after it must
  not see the entry (5).
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tests.faults.violations import Violations
from tests.faults.workload import (
    MARKER_OPS,
    MESSAGE_WRITES,
    STATE_WRITES,
    THREAD_WRITES,
    WRITES,
    Op,
)

if TYPE_CHECKING:
    from tests.faults.nemesis import FaultEvent

DEGRADED_GRACE_S = 3.0
# proxy.failover: drain (DRAIN_S 30 s) and waiting for the other sidecars after Redis is back
WRITE_THROUGH_GRACE_S = 45.0
Entity = tuple[str, str]


def entity_of(op: Op) -> Entity | None:
    if op.kind in MESSAGE_WRITES or op.kind == "get_message":
        return ("m", op.entity) if op.entity else None
    if op.kind in THREAD_WRITES or op.kind in ("get_thread", "page"):
        return ("t", op.thread_id)
    if op.kind in STATE_WRITES or op.kind == "get_state":
        return ("s", op.entity)
    return None


def claim(op: Op) -> int | None:
    """The version an acknowledged write made (an append answered 200 made none)."""
    if not op.ok:
        return None
    if op.kind in ("append", "append_anon", "retry"):
        return 1 if op.status == 201 else None
    return op.version if op.kind in WRITES else None


class Timeline:
    """Values known at times: the highest one known strictly before t."""

    def __init__(self) -> None:
        self._points: list[tuple[float, int]] = []
        self._ends: list[float] = []
        self._max: list[int] = []

    def add(self, at: float, value: int) -> None:
        self._points.append((at, value))

    def seal(self) -> None:
        self._points.sort()
        self._ends = [t for t, _ in self._points]
        self._max = list(itertools.accumulate((v for _, v in self._points), max))

    def before(self, t: float) -> int:
        i = bisect.bisect_left(self._ends, t)
        return self._max[i - 1] if i else 0


def _timelines() -> defaultdict[Any, Timeline]:
    return defaultdict(Timeline)


@dataclass
class Index:
    """The history by entity."""

    ops: list[Op]
    degraded: list[tuple[float, float]]  # PostgreSQL outages, widened by the grace
    written_through: list[tuple[float, float]] = field(default_factory=list)  # Redis outages
    taken_over: set[int] = field(default_factory=set)  # id() of ops, see taken_over()
    writes: dict[Entity, list[Op]] = field(default_factory=lambda: defaultdict(list))
    claims: dict[Entity, list[tuple[int, Op]]] = field(default_factory=lambda: defaultdict(list))
    superseded: dict[Entity, list[tuple[int, Op]]] = field(
        default_factory=lambda: defaultdict(list))  # the claims of taken-over writes
    acked: defaultdict[Entity, Timeline] = field(default_factory=_timelines)
    acked_seq: defaultdict[str, Timeline] = field(default_factory=_timelines)
    seen: defaultdict[Entity, Timeline] = field(default_factory=_timelines)
    seen_seq: defaultdict[str, Timeline] = field(default_factory=_timelines)
    # the same, of answers from PostgreSQL only (write-through mode's reads are held to them)
    acked_pg: defaultdict[Entity, Timeline] = field(default_factory=_timelines)
    acked_seq_pg: defaultdict[str, Timeline] = field(default_factory=_timelines)
    seen_pg: defaultdict[Entity, Timeline] = field(default_factory=_timelines)
    seen_seq_pg: defaultdict[str, Timeline] = field(default_factory=_timelines)
    thread_gone: dict[str, float] = field(default_factory=dict)  # acked delete: its end
    deletes: dict[Entity, list[float]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, ops: list[Op], events: list[FaultEvent], write_through: bool = False) -> Index:
        degraded = [(e.began, e.ended + DEGRADED_GRACE_S) for e in events
                    if e.fault.kind == "pg-stop"]
        index = cls(ops, degraded)
        if write_through:
            index.written_through = [(e.began, e.ended + WRITE_THROUGH_GRACE_S) for e in events
                                     if e.fault.kind == "redis-restart"]
            index.taken_over = {id(op) for op in taken_over(ops)}
        for op in ops:
            index._add(op)
        for timeline in [*index.acked.values(), *index.acked_seq.values(),
                         *index.seen.values(), *index.seen_seq.values(),
                         *index.acked_pg.values(), *index.acked_seq_pg.values(),
                         *index.seen_pg.values(), *index.seen_seq_pg.values()]:
            timeline.seal()
        for starts in index.deletes.values():
            starts.sort()
        return index

    def _add(self, op: Op) -> None:
        entity = entity_of(op)
        if entity is None:
            return
        if op.kind in WRITES:
            self._add_write(op, entity)
        if op.ok and op.tier != "clickhouse":
            self._add_seen(op, entity)

    def _add_write(self, op: Op, entity: Entity) -> None:
        self.writes[entity].append(op)
        version = claim(op)
        pg = op.tier == "postgres"
        if version is not None:
            claims = self.superseded if id(op) in self.taken_over else self.claims
            claims[entity].append((version, op))
            self.acked[entity].add(op.ended, version)
            if pg:
                self.acked_pg[entity].add(op.ended, version)
        if op.ok and op.kind in ("append", "append_anon", "retry"):
            self.acked_seq[op.thread_id].add(op.ended, int(op.doc["seq"]))
            if pg:
                self.acked_seq_pg[op.thread_id].add(op.ended, int(op.doc["seq"]))
        if op.kind.startswith("delete") and (op.ok or op.uncertain):
            self.deletes[entity].append(op.started)
        if op.kind == "delete_thread" and op.ok:
            self.thread_gone[op.thread_id] = min(op.ended, self.thread_gone.get(op.thread_id,
                                                                                op.ended))

    def _add_seen(self, op: Op, entity: Entity) -> None:
        doc = op.doc
        timelines = [(self.seen, self.seen_seq)]
        if op.tier == "postgres":
            timelines.append((self.seen_pg, self.seen_seq_pg))
        for versions, seqs in timelines:
            if op.kind == "page":
                for item in doc["items"]:
                    versions[("m", item["message_id"])].add(op.ended, int(item["version"]))
            elif "version" in doc:
                versions[entity].add(op.ended, int(doc["version"]))
            seq = doc.get("last_seq", doc.get("seq"))
            if op.thread_id and seq is not None:
                seqs[op.thread_id].add(op.ended, int(seq))

    def held_to_pg(self, op: Op) -> bool:
        """Write-through mode: a read answered from PostgreSQL while Redis was down or being
        reconciled; it is checked against what was acknowledged through PostgreSQL only. A
        404 names no tier: one in that time may be PostgreSQL's too."""
        return (op.tier == "postgres" or op.status == 404) and any(
            start < op.ended and op.started < end for start, end in self.written_through)

    def timelines(self, op: Op) -> tuple[defaultdict[Entity, Timeline],
                                         defaultdict[Entity, Timeline],
                                         defaultdict[str, Timeline],
                                         defaultdict[str, Timeline]]:
        """(acked, seen, acked_seq, seen_seq) that the read `op` is held to."""
        if self.held_to_pg(op):
            return self.acked_pg, self.seen_pg, self.acked_seq_pg, self.seen_seq_pg
        return self.acked, self.seen, self.acked_seq, self.seen_seq

    # ---- questions the checks ask

    def gone_before(self, tid: str, t: float) -> bool:
        """The thread's delete was acknowledged before t."""
        return tid in self.thread_gone and self.thread_gone[tid] < t

    def maybe_deleted(self, entity: Entity, by: float) -> bool:
        """A delete of the entity (not refused) was sent before `by`."""
        starts = self.deletes.get(entity, [])
        return bool(starts) and starts[0] < by

    def degraded_during(self, op: Op) -> bool:
        return any(op.started < end and op.ended > start for start, end in self.degraded)

    def may_be_absent(self, op: Op, entity: Entity, tid: str) -> bool:
        """A 404 is right: never acknowledged before, or a delete sent before the answer
        (of the entity or its thread), or a degraded read."""
        return (self.timelines(op)[0][entity].before(op.started) == 0
                or self.maybe_deleted(entity, op.ended)
                or bool(tid) and self.maybe_deleted(("t", tid), op.ended)
                or self.degraded_during(op))


def check_history(ops: list[Op], events: list[FaultEvent], out: Violations,
                  write_through: bool = False) -> Index:
    index = Index.of(ops, events, write_through)
    check_claims(index, out)
    kept = [op for op in ops if id(op) not in index.taken_over]
    check_seqs(kept, out)
    check_markers(ops, out)
    check_cseqs(kept, out)
    for op in ops:
        if op.kind in WRITES:
            check_write_answer(index, op, out)
        elif op.kind in ("get_thread", "page", "get_message", "get_state"):
            check_read(index, op, out)
    return index


def taken_over(ops: list[Op]) -> list[Op]:
    """Writes acknowledged by Redis whose version, seq or change number a write acknowledged
    through PostgreSQL (later) was given too: Redis held them unflushed while it was down."""
    through: dict[tuple[Any, ...], float] = {}
    for op in ops:
        if op.ok and op.tier == "postgres" and isinstance(op.doc, dict):
            for key in _numbers(op):
                through[key] = min(op.ended, through.get(key, op.ended))
    return [op for op in ops if op.ok and op.tier == "redis" and isinstance(op.doc, dict)
            and any(op.ended < through.get(key, 0.0) for key in _numbers(op))]


def _numbers(op: Op) -> list[tuple[Any, ...]]:
    """The numbers an acknowledged write was given: its entity's version, its message's seq,
    its thread's change number (none if it made no version: an append answered 200)."""
    entity, version = entity_of(op), claim(op)
    if op.kind not in WRITES or entity is None or version is None:
        return []
    out: list[tuple[Any, ...]] = [("v", entity, version)]
    if op.kind in ("append", "append_anon", "retry") and "seq" in op.doc:
        out.append(("seq", op.thread_id, int(op.doc["seq"])))
    if op.thread_id and op.doc.get("cseq"):
        out.append(("cseq", op.thread_id, int(op.doc["cseq"])))
    return out


def check_claims(index: Index, out: Violations) -> None:
    """2: one version, one write."""
    for entity, claims in index.claims.items():
        by_version: dict[int, list[Op]] = defaultdict(list)
        for version, op in claims:
            by_version[version].append(op)
        for version, ops in sorted(by_version.items()):
            if len(ops) > 1:
                out.add("2", f"{_name(entity)} v{version} was acknowledged to {len(ops)} "
                        f"writes: " + " | ".join(o.brief() for o in ops[:3]))


def check_seqs(ops: list[Op], out: Violations) -> None:
    """2: a message keeps one seq; a seq belongs to one message."""
    seqs: dict[str, set[int]] = defaultdict(set)
    owners: dict[tuple[str, int], set[str]] = defaultdict(set)
    for op in ops:
        if op.ok and op.kind in MESSAGE_WRITES and "seq" in op.doc:
            seqs[op.entity].add(int(op.doc["seq"]))
            owners[(op.thread_id, int(op.doc["seq"]))].add(op.entity)
    for mid, found in seqs.items():
        if len(found) > 1:
            out.add("2", f"message {mid} was answered with seqs {sorted(found)}")
    for (tid, seq), mids in owners.items():
        if len(mids) > 1:
            out.add("2", f"thread {tid} seq {seq} was given to {sorted(mids)}: seq reused")


def check_markers(ops: list[Op], out: Violations) -> None:
    """8: a read marker never goes back: an answer (PUT or GET) never shows a lower seq than
    one answered before it was sent; api: a PUT answers at least the seq it asked for."""
    seen: defaultdict[tuple[str, str], Timeline] = _timelines()
    answered = [op for op in ops if op.ok and op.kind in MARKER_OPS]
    for op in answered:
        seen[(op.thread_id, op.entity)].add(op.ended, int(op.doc["seq"]))
    for timeline in seen.values():
        timeline.seal()
    for op in answered:
        seq, before = int(op.doc["seq"]), seen[(op.thread_id, op.entity)].before(op.started)
        if seq < before:
            out.add("8", f"read marker of {op.entity} on thread {op.thread_id} went back from "
                    f"{before} to {seq}: {op.brief()}")
        if op.kind == "put_marker" and seq < int((op.body or {})["seq"]):
            out.add("api", f"a read-marker move answered a lower seq than it asked for: "
                    f"{op.brief()}")


def check_cseqs(ops: list[Op], out: Violations) -> None:
    """2: a thread's change number (cseq) belongs to one change: one entity at one version
    (answers from ClickHouse carry none: 0)."""
    owners: dict[tuple[str, int], set[tuple[str, int]]] = defaultdict(set)
    for op in ops:
        doc = op.doc if op.ok and isinstance(op.doc, dict) else {}
        if op.thread_id and doc.get("cseq") and "version" in doc:
            change = (doc.get("message_id", ""), int(doc["version"]))
            owners[(op.thread_id, int(doc["cseq"]))].add(change)
    for (tid, cseq), changes in sorted(owners.items()):
        if len(changes) > 1:
            out.add("2", f"thread {tid} cseq {cseq} was given to {sorted(changes)[:3]}: "
                    "cseq reused")


def check_write_answer(index: Index, op: Op, out: Violations) -> None:
    tid = op.thread_id
    erasing = op.kind == "delete_thread" and op.erase  # a deleted thread may still be erased
    if op.ok and tid and index.gone_before(tid, op.started) and not erasing:
        out.add("5", f"a write was accepted on thread {tid} after its delete was "
                f"acknowledged: {op.brief()}")
    if op.kind == "conflict" and op.ok:
        out.add("api", f"another body under an existing message id was accepted: {op.brief()}")
    if op.kind in ("append", "retry") and op.status == 409:
        out.add("api", f"an append sent again with the same id and body got 409 (README: "
                f"200 with the original): {op.brief()}")
    if op.ok and op.if_match is not None and op.version != op.if_match + 1:
        out.add("api", f"If-Match {op.if_match} succeeded at v{op.version}: {op.brief()}")
    if op.status == 404:
        _check_write_404(index, op, out)
    if op.kind == "put_thread" and op.status == 409 and not index.maybe_deleted(
            ("t", tid), op.ended):
        out.add("api", f"PUT of a live thread answered 409: {op.brief()}")


def _check_write_404(index: Index, op: Op, out: Violations) -> None:
    entity = entity_of(op)
    if entity is None or op.kind == "delete_thread":
        return
    if op.kind in ("append", "retry", "append_anon", "conflict", "put_thread"):
        entity = ("t", op.thread_id)
    if op.kind == "delete_state":
        if not may_be_absent_state(index, op):
            out.add("5", f"DELETE of a live state entry answered 404, deleting nothing: "
                    f"{op.brief()}")
    elif not index.may_be_absent(op, entity, op.thread_id):
        out.add("5", f"{_name(entity)} is live but a write to it answered 404: {op.brief()}")


def check_read(index: Index, op: Op, out: Violations) -> None:
    entity = entity_of(op)
    if entity is None or op.tier == "clickhouse":
        return
    if op.ok and op.thread_id and index.gone_before(op.thread_id, op.started):
        out.add("5", f"thread {op.thread_id} was deleted (acknowledged) before this read, "
                f"which still served it: {op.brief()}")
        return
    if op.status == 404:
        absent = (may_be_absent_state(index, op) if entity[0] == "s"
                  else index.may_be_absent(op, entity, op.thread_id))
        if not absent:
            out.add("5", f"{_name(entity)} was acknowledged and never deleted, yet not found:"
                    f" {op.brief()}")
    elif op.ok:
        {"page": _check_page, "get_state": _check_state_doc}.get(op.kind, _check_doc)(
            index, op, entity, out)


def _check_doc(index: Index, op: Op, entity: Entity, out: Violations) -> None:
    _check_version(index, op, entity, int(op.doc["version"]), out)
    if op.kind == "get_message":
        _check_content(index, op, entity, op.doc, out)
    if op.kind == "get_thread":
        _check_last_seq(index, op, int(op.doc["last_seq"]), out)


def _check_version(index: Index, op: Op, entity: Entity, version: int,
                   out: Violations) -> None:
    acked_t, seen_t, _, _ = index.timelines(op)
    acked, seen = acked_t[entity].before(op.started), seen_t[entity].before(op.started)
    if version < acked:
        out.add("5", f"{_name(entity)} served at v{version}, but v{acked} was acknowledged "
                f"before the read: {op.brief()}")
    elif version < seen:
        out.add("8", f"{_name(entity)} served at v{version}, but v{seen} was served before "
                f"the read: {op.brief()}")


def _check_last_seq(index: Index, op: Op, last_seq: int, out: Violations) -> None:
    _, _, acked_t, seen_t = index.timelines(op)
    acked = acked_t[op.thread_id].before(op.started)
    seen = seen_t[op.thread_id].before(op.started)
    if last_seq < acked:
        out.add("5", f"thread {op.thread_id} served with last_seq {last_seq}, but seq {acked} "
                f"was acknowledged before the read: {op.brief()}")
    elif last_seq < seen:
        out.add("8", f"thread {op.thread_id} served with last_seq {last_seq}, but {seen} was "
                f"served before the read: {op.brief()}")


def _check_content(index: Index, op: Op, entity: Entity, doc: dict[str, Any],
                   out: Violations) -> None:
    """The doc at version v is the one acknowledged at v (or one taken over at v)."""
    version = int(doc["version"])
    writes = [w for v, w in index.claims.get(entity, []) if v == version]
    if writes and all(written_content(w) != _doc_content(doc) for w in writes + [
            w for v, w in index.superseded.get(entity, []) if v == version]):
        out.add("2", f"{_name(entity)} v{version} served as {_doc_content(doc)!r}, "
                f"acknowledged as {written_content(writes[0])!r}: {op.brief()}")


def _check_page(index: Index, op: Op, entity: Entity, out: Violations) -> None:
    doc, params = op.doc, op.params or {}
    last = int(doc["last_seq"])
    _check_last_seq(index, op, last, out)
    lo, hi = page_range(params, last)
    seqs = [int(item["seq"]) for item in doc["items"]]
    if seqs != list(range(lo, hi + 1)):
        # 5 if a missing seq was acknowledged before the read, else 2 (a gap or a repeat)
        acked = index.timelines(op)[2][op.thread_id].before(op.started)
        label = "5" if set(range(lo, min(hi, acked) + 1)) - set(seqs) else "2"
        out.add(label, f"page of thread {op.thread_id} should hold seqs {lo}..{hi}, holds "
                f"{seqs}: {op.brief()}")
    for item in doc["items"]:
        mentity = ("m", item["message_id"])
        _check_version(index, op, mentity, int(item["version"]), out)
        _check_content(index, op, mentity, item, out)


def page_range(params: dict[str, str], last: int) -> tuple[int, int]:
    """The seqs a page must hold (README: no cursor = the latest `limit`)."""
    limit = int(params.get("limit", "50"))
    if "after" in params:
        after = int(params["after"])
        return after + 1, min(last, after + limit)
    hi = min(int(params["before"]) - 1, last) if "before" in params else last
    return max(1, hi - limit + 1), hi


def _check_state_doc(index: Index, op: Op, entity: Entity, out: Violations) -> None:
    _check_version(index, op, entity, int(op.doc["version"]), out)
    _check_content(index, op, entity, op.doc, out)
    expires = _ms(op.doc.get("expires_at"))
    if expires is not None and expires < op.wall_started * 1000 - 1:
        out.add("5", f"state {op.entity} served {op.wall_started * 1000 - expires:.0f} ms "
                f"after it expired: {op.brief()}")


def may_be_absent_state(index: Index, op: Op) -> bool:
    """A state entry may be absent at `op` if nothing was acknowledged before it, or if the
    last acknowledged write or any write (not refused) sent before the answer with a newer or
    unknown version is a delete or has a TTL that may have run out by the answer."""
    entity = ("s", op.entity)
    top = index.timelines(op)[0][entity].before(op.started)
    if top == 0 or index.degraded_during(op):
        return True
    return any(_absent_after(w, op) for w in index.writes.get(entity, [])
               if w.started < op.ended and (w.ok or w.uncertain)
               and (w.version is None or w.version >= top))


def _absent_after(write: Op, op: Op) -> bool:
    if write.kind == "delete_state":
        return True
    ttl = (write.body or {}).get("ttl")
    if ttl is None:
        return False
    earliest = (write.wall_started + ttl) * 1000  # an uncertain write's soonest expiry
    expires = _ms(write.doc.get("expires_at")) if write.ok else earliest
    return expires is not None and expires <= op.wall_ended * 1000 + 1


def written_content(op: Op) -> Any:
    """What a write stored: message text, state value (None for deletes)."""
    if op.kind in ("delete_message", "delete_state"):
        return None
    body = op.body or {}
    return body.get("value") if op.kind in STATE_WRITES else body.get("content")


def _doc_content(doc: dict[str, Any]) -> Any:
    if doc.get("deleted"):
        return None
    return doc["value"] if "key" in doc else doc.get("content")


def _ms(iso: str | None) -> float | None:
    return None if not iso else datetime.fromisoformat(iso).timestamp() * 1000


def _name(entity: Entity) -> str:
    return {"t": "thread", "m": "message", "s": "state"}[entity[0]] + " " + entity[1]
