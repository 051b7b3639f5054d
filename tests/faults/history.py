"""Jepsen-style history for the fault tests: a load generator that records every client op, and
a checker that compares the history with PostgreSQL and the write-behind log after healing.

Every op ends as one of:
- ok: a 2xx answer, with the version (and seq) the sidecar acknowledged;
- fail: a definite answer (4xx/5xx), or the connection was refused (nothing was sent);
- info: a timeout or a connection error after sending: the outcome is unknown.

A 5xx is definite about the answer but not about the write: the request timeout answers 503
after the Lua script may have run, so the checker lets 5xx ops land or not, like info ops.

Labels in brackets are ARCHITECTURE.md's invariants, as in the nemesis checker (checker.py:
FAULTS.md's I1 is [1], I2 and I3 are [2], I4 is [9]). Each problem is also sorted as lost,
duplicated, regressed or other, for the fault matrix (results.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis

from proxy import keys
from proxy.backends import GROUPS
from tests.faults.results import Outcome

OK, FAIL, INFO = "ok", "fail", "info"


@dataclass
class Op:
    kind: str  # thread | append | patch | state
    id: str  # thread id, message id or state key
    thread_id: str  # '' for state
    url: str
    started: float  # time.monotonic() when the request was sent
    ended: float = 0.0
    outcome: str = INFO
    status: int | None = None
    version: int | None = None
    seq: int | None = None
    value: Any = None  # the acknowledged content (messages) or value (state)
    error: str = ""

    @property
    def uncertain(self) -> bool:
        """May have been applied although the client was not told so."""
        return self.outcome == INFO or (self.outcome == FAIL and (self.status or 0) >= 500)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)

    def of(self, outcome: str, kind: str | None = None) -> list[Op]:
        return [o for o in self.ops if o.outcome == outcome and kind in (None, o.kind)]

    def between(self, start: float, end: float) -> list[Op]:
        """Ops sent at or after start that ended before end (monotonic seconds)."""
        return [o for o in self.ops if o.started >= start and o.ended <= end]

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for o in self.ops:
            counts[f"{o.kind}:{o.outcome}"] += 1
            if o.status is not None and o.status >= 400:
                counts[f"status:{o.status}"] += 1
        return dict(sorted(counts.items()))


class Load:
    """N concurrent HTTP clients against one or more sidecar URLs, recording a History.

    Each client appends messages with ids it chooses (so an info append can be looked for in
    PostgreSQL), edits messages it appended (so per message the ops are sequential), and
    overwrites shared state keys. Use as `async with Load(...) as load`: setup(), start(),
    then stop() (or run_for) — stop waits for every op in flight to be answered or time out.
    """

    def __init__(self, urls: Sequence[str], *, clients: int = 16, threads: int = 16,
                 state_keys: int = 8, rate_per_s: float | None = None, timeout_s: float = 5.0,
                 prefix: str = "r", seed: int = 1) -> None:
        self.urls = list(urls)
        self.history = History()
        self.threads = [f"{prefix}-t{i}" for i in range(threads)]
        self.state_keys = [f"{prefix}-k{i}" for i in range(state_keys)]
        self._clients = clients
        self._interval_s = clients / rate_per_s if rate_per_s else 0.0
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._prefix = prefix
        self._seed = seed
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        # One connection per client: a request never waits in the client's own pool.
        connector = aiohttp.TCPConnector(limit=self._clients + 4, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        # aiohttp silently resends an idempotent request (PUT) whose keep-alive connection
        # dropped; the resend's "connection refused" would then hide that the first attempt
        # was applied. One attempt per op, as aiohttp's own TestClient does.
        self._session._retry_connection = False
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
        if self._session is not None:
            await self._session.close()

    async def setup(self) -> None:
        """Create the threads and state keys (through the first URL); all must succeed."""
        for tid in self.threads:
            op = await self._send("thread", tid, tid, "PUT", f"/v1/threads/{tid}",
                                  {"title": tid}, self.urls[0])
            assert op.outcome == OK, f"setup: PUT thread {tid}: {op}"
        for key in self.state_keys:
            op = await self._send("state", key, "", "PUT", f"/v1/state/{key}",
                                  {"value": {"setup": key}}, self.urls[0])
            assert op.outcome == OK, f"setup: PUT state {key}: {op}"

    def start(self) -> None:
        self._stopping.clear()
        self._tasks = [asyncio.create_task(self._client(c), name=f"load-client-{c}")
                       for c in range(self._clients)]

    async def stop(self) -> History:
        """Stop sending; wait for the ops in flight (bounded by the client timeout)."""
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            await asyncio.gather(*tasks)
        return self.history

    async def run_for(self, seconds: float) -> History:
        self.start()
        await asyncio.sleep(seconds)  # the load's duration, not a synchronisation
        return await self.stop()

    async def _client(self, c: int) -> None:
        rng = random.Random(self._seed * 1000 + c)
        mine: list[tuple[str, str]] = []  # (thread, message) this client appended, acked
        n = 0
        while not self._stopping.is_set():
            n += 1
            url = self.urls[(c + n) % len(self.urls)]
            started = time.monotonic()
            roll = rng.random()
            if roll < 0.15 and mine:
                op = await self._patch(rng.choice(mine), f"{c}-{n}", url)
            elif roll < 0.25:
                op = await self._put_state(rng.choice(self.state_keys), c, n, url)
            else:
                op = await self._append(rng.choice(self.threads), f"{self._prefix}-{c}-{n}",
                                        url)
                if op.outcome == OK:
                    mine.append((op.thread_id, op.id))
            # A dead or refusing target must not turn a client into a hot loop.
            pause = self._interval_s - (time.monotonic() - started)
            if op.outcome != OK:
                pause = max(pause, 0.02)
            if pause > 0:
                await asyncio.sleep(pause)

    async def _append(self, tid: str, mid: str, url: str) -> Op:
        # Raw HTTP, not proxy.client: the history records each single send's own status and timing.
        body = {"message_id": mid, "role": "user", "content": f"hello {mid}"}
        return await self._send("append", mid, tid, "POST", f"/v1/threads/{tid}/messages", body,
                                url)

    async def _patch(self, target: tuple[str, str], tag: str, url: str) -> Op:
        tid, mid = target
        return await self._send("patch", mid, tid, "PATCH", f"/v1/threads/{tid}/messages/{mid}",
                                {"content": f"edit {tag}"}, url)

    async def _put_state(self, key: str, c: int, n: int, url: str) -> Op:
        return await self._send("state", key, "", "PUT", f"/v1/state/{key}",
                                {"value": {"client": c, "n": n}}, url)

    async def _send(self, kind: str, entity: str, tid: str, method: str, path: str,
                    body: dict[str, Any], url: str) -> Op:
        assert self._session is not None, "use Load as an async context manager"
        op = Op(kind, entity, tid, url, time.monotonic())
        self.history.ops.append(op)
        try:
            async with self._session.request(method, url + path, json=body) as resp:
                raw = await resp.read()
                op.status = resp.status
        except aiohttp.ClientConnectorError as e:  # never connected: nothing was sent
            op.outcome, op.error = FAIL, f"connect: {e}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            op.outcome, op.error = INFO, f"{type(e).__name__}: {e}"
        else:
            _record_answer(op, raw)
        op.ended = time.monotonic()
        return op


def _record_answer(op: Op, raw: bytes) -> None:
    assert op.status is not None
    if op.status >= 300:
        op.outcome, op.error = FAIL, raw[:300].decode(errors="replace")
        return
    doc = orjson.loads(raw)
    op.outcome, op.version = OK, int(doc["version"])
    if op.kind in ("append", "patch"):
        op.seq, op.value = int(doc["seq"]), doc["content"]
    elif op.kind == "state":
        op.value = doc["value"]


# ---- the checker

LOST, DUPLICATED, REGRESSED, OTHER = "lost", "duplicated", "regressed", "other"


@dataclass(frozen=True)
class Problem:
    """One thing that does not hold; `count` writes of `kind` (LOST ... OTHER) behind it."""

    kind: str
    text: str
    count: int = 1

    def __str__(self) -> str:
        return self.text


@dataclass
class Stored:
    """What PostgreSQL holds for the history's entities."""

    threads: dict[str, tuple[int, int]]  # thread_id -> (version, last_seq)
    messages: dict[str, tuple[str, int, int, str]]  # id -> (thread_id, seq, version, content)
    state: dict[str, tuple[int, Any]]  # key -> (version, value)


async def read_pg(conn: asyncpg.Connection, history: History) -> Stored:
    tids = sorted({o.thread_id for o in history.ops if o.thread_id})
    skeys = sorted({o.id for o in history.ops if o.kind == "state"})
    threads = await conn.fetch("SELECT thread_id, version, last_seq FROM threads"
                               " WHERE thread_id = ANY($1)", tids)
    # Every message of the history's threads: one that no op wrote would be a phantom.
    messages = await conn.fetch("SELECT message_id, thread_id, seq, version, content"
                                " FROM messages WHERE thread_id = ANY($1)", tids)
    state = await conn.fetch("SELECT key, version, value::text AS value FROM state_entries"
                             " WHERE key = ANY($1)", skeys)
    return Stored({r["thread_id"]: (r["version"], r["last_seq"]) for r in threads},
                  {r["message_id"]: (r["thread_id"], r["seq"], r["version"], r["content"])
                   for r in messages},
                  {r["key"]: (r["version"], orjson.loads(r["value"]) if r["value"] else None)
                   for r in state})


def _by_entity(history: History) -> dict[tuple[str, str], list[Op]]:
    ops: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for o in history.ops:
        kind = {"append": "m", "patch": "m", "thread": "t", "state": "s"}[o.kind]
        ops[(kind, o.id)].append(o)
    return ops


def _stored_version(stored: Stored, kind: str, entity: str) -> tuple[int | None, Any]:
    if kind == "m":
        row = stored.messages.get(entity)
        return (row[2], row[3]) if row else (None, None)
    if kind == "s":
        srow = stored.state.get(entity)
        return srow if srow else (None, None)
    trow = stored.threads.get(entity)
    return (trow[0], None) if trow else (None, None)


def version_problems(history: History, stored: Stored) -> list[Problem]:
    """[1] (every ok version landed) and [2] (stored = the highest acked version, or one an
    uncertain op may have written: each uncertain op adds at most one version). Below the
    highest acked version is a regression; above what the writes explain, a write applied
    twice."""
    out = []
    for (kind, entity), ops in _by_entity(history).items():
        acked = [o for o in ops if o.outcome == OK]
        uncertain = sum(o.uncertain for o in ops)
        top = max((o.version or 0 for o in acked), default=0)
        version, value = _stored_version(stored, kind, entity)
        if version is None:
            if acked:
                out.append(Problem(LOST, f"[1] lost: {kind} {entity} acked at v{top}, not in "
                                         f"postgres"))
            continue
        if not top <= version <= top + uncertain:
            out.append(Problem(REGRESSED if version < top else DUPLICATED,
                               f"[2]: {kind} {entity} stored at v{version}, acked up to v{top} "
                               f"with {uncertain} uncertain ops: {_brief(ops)}"))
        last = next((o for o in acked if o.version == version), None)
        if last is not None and kind != "t" and last.value != value:
            out.append(Problem(OTHER, f"[2]: {kind} {entity} v{version} holds {value!r}, "
                                      f"acked {last.value!r}"))
    return out


def _brief(ops: list[Op]) -> str:
    return ", ".join(f"{o.kind} {o.outcome} {o.status or ''} v{o.version} {o.error[:80]}"
                     for o in ops[-6:])


def seq_problems(history: History, stored: Stored) -> list[Problem]:
    """[2]: (thread, seq) unique, seqs gapless 1..last_seq per thread, acked seqs kept, and no
    message that no op may have written. A seq held twice counts as duplicated."""
    out = []
    appends = {o.id: o for o in history.ops if o.kind == "append"}
    per_thread: dict[str, list[int]] = defaultdict(list)
    for mid, (tid, seq, _, _) in stored.messages.items():
        per_thread[tid].append(seq)
        op = appends.get(mid)
        if op is None or not (op.outcome == OK or op.uncertain):
            out.append(Problem(OTHER, f"[2]: message {mid} in postgres was never written "
                                      f"(op: {op})"))
        elif op.outcome == OK and (op.thread_id, op.seq) != (tid, seq):
            out.append(Problem(OTHER, f"[2]: message {mid} acked at {op.thread_id}#{op.seq}, "
                                      f"stored {tid}#{seq}"))
    for tid in sorted({o.thread_id for o in history.ops if o.thread_id}):
        seqs = sorted(per_thread.get(tid, []))
        if seqs != list(range(1, len(seqs) + 1)):
            dupes = len(seqs) - len(set(seqs))
            out.append(Problem(DUPLICATED if dupes else OTHER,
                               f"[2]: thread {tid} seqs not 1..{len(seqs)} ({dupes} "
                               f"duplicates, max {seqs[-1] if seqs else 0})", max(1, dupes)))
        last_seq = stored.threads.get(tid, (0, 0))[1]
        if seqs and last_seq != len(seqs):
            out.append(Problem(OTHER, f"[2]: thread {tid} last_seq {last_seq}, messages "
                                      f"1..{len(seqs)}"))
    return out


async def log_problems(r: aioredis.Redis, shards: int,
                       groups: Sequence[str]) -> list[Problem]:
    """[9] (the backlog drains): no pending entry and nothing undelivered, per group and shard."""
    out = []
    for shard in range(shards):
        stream = keys.log(shard)
        if not await r.exists(stream):
            continue
        info = {_text(g["name"]): g for g in await r.xinfo_groups(stream)}
        for group in groups:
            if group not in info:
                out.append(Problem(OTHER, f"[9]: shard {shard} has no group {group}"))
                continue
            pending = (await r.xpending(stream, group))["pending"]
            last = _text(info[group]["last-delivered-id"])
            ms, _, seq = last.partition("-")
            undelivered = await r.xrange(stream, min=f"{ms}-{int(seq) + 1}", count=1)
            if pending or undelivered:
                out.append(Problem(OTHER, f"[9]: shard {shard} group {group}: {pending} "
                                          f"pending, {'some' if undelivered else 'no'} "
                                          f"undelivered entries"))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Verdict:
    seconds: float  # how long the checks took to hold
    rows: int  # PostgreSQL rows of the history's entities
    summary: dict[str, int]
    held_at: float = 0.0  # time.monotonic() when they held


# What check() holding means, for recovery-time definitions.
HELD = "every acknowledged write in PostgreSQL, nothing pending in the log"


def tally(history: History, problems: Sequence[Problem], outcome: Outcome) -> None:
    """The history's and the problems' figures, into the scenario's outcome."""
    outcome.acknowledged = len(history.of(OK))
    outcome.refused = sum((o.status or 500) >= 500 for o in history.of(FAIL))
    outcome.unknown = len(history.of(INFO))
    by_kind = {kind: sum(p.count for p in problems if p.kind == kind)
               for kind in (LOST, DUPLICATED, REGRESSED)}
    outcome.lost, outcome.duplicated = by_kind[LOST], by_kind[DUPLICATED]
    outcome.regressed, outcome.problems = by_kind[REGRESSED], len(problems)


def first_ack_after(history: History, since: float) -> float | None:
    """time.monotonic() when the first op sent at or after `since` was acknowledged."""
    return min((o.ended for o in history.of(OK) if o.started >= since), default=None)


async def check(history: History, pg_url: str, redis_url: str, shards: int, *,
                deadline_s: float = 15.0, groups: Sequence[str] = GROUPS,
                outcome: Outcome | None = None) -> Verdict:
    """Poll PostgreSQL and the log until [1], [2] and [9] hold, or fail at the deadline with
    what does not hold. A stored version above every acked one never converges: it fails at
    the end. The last poll's figures go into `outcome` either way."""
    started = time.monotonic()
    conn = await asyncpg.connect(pg_url)
    r = aioredis.Redis.from_url(redis_url)
    try:
        while True:
            stored = await read_pg(conn, history)
            problems = (version_problems(history, stored) + seq_problems(history, stored)
                        + await log_problems(r, shards, groups))
            if outcome is not None:
                tally(history, problems, outcome)
            if not problems:
                rows = len(stored.threads) + len(stored.messages) + len(stored.state)
                now = time.monotonic()
                return Verdict(now - started, rows, history.summary(), now)
            if time.monotonic() - started > deadline_s:
                raise AssertionError(
                    f"{len(problems)} problems after {deadline_s} s (history "
                    f"{history.summary()}):\n" + "\n".join(map(str, problems[:30])))
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
        await r.aclose()
