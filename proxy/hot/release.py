"""The flush acknowledgement: after a PostgreSQL commit, XACK the changes and apply the cache
policy the hot tier owns (release.lua): exact unflushed counts, the cache TTL for an entity
with nothing left unflushed, flushed messages trimmed out of the thread's window, and the load
fences of released entities deleted (a read-through that began before must not fill)."""

from __future__ import annotations

import logging
from typing import Any

from proxy import keys, metrics, model
from proxy.hot.core import Core

logger = logging.getLogger(__name__)


class Release:
    def __init__(self, core: Core) -> None:
        self._c = core

    async def __call__(self, group: str, shard: int, changes: list[model.Change]) -> None:
        """Ack `changes` (committed to the sink of `group`) and release their cached keys."""
        if not changes:
            return
        await self._c.failpoints.hit("before-release")
        key_list = [keys.log(shard)]
        index: dict[tuple[str, str], int] = {}
        s = self._c.settings
        args: list[Any] = [group, self._c.ttl_ms, s.redis.window, s.cache.recent_ids,
                           model.now_ms()]
        for c in changes:
            entity = ("s", c.entity_id) if c.kind == "s" else ("t", c.thread_id)
            if entity not in index:
                index[entity] = len(key_list) + 1  # Lua indexes KEYS from 1
                key_list += _entity_keys(shard, entity)
            args += [c.entry_id, index[entity], entity[0], c.entity_id if c.kind == "m" else ""]
        negative = int(await self._c.run("release", key_list, args))
        if negative:
            metrics.UNFLUSHED_COUNT_ERRORS.inc(negative)
            logger.error("release on shard %d: %d acknowledged entries found no unflushed "
                         "change left to count (a duplicated log entry?); counts kept at 0",
                         shard, negative)


def _entity_keys(shard: int, entity: tuple[str, str]) -> list[str]:
    """The keys release.lua takes per entity: its cache keys, then its load fence (and a
    thread's read markers: their changes, kind 'r', release the thread; then its changes
    set)."""
    kind, entity_id = entity
    if kind == "s":
        return [keys.state(shard, entity_id), keys.fence(shard, "k", entity_id)]
    return [keys.thread(shard, entity_id), keys.messages(shard, entity_id),
            keys.window(shard, entity_id), keys.recent(shard, entity_id),
            keys.overlay(shard, entity_id), keys.fence(shard, "t", entity_id),
            keys.markers(shard, entity_id), keys.changes(shard, entity_id)]
