"""The nemesis workload: concurrent clients sending random API calls to random sidecars, each
call recorded as an `Op` (ok / fail / info, with what was answered) for the checker.

Every random choice of a client comes from its own generator seeded from the run's seed, so
the mix of calls is reproducible; which entity a call targets also depends on what earlier
answers taught the shared `Knowledge` (timing), so runs are alike, not identical.

One attempt per op: aiohttp's silent resend of idempotent requests is off, and the retries the
workload makes (an append sent again with the same id and body) are ops of their own.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tests.faults.history import FAIL, INFO, OK

# (kind, weight): the op mix. Writes first, then reads, then the dead-letter replay race,
# then read markers (issue 12.2), then erasures (issue 12.4: a message DELETE with ?erase=true,
# an op of kind delete_message to every check); last, so earlier kinds keep their weights.
MIX: tuple[tuple[str, float], ...] = (
    ("append", 14), ("append_anon", 5), ("retry", 4), ("conflict", 1), ("edit", 8),
    ("delete_message", 2), ("put_thread", 2), ("delete_thread", 0.4), ("put_state", 12),
    ("delete_state", 3), ("get_thread", 5), ("page", 9), ("get_message", 8), ("get_state", 8),
    ("replay", 0.3), ("put_marker", 3), ("get_marker", 3), ("erase_message", 0.6),
)
MESSAGE_WRITES = frozenset({"append", "append_anon", "retry", "conflict", "edit",
                            "delete_message"})
THREAD_WRITES = frozenset({"put_thread", "delete_thread"})
STATE_WRITES = frozenset({"put_state", "delete_state"})
WRITES = MESSAGE_WRITES | THREAD_WRITES | STATE_WRITES
READS = frozenset({"get_thread", "page", "get_message", "get_state"})
MARKER_OPS = frozenset({"put_marker", "get_marker"})  # entity: the user id
USERS = ("u0", "u1", "u2")  # whose read markers the workload moves
POISON = "poison"  # message text or state values holding it break the temporary CHECK
POISONABLE = frozenset({"append", "append_anon", "edit", "put_state"})


@dataclass
class Op:
    """One API call and its answer. Times: monotonic (ordering) and wall (TTLs, in seconds)."""

    client: int
    kind: str
    sidecar: int
    thread_id: str  # '' for state ops and replays
    entity: str  # message id ('' for an anonymous append until answered), thread id or key
    method: str
    path: str
    body: dict[str, Any] | None = None
    if_match: int | None = None
    params: dict[str, str] | None = None
    started: float = 0.0
    ended: float = 0.0
    wall_started: float = 0.0
    wall_ended: float = 0.0
    outcome: str = INFO
    status: int | None = None
    doc: Any = None  # the JSON answer of a 2xx
    tier: str | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == OK

    @property
    def uncertain(self) -> bool:
        """May have been applied although no 2xx said so (no answer, or a 5xx: the request
        timeout answers 503 after the script may have run)."""
        return self.outcome == INFO or (self.outcome == FAIL and (self.status or 0) >= 500)

    @property
    def version(self) -> int | None:
        return int(self.doc["version"]) if self.ok and "version" in self.doc else None

    @property
    def erase(self) -> bool:
        return (self.params or {}).get("erase") == "true" and self.method == "DELETE"

    @property
    def poison(self) -> bool:
        """A write the poison constraint rejects (thread titles are not constrained)."""
        body = self.body or {}
        return self.kind in POISONABLE and POISON in str(body.get("content", body.get("value")))

    def brief(self) -> str:
        """One line for violation reports."""
        answer = f"{self.status or '-'} {self.outcome}"
        if self.ok and isinstance(self.doc, dict):
            answer += f" v{self.doc.get('version')}"
            if "seq" in self.doc:
                answer += f" seq {self.doc['seq']}"
        elif self.error:
            answer += f" {self.error[:60]}"
        return (f"#{self.client}:{self.kind} via s{self.sidecar} {self.method} {self.path} "
                f"[{self.started:.2f}-{self.ended:.2f}] -> {answer}")


@dataclass
class Knowledge:
    """What the clients learnt from answers, to aim their next ops at entities that exist."""

    threads: list[str]
    state_keys: list[str]
    hot: int  # the first `hot` threads and keys get half of the ops
    max_deleted_threads: int
    messages: dict[str, list[str]] = field(default_factory=dict)  # thread -> acked ids
    versions: dict[tuple[str, str], int] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)
    doomed: set[str] = field(default_factory=set)  # threads a delete was sent for
    sent_appends: dict[int, list[Op]] = field(default_factory=dict)  # per client, with an id
    acked_appends: dict[int, list[Op]] = field(default_factory=dict)
    poison: bool = False  # the poison constraint is on: mark some writes

    def learn(self, op: Op) -> None:
        if not op.ok:
            return
        doc = op.doc
        if op.kind in ("append", "append_anon", "retry"):
            mids = self.messages.setdefault(op.thread_id, [])
            if doc["message_id"] not in mids:
                mids.append(doc["message_id"])
            if op.kind == "append":
                self.acked_appends.setdefault(op.client, []).append(op)
        if "version" in doc:
            key = (_letter(op.kind), doc.get("message_id") or op.entity)
            self.versions[key] = max(self.versions.get(key, 0), int(doc["version"]))
        if op.thread_id and ("seq" in doc or "last_seq" in doc):
            seq = int(doc.get("last_seq", doc.get("seq", 0)))
            self.last_seq[op.thread_id] = max(self.last_seq.get(op.thread_id, 0), seq)


def _letter(kind: str) -> str:
    if kind in STATE_WRITES or kind == "get_state":
        return "s"
    if kind in THREAD_WRITES or kind in ("get_thread", "page"):
        return "t"
    return "m"


class Generator:
    """The next op of one client: a kind drawn from MIX, then its target and body."""

    def __init__(self, rng: random.Random, client: int, sidecars: int, know: Knowledge) -> None:
        self._rng = rng
        self._client = client
        self._sidecars = sidecars
        self._k = know
        self._n = 0
        self._kinds = [k for k, _ in MIX]
        self._weights = [w for _, w in MIX]
        self._last: dict[str, str] = {}  # "t" (threads) or "s" (state keys): the last one

    def next(self) -> Op:
        self._n += 1
        kind = self._rng.choices(self._kinds, self._weights)[0]
        return getattr(self, f"_{kind}")() or self._append()

    def _op(self, kind: str, tid: str, entity: str, method: str, path: str,
            **fields: Any) -> Op:
        return Op(self._client, kind, self._rng.randrange(self._sidecars), tid, entity, method,
                  path, **fields)

    def _tag(self, poisonable: bool = True) -> str:
        """A unique text per op; some are poison while the constraint is on. It ends in "z" so
        no tag is part of another (c1n1z is not in c1n10z): the erasure check searches for it."""
        poison = poisonable and self._k.poison and self._rng.random() < 0.5
        return f"{POISON if poison else 'x'}-c{self._client}n{self._n}z"

    def _pick(self, kind: str, items: list[str]) -> str:
        """Half the time the entity of this client's last op of that kind (bursts on one
        entity, with gaps between them: caches expire and refill in the middle of bursts),
        else one of the hot few or any, evenly."""
        last = self._last.get(kind)
        roll = self._rng.random()
        if last is not None and roll < 0.5:
            return last
        pick = self._rng.choice(items[:self._k.hot] if roll < 0.75 else items)
        self._last[kind] = pick
        return pick

    def _thread(self) -> str:
        return self._pick("t", self._k.threads)

    def _key(self) -> str:
        return self._pick("s", self._k.state_keys)

    def _message(self) -> tuple[str, str] | None:
        tid = self._thread()
        mids = self._k.messages.get(tid)
        return (tid, self._rng.choice(mids)) if mids else None

    def _maybe(self, entity: tuple[str, str], p: float) -> int | None:
        """If-Match on the last version seen, with probability p."""
        known = self._k.versions.get(entity)
        return known if known is not None and self._rng.random() < p else None

    # ---- message writes

    def _append(self) -> Op:
        tid, mid = self._thread(), f"m{self._client}x{self._n}"
        op = self._op("append", tid, mid, "POST", f"/v1/threads/{tid}/messages",
                      body={"message_id": mid, "role": "user", "content": self._tag()})
        self._k.sent_appends.setdefault(self._client, []).append(op)
        return op

    def _append_anon(self) -> Op:
        tid = self._thread()
        return self._op("append_anon", tid, "", "POST", f"/v1/threads/{tid}/messages",
                        body={"role": "assistant", "content": self._tag()})

    def _retry(self) -> Op | None:
        sent = self._k.sent_appends.get(self._client)
        if not sent:
            return None
        first = self._rng.choice(sent)
        return self._op("retry", first.thread_id, first.entity, "POST", first.path,
                        body=first.body)

    def _conflict(self) -> Op | None:
        acked = self._k.acked_appends.get(self._client)
        if not acked:
            return None
        first = self._rng.choice(acked)
        assert first.body is not None
        return self._op("conflict", first.thread_id, first.entity, "POST", first.path,
                        body={**first.body, "content": first.body["content"] + "-other"})

    def _edit(self) -> Op | None:
        target = self._message()
        if target is None:
            return None
        tid, mid = target
        return self._op("edit", tid, mid, "PATCH", f"/v1/threads/{tid}/messages/{mid}",
                        body={"content": self._tag()}, if_match=self._maybe(("m", mid), 0.5))

    def _delete_message(self) -> Op | None:
        target = self._message()
        if target is None:
            return None
        tid, mid = target
        return self._op("delete_message", tid, mid, "DELETE",
                        f"/v1/threads/{tid}/messages/{mid}",
                        if_match=self._maybe(("m", mid), 0.5))

    def _erase_message(self) -> Op | None:
        op = self._delete_message()
        if op is not None:
            op.params, op.if_match = {"erase": "true"}, None
        return op

    # ---- thread writes

    def _put_thread(self) -> Op:
        tid = self._thread()
        return self._op("put_thread", tid, tid, "PUT", f"/v1/threads/{tid}",
                        body={"title": self._tag(poisonable=False)},
                        if_match=self._maybe(("t", tid), 0.3))

    def _delete_thread(self) -> Op | None:
        """Cold threads only (the hot ones keep the load flowing), a few per run."""
        if len(self._k.doomed) >= self._k.max_deleted_threads:
            return None
        tid = self._rng.choice(self._k.threads[self._k.hot:])
        self._k.doomed.add(tid)
        op = self._op("delete_thread", tid, tid, "DELETE", f"/v1/threads/{tid}")
        if self._rng.random() < 0.5:  # erased: its messages' content leaves every tier
            op.params = {"erase": "true"}
        return op

    # ---- state

    def _put_state(self) -> Op:
        key = self._key()
        body: dict[str, Any] = {"value": self._tag()}
        if self._rng.random() < 0.35:
            body["ttl"] = self._rng.choice([1, 1.5, 2, 3])
        return self._op("put_state", "", key, "PUT", f"/v1/state/{key}", body=body,
                        if_match=self._maybe(("s", key), 0.3))

    def _delete_state(self) -> Op:
        key = self._key()
        return self._op("delete_state", "", key, "DELETE", f"/v1/state/{key}",
                        if_match=self._maybe(("s", key), 0.3))

    # ---- reads

    def _get_thread(self) -> Op:
        tid = self._thread()
        return self._op("get_thread", tid, tid, "GET", f"/v1/threads/{tid}")

    def _page(self) -> Op:
        tid = self._thread()
        last = self._k.last_seq.get(tid, 0)
        params = {"limit": str(self._rng.randint(1, 6))}
        mode = self._rng.choice(["latest", "before", "after"])
        if mode == "before":
            params["before"] = str(self._rng.randint(1, last + 1))
        elif mode == "after":
            params["after"] = str(self._rng.randint(0, max(0, last - 1)))
        return self._op("page", tid, tid, "GET", f"/v1/threads/{tid}/messages", params=params)

    def _get_message(self) -> Op | None:
        target = self._message()
        if target is None:
            return None
        tid, mid = target
        return self._op("get_message", tid, mid, "GET", f"/v1/threads/{tid}/messages/{mid}")

    def _get_state(self) -> Op:
        key = self._key()
        return self._op("get_state", "", key, "GET", f"/v1/state/{key}")

    def _replay(self) -> Op:
        return self._op("replay", "", "", "POST", "/v1/admin/dead-letters/replay")

    # ---- read markers

    def _put_marker(self) -> Op:
        """Any seq up to the last one known, so some move the marker and some do not."""
        tid, uid = self._thread(), self._rng.choice(USERS)
        seq = self._rng.randint(0, self._k.last_seq.get(tid, 0))
        return self._op("put_marker", tid, uid, "PUT", f"/v1/threads/{tid}/read-markers/{uid}",
                        body={"seq": seq})

    def _get_marker(self) -> Op:
        tid, uid = self._thread(), self._rng.choice(USERS)
        return self._op("get_marker", tid, uid, "GET", f"/v1/threads/{tid}/read-markers/{uid}")


class Caller:
    """Sends ops (one attempt each) and records them in `history`."""

    def __init__(self, url_of: Callable[[int], str], history: list[Op],
                 timeout_s: float = 5.0) -> None:
        self._url_of = url_of
        self.history = history
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Caller:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                              timeout=self._timeout)
        self._session._retry_connection = False  # see the module docstring
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, op: Op) -> Op:
        assert self._session is not None, "use Caller as an async context manager"
        self.history.append(op)
        headers = {"If-Match": f'"{op.if_match}"'} if op.if_match is not None else None
        op.started, op.wall_started = time.monotonic(), time.time()
        try:
            async with self._session.request(op.method, self._url_of(op.sidecar) + op.path,
                                             json=op.body, params=op.params,
                                             headers=headers) as resp:
                raw = await resp.read()
                op.status, op.tier = resp.status, resp.headers.get("X-Tier")
        except aiohttp.ClientConnectorError as e:  # never connected: nothing was sent
            op.outcome, op.error = FAIL, f"connect: {e}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            op.outcome, op.error = INFO, f"{type(e).__name__}: {e}"
        else:
            _record(op, raw)
        op.ended, op.wall_ended = time.monotonic(), time.time()
        return op


def _record(op: Op, raw: bytes) -> None:
    assert op.status is not None
    if op.status < 300:
        op.outcome, op.doc = OK, orjson.loads(raw)
        if op.kind == "append_anon":
            op.entity = op.doc["message_id"]
        return
    op.outcome = FAIL
    try:
        error = orjson.loads(raw)["error"]
        op.error = f"{error['code']}: {error['message']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        op.error = raw[:200].decode(errors="replace")


class Workload:
    """`clients` tasks, each sending ops at Poisson times (rate_per_s in all), until stop()."""

    def __init__(self, caller: Caller, know: Knowledge, seed: int, clients: int,
                 sidecars: int, rate_per_s: float) -> None:
        self._caller = caller
        self._know = know
        self._seed = seed
        self._clients = clients
        self._sidecars = sidecars
        self._rate_per_client = rate_per_s / clients
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(c), name=f"nemesis-client-{c}")
                       for c in range(self._clients)]

    async def stop(self) -> None:
        """Stop sending; wait for the ops in flight (bounded by the client timeout)."""
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        await asyncio.gather(*tasks)

    async def _client(self, c: int) -> None:
        rng = random.Random(f"{self._seed}:client:{c}")
        gen = Generator(rng, c, self._sidecars, self._know)
        while not self._stopping.is_set():
            started = time.monotonic()
            op = gen.next()
            if op.kind == "replay":  # two sidecars at once
                await self._replay_race(op, rng)
            else:
                self._know.learn(await self._caller.send(op))
            pause = rng.expovariate(self._rate_per_client) - (time.monotonic() - started)
            if pause > 0:
                await asyncio.sleep(pause)  # the op rate, not a synchronisation

    async def _replay_race(self, op: Op, rng: random.Random) -> None:
        other = Op(op.client, op.kind, (op.sidecar + rng.randrange(1, self._sidecars))
                   % self._sidecars, "", "", op.method, op.path)
        await asyncio.gather(self._caller.send(op), self._caller.send(other))
