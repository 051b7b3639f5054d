"""Reconcile Redis's counters with PostgreSQL after Redis lost data it had acknowledged: a
restart from an AOF missing the last second, a failover to a replica that missed writes, or a
Redis that came back empty. PostgreSQL may then hold seqs and versions Redis no longer knows;
the next write would hand them out again (PostgreSQL rejects a repeated seq; an equal version
with other content is counted as a conflict). Every cached thread and state entry of every
shard is compared with PostgreSQL: clean ones are dropped (read through again), ones with
unflushed changes keep them and get their counters raised (raise_counters.lua).

After write-through (proxy.failover) PostgreSQL holds the newer copies: mode "drop" drops the
clean entities behind it and counts the unflushed ones as pending, left for their flush; read
markers it moved forward are raised in Redis to PostgreSQL's (raise_markers.lua), so Redis
never serves an older one. An entity written through counts as behind even when the counters
are equal: Redis may have handed out, unflushed, the very seq write-through gave another
message."""

from __future__ import annotations

import logging
import time
from typing import Any

from proxy import keys
from proxy.backends.postgres import PostgresStore
from proxy.redisconn import RedisClient, Scripts, redis_call

logger = logging.getLogger(__name__)
BATCH = 200  # entities compared per PostgreSQL round trip


class Reconciler:
    def __init__(self, client: RedisClient, store: PostgresStore, shards: int) -> None:
        self._r = client
        self._store = store
        self._shards = shards
        self._scripts = Scripts(client)

    async def run(self, mode: str = "raise",
                  written_through: frozenset[str] = frozenset()) -> dict[str, int]:
        """Reconcile every shard; counts of entities dropped and raised (or pending).
        `written_through` (thread ids, state keys) are behind in mode "drop" whatever their
        counters say."""
        started, totals = time.monotonic(), {"dropped": 0, "raised": 0, "markers": 0}
        for shard in range(self._shards):
            for kind in ("t", "k"):
                batch: list[str] = []
                async for key in self._r.scan_iter(match=keys.pattern(shard, kind), count=500):
                    batch.append(keys.id_in(key.decode()))
                    if len(batch) == BATCH:
                        await self._batch(shard, kind, batch, mode, totals, written_through)
                        batch = []
                await self._batch(shard, kind, batch, mode, totals, written_through)
        kept = "had counters raised" if mode == "raise" else "are left for their flush"
        logger.warning("%6.2fs reconciled redis with postgres: %d entities dropped (read "
                       "through again), %d with unflushed changes %s, %d read markers raised",
                       time.monotonic() - started, totals["dropped"], totals["raised"], kept,
                       totals["markers"])
        return totals

    async def _batch(self, shard: int, kind: str, ids: list[str], mode: str,
                     totals: dict[str, int], written_through: frozenset[str]) -> None:
        if not ids:
            return
        mids = await self._message_ids(shard, ids) if kind == "t" else []
        pg = await self._store.fetch_counters(ids if kind == "t" else [],
                                              ids if kind == "k" else [], mids)
        for entity_id in ids:
            ks, args = self._call(shard, kind, entity_id, pg)
            how = "behind" if mode == "drop" and entity_id in written_through else mode
            outcome = await self._scripts.run("raise_counters", ks, [how, *args])
            if outcome:
                totals["dropped" if outcome == 1 else "raised"] += 1
        if kind == "t":
            totals["markers"] += await self._raise_markers(shard, ids)

    async def _raise_markers(self, shard: int, tids: list[str]) -> int:
        """Raise the read markers Redis caches for these threads to PostgreSQL's."""
        cached: dict[str, list[bytes]] = {}
        for tid in tids:
            cached[tid] = await redis_call(lambda t=tid: self._r.hkeys(  # type: ignore[misc]
                keys.markers(shard, t)))
        pg = await self._store.fetch_markers([(t, u.decode()) for t, us in cached.items()
                                              for u in us])
        args: dict[str, list[Any]] = {}
        for (tid, uid), seq in pg.items():
            args.setdefault(tid, []).extend((uid, seq))
        raised = 0
        for tid, pairs in args.items():
            raised += await self._scripts.run("raise_markers", [keys.markers(shard, tid)], pairs)
        return raised

    async def _message_ids(self, shard: int, tids: list[str]) -> list[tuple[str, str]]:
        out = []
        for tid in tids:
            fields = await redis_call(lambda t=tid: self._r.hkeys(  # type: ignore[misc]
                keys.messages(shard, t)))
            out += [(tid, f.decode()[2:]) for f in fields if f.startswith(b"m|")]
        return out

    @staticmethod
    def _call(shard: int, kind: str, entity_id: str,
              pg: dict[str, Any]) -> tuple[list[str], list[Any]]:
        if kind == "k":
            return [keys.state(shard, entity_id)], [pg["state"].get(entity_id, 0), ""]
        version, last_seq, last_cseq = pg["threads"].get(entity_id, (0, 0, 0))
        args: list[Any] = [version, last_seq]
        for mid, v in pg["messages"].get(entity_id, []):
            args += [mid, v]
        args += ["", last_cseq]  # the thread's own pair: its last change number
        # The read markers, then the changes set: dropped with the thread (raise_counters.lua
        # drops all KEYS).
        return [keys.thread(shard, entity_id), keys.messages(shard, entity_id),
                keys.window(shard, entity_id), keys.recent(shard, entity_id),
                keys.overlay(shard, entity_id), keys.markers(shard, entity_id),
                keys.changes(shard, entity_id)], args
