"""HotTier: reads and writes Redis. Each write is one script call that checks, stores and logs.

What Redis does not hold (expired after a flush, older than a thread's window) is loaded
through the `Backing` (PostgreSQL read-through, see fallback.py) and written back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
import redis.asyncio as aioredis

from proxy import keys, model
from proxy.errors import (
    Backpressure,
    Conflict,
    NotFound,
    PreconditionFailed,
    Unavailable,
)
from proxy.redisconn import Scripts, redis_call
from proxy.settings import Settings
from proxy.writelog import Backlog

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RETRIES = 5


@dataclass(frozen=True)
class ThreadRow:
    doc: bytes  # complete thread doc without last_seq
    version: int
    created_at: str
    last_seq: int
    deleted: bool


@dataclass(frozen=True)
class MessageRow:
    mid: str
    seq: int
    version: int
    fingerprint: str
    doc: bytes


@dataclass(frozen=True)
class StateRow:
    doc: bytes
    version: int
    expires_at_ms: int | None
    deleted: bool


class Backing(Protocol):
    """Where data that Redis no longer holds lives (PostgreSQL), and write-through for
    `X-Durability: persisted`. `tier` names it in `X-Tier`."""

    tier: str

    async def load_thread(self, tid: str) -> ThreadRow | None: ...
    async def load_messages(self, tid: str, lo: int, hi: int) -> list[MessageRow]: ...
    async def load_message(self, tid: str, mid: str) -> MessageRow | None: ...
    async def load_state(self, key: str) -> StateRow | None: ...
    async def persist(self, kind: str, doc: bytes) -> None: ...


@dataclass(frozen=True)
class Result:
    """A doc and the tier that served it; `created` tells 201 from 200 on writes."""

    doc: bytes
    tier: str = "redis"
    created: bool = False


@dataclass(frozen=True)
class Page:
    thread_id: str
    last_seq: int
    lo: int
    hi: int
    items: list[bytes]
    tier: str


class SingleFlight:
    """One in-flight load per key; concurrent misses await the same result (and the refill
    it does), so 100 misses of one key make one query."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Task[Any]] = {}

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(fn())
            self._calls[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        self._calls.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: its awaiters (if any are left) get it themselves


class KeyedLocks:
    """An asyncio.Lock per key, dropped once nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class HotTier:
    def __init__(self, client: aioredis.Redis, settings: Settings, backing: Backing,
                 backlog: Backlog, degraded: Backing | None = None) -> None:
        self._r = client
        self._s = settings
        self._backing = backing
        self._degraded = degraded  # read-only, when the backing is down (degraded.py)
        self.backlog = backlog
        self._scripts = Scripts(client)
        self._flights = SingleFlight()
        self._edits = KeyedLocks()

    async def _run(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        return await self._scripts.run(name, keys_, args)

    def _shard(self, entity_id: str) -> int:
        return keys.shard_of(entity_id, self._s.redis.shards)

    def _thread_keys(self, tid: str) -> list[str]:
        s = self._shard(tid)
        return [keys.thread(s, tid), keys.messages(s, tid), keys.window(s, tid), keys.log(s)]

    def _admit(self) -> None:
        if self.backlog.entries >= self._s.flush.max_backlog:
            raise Backpressure(f"write-behind backlog is full ({self.backlog.entries} entries)",
                               retry_after_s=1.0)

    # ---- threads

    async def get_thread(self, tid: str) -> Result:
        t = self._thread_keys(tid)[0]
        doc, seq, deleted = await redis_call(lambda: self._r.hmget(t, "doc", "seq", "del"))
        tier = "redis"
        if doc is None:
            row, tier = await self._below(lambda: self._fill_thread(tid),
                                          lambda b: b.load_thread(tid))
            if row is None:
                raise NotFound(f"thread {tid} not found")
            doc, seq, deleted = row.doc, str(row.last_seq).encode(), b"1" if row.deleted else b"0"
        if deleted == b"1":
            raise NotFound(f"thread {tid} was deleted")
        return Result(_with_last_seq(doc, int(seq)), tier)

    async def _fill_thread(self, tid: str) -> ThreadRow | None:
        async def load() -> ThreadRow | None:
            row = await self._backing.load_thread(tid)
            if row is not None:
                await self._run("fill_thread", self._thread_keys(tid)[:3], [
                    row.doc, row.version, row.created_at, row.last_seq, int(row.deleted),
                    self._s.cache.ttl_s * 1000])
            return row

        return await self._flights.do(("t", tid), load)

    async def put_thread(self, tid: str, t: model.ThreadInput, if_match: str,
                         persisted: bool = False) -> Result:
        return await self._thread_write(tid, t, if_match, "put", persisted)

    async def delete_thread(self, tid: str, if_match: str, persisted: bool = False) -> Result:
        return await self._thread_write(tid, model.ThreadInput("", "", {}), if_match, "del",
                                        persisted)

    async def _thread_write(self, tid: str, t: model.ThreadInput, if_match: str, op: str,
                            persisted: bool) -> Result:
        self._admit()
        ks, new_ok = self._thread_keys(tid), "0"
        for _ in range(MAX_RETRIES):
            ms = model.now_ms()
            out = await self._run("thread_put", ks, [
                model.thread_body(tid, t, op == "del", ms), orjson.dumps(model.iso(ms)),
                if_match, new_ok, op, keys.events(self._shard(tid)), ms, tid])
            status = out[0].decode()
            if status == "MISS":
                new_ok = "0" if await self._fill_thread(tid) else "1"
                continue
            if status == "GONE":
                raise (NotFound if op == "del" else Conflict)(f"thread {tid} was deleted")
            if status == "NOTFOUND":
                raise NotFound(f"thread {tid} not found")
            if status == "PRECONDITION":
                raise PreconditionFailed(f"thread {tid} is at version {out[1].decode()}",
                                         {"version": out[1].decode()})
            doc = _with_last_seq(out[2], int(out[3]))
            if persisted:
                await self._backing.persist("thread", doc)
            return Result(doc, created=status == "CREATED")
        raise Unavailable(f"thread {tid}: gave up after {MAX_RETRIES} attempts")

    # ---- messages

    async def append(self, tid: str, m: model.MessageInput, persisted: bool = False) -> Result:
        self._admit()
        mid = m.message_id or model.new_id()
        checked = "0" if m.message_id else "1"
        body, fp = model.message_body(tid, mid, m, model.now_ms()), m.fingerprint()
        ks = self._thread_keys(tid)
        for _ in range(MAX_RETRIES):
            out = await self._run("message_append", ks, [
                tid, mid, body, fp, keys.events(self._shard(tid)), model.now_ms(), checked])
            status = out[0].decode()
            if status == "MISS":
                if await self._fill_thread(tid) is None:
                    raise NotFound(f"thread {tid} not found")
                continue
            if status == "CHECK":
                checked = "1"
                row = await self._backing.load_message(tid, mid)
                if row is not None:
                    return self._duplicate(row.fingerprint == fp, row.doc, mid)
                continue
            if status == "GONE":
                raise NotFound(f"thread {tid} was deleted")
            if status in ("DUP", "CONFLICT"):
                doc = out[1] if status == "DUP" else b""
                if status == "DUP" and not doc:
                    doc = await self._message_doc(tid, mid)
                return self._duplicate(status == "DUP", doc, mid)
            if persisted:
                await self._backing.persist("message", out[1])
            return Result(out[1], created=True)
        raise Unavailable(f"thread {tid}: gave up after {MAX_RETRIES} attempts")

    @staticmethod
    def _duplicate(same: bool, doc: bytes, mid: str) -> Result:
        if not same:
            raise Conflict(f"message {mid} exists with a different body")
        return Result(doc)

    async def _message_doc(self, tid: str, mid: str) -> bytes:
        return (await self.get_message(tid, mid, include_deleted=True)).doc

    async def get_message(self, tid: str, mid: str, include_deleted: bool = False) -> Result:
        s = self._shard(tid)
        doc = await self._run("get_message", [keys.messages(s, tid), keys.cold(s, tid),
                                              keys.thread(s, tid)], [mid])
        if doc == b"GONE":
            raise NotFound(f"thread {tid} was deleted")
        tier = "redis"
        if doc is None:
            row, tier = await self._below(
                lambda: self._flights.do(("m", tid, mid), lambda: self._load_message(tid, mid)),
                lambda b: b.load_message(tid, mid))
            if row is None:
                raise NotFound(f"message {mid} not found in thread {tid}")
            doc = row.doc
        # Parsed, not searched: metadata may hold a "deleted": true of its own.
        if not include_deleted and orjson.loads(doc)["deleted"]:
            raise NotFound(f"message {mid} was deleted")
        return Result(doc, tier)

    async def _load_message(self, tid: str, mid: str) -> MessageRow | None:
        row = await self._backing.load_message(tid, mid)
        if row is not None:
            await self._refill([row], tid)
        return row

    async def _load_page(self, tid: str, lo: int, hi: int) -> list[MessageRow]:
        rows = await self._backing.load_messages(tid, lo, hi)
        if rows:
            await self._refill(rows, tid)
        return rows

    async def _refill(self, rows: list[MessageRow], tid: str) -> None:
        s = self._shard(tid)
        args: list[Any] = [self._s.cache.ttl_s * 1000, self._s.redis.window]
        for r in rows:
            args += [r.mid, r.seq, r.version, r.fingerprint, r.doc]
        await self._run("fill_messages", self._thread_keys(tid)[:3] + [keys.cold(s, tid)], args)

    async def edit_message(self, tid: str, mid: str, patch: model.MessagePatch, if_match: str,
                           persisted: bool = False) -> Result:
        return await self._update(tid, mid, if_match, persisted,
                                  lambda d, ms: model.edited_message(d, patch.fields, ms))

    async def delete_message(self, tid: str, mid: str, if_match: str,
                             persisted: bool = False) -> Result:
        return await self._update(tid, mid, if_match, persisted, model.deleted_message)

    async def _update(self, tid: str, mid: str, if_match: str, persisted: bool,
                      change: Callable[[dict[str, Any], int], dict[str, Any]]) -> Result:
        """Read, change, compare-and-set on the version; retried on a lost race unless the
        client named the version it expects (then the race is its 412)."""
        self._admit()
        # Edits of one message take turns in this process, so concurrent edits do not spend
        # their retries losing the compare-and-set to each other (only to other sidecars).
        async with self._edits.hold((tid, mid)):
            return await self._compare_and_set(tid, mid, if_match, persisted, change)

    async def _compare_and_set(self, tid: str, mid: str, if_match: str, persisted: bool,
                               change: Callable[[dict[str, Any], int], dict[str, Any]]
                               ) -> Result:
        ks = self._thread_keys(tid) + [keys.cold(self._shard(tid), tid)]
        for _ in range(MAX_RETRIES):
            current = orjson.loads((await self.get_message(tid, mid)).doc)
            version = str(current["version"])
            if if_match and if_match != version:
                raise PreconditionFailed(f"message {mid} is at version {version}",
                                         {"version": version})
            ms = model.now_ms()
            new = change(current, ms)
            doc = orjson.dumps(new)
            event = "message.deleted" if new["deleted"] else "message.updated"
            out = await self._run("message_update", ks, [
                tid, mid, version, doc, new["version"], event, keys.events(self._shard(tid)),
                ms, new["seq"]])
            status = out[0].decode()
            if status == "OK":
                if persisted:
                    await self._backing.persist("message", doc)
                return Result(doc)
            if status == "MISS":
                await self._fill_meta(tid, mid)
            elif status == "GONE":
                raise NotFound(f"thread {tid} was deleted")
            elif if_match:
                raise PreconditionFailed(f"message {mid} changed meanwhile",
                                         {"version": out[1].decode()})
        raise Unavailable(f"message {mid}: gave up after {MAX_RETRIES} attempts")

    async def _fill_meta(self, tid: str, mid: str) -> None:
        if await self._fill_thread(tid) is None:
            raise NotFound(f"thread {tid} not found")
        row = await self._backing.load_message(tid, mid)
        if row is None:
            raise NotFound(f"message {mid} not found in thread {tid}")
        await self._run("fill_meta", self._thread_keys(tid)[:2],
                        [mid, row.version, row.fingerprint, row.doc])

    async def page(self, tid: str, mode: str, cursor: int, limit: int) -> Page:
        ks = self._thread_keys(tid)[:3]
        for _ in range(MAX_RETRIES):
            out = await self._run("read_page", ks, [mode, cursor, limit])
            status = out[0].decode()
            if status == "GONE":
                raise NotFound(f"thread {tid} was deleted")
            if status == "MISS":
                row, tier = await self._below(lambda: self._fill_thread(tid),
                                              lambda b: b.load_thread(tid))
                if row is None or row.deleted:
                    raise NotFound(f"thread {tid} not found")
                if tier == self._backing.tier:
                    continue
                return await self._degraded_page(tid, row, mode, cursor, limit)
            last, lo, hi, floor = int(out[1]), int(out[2]), int(out[3]), int(out[4])
            if status == "OK":
                return Page(tid, last, lo, hi, list(out[5:]), "redis")
            return await self._page_below(tid, last, lo, hi, floor, list(out[5:]))
        raise Unavailable(f"thread {tid}: gave up after {MAX_RETRIES} attempts")

    async def _page_below(self, tid: str, last: int, lo: int, hi: int, floor: int,
                          window_docs: list[bytes]) -> Page:
        """Seqs lo..floor-1 from below Redis (all flushed), floor..hi from the window (which
        holds every unflushed message: read-your-writes)."""
        top = min(hi, floor - 1)
        rows, tier = await self._below(
            lambda: self._flights.do(("p", tid, lo, top),
                                     functools.partial(self._load_page, tid, lo, top)),
            lambda b: b.load_messages(tid, lo, top))
        return Page(tid, last, lo, hi, [r.doc for r in rows] + window_docs, tier)

    async def _degraded_page(self, tid: str, thread: ThreadRow, mode: str, cursor: int,
                             limit: int) -> Page:
        """The page when neither Redis nor the backing has the thread: from the degraded tier."""
        assert self._degraded is not None
        lo, hi = page_range(mode, cursor, limit, thread.last_seq)
        rows = await self._degraded.load_messages(tid, lo, hi) if lo <= hi else []
        return Page(tid, thread.last_seq, lo, hi, [r.doc for r in rows], self._degraded.tier)

    async def _below(self, load: Callable[[], Awaitable[T]],
                     degraded: Callable[[Backing], Awaitable[T]]) -> tuple[T, str]:
        """A read below Redis: from the backing (which caches it again), else, while the
        backing is unavailable, from the degraded tier, read-only (never cached: it may be
        stale, and writes must not build on it)."""
        try:
            return await load(), self._backing.tier
        except Unavailable:
            if self._degraded is None:
                raise
            return await degraded(self._degraded), self._degraded.tier

    # ---- state

    async def get_state(self, key: str) -> Result:
        k = keys.state(self._shard(key), key)
        doc, deleted, expires = await redis_call(lambda: self._r.hmget(k, "doc", "del", "x"))
        tier = "redis"
        if doc is None:
            row = await self._flights.do(("s", key), lambda: self._load_state(key))
            if row is None:
                raise NotFound(f"state {key} not found")
            return Result(row.doc, self._backing.tier)
        if deleted == b"1" or (expires and _expired(int(expires))):
            raise NotFound(f"state {key} not found")
        return Result(doc, tier)

    async def _load_state(self, key: str) -> StateRow | None:
        """A live entry from below, cached again; None if absent, deleted or expired."""
        row = await self._backing.load_state(key)
        if row is None or row.deleted or _expired(row.expires_at_ms):
            return None
        await self._run("fill_state", [keys.state(self._shard(key), key)], [
            row.doc, row.version, row.expires_at_ms or "", self._s.cache.ttl_s * 1000,
            model.now_ms()])
        return row

    async def put_state(self, key: str, st: model.StateInput, if_match: str,
                        persisted: bool = False) -> Result:
        ms = model.now_ms()
        expires = ms + int(st.ttl_s * 1000) if st.ttl_s is not None else None
        return await self._state_write(key, model.state_body(key, st.value, expires, False, ms),
                                       if_match, "put", expires, persisted)

    async def delete_state(self, key: str, if_match: str, persisted: bool = False) -> Result:
        return await self._state_write(key, model.state_body(key, None, None, True,
                                                             model.now_ms()),
                                       if_match, "del", None, persisted)

    async def _state_write(self, key: str, body: bytes, if_match: str, op: str,
                           expires: int | None, persisted: bool) -> Result:
        self._admit()
        s, base = self._shard(key), ""
        for _ in range(MAX_RETRIES):
            ms = model.now_ms()
            out = await self._run("state_put", [keys.state(s, key), keys.log(s)], [
                body, if_match, base, op, ms, expires or "", ms, key])
            status = out[0].decode()
            if status == "MISS":
                row = await self._backing.load_state(key)
                base = str(row.version) if row else "0"
                continue
            if status == "NOTFOUND":
                raise NotFound(f"state {key} not found")
            if status == "PRECONDITION":
                current = out[1].decode() or None
                raise PreconditionFailed(f"state {key} is at version {current}",
                                         {"version": current})
            if persisted:
                await self._backing.persist("state", out[2])
            return Result(out[2], created=status == "CREATED")
        raise Unavailable(f"state {key}: gave up after {MAX_RETRIES} attempts")


def page_range(mode: str, cursor: int, limit: int, last: int) -> tuple[int, int]:
    """The seqs lo..hi of a page (as read_page.lua computes them); lo > hi: empty."""
    if mode == "after":
        return cursor + 1, min(last, cursor + limit)
    hi = min(cursor - 1, last) if mode == "before" else last
    return max(1, hi - limit + 1), hi


def _with_last_seq(doc: bytes, last_seq: int) -> bytes:
    return doc[:-1] + b',"last_seq":' + str(last_seq).encode() + b"}"


def _expired(expires_at_ms: int | None) -> bool:
    return expires_at_ms is not None and expires_at_ms <= model.now_ms()
