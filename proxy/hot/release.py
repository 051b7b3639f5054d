"""The flush acknowledgement: after a PostgreSQL commit, XACK the changes and apply the cache
policy the hot tier owns (release.lua): exact unflushed counts, the cache TTL for an entity
with nothing left unflushed, and flushed messages trimmed out of the thread's window."""

from __future__ import annotations

from typing import Any

from proxy import keys, model
from proxy.hot.core import Core


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
        args: list[Any] = [group, self._c.ttl_ms, self._c.settings.redis.window, model.now_ms()]
        for c in changes:
            entity = ("s", c.entity_id) if c.kind == "s" else ("t", c.thread_id)
            if entity not in index:
                index[entity] = len(key_list) + 1  # Lua indexes KEYS from 1
                key_list += _entity_keys(shard, entity)
            args += [c.entry_id, index[entity], entity[0], c.entity_id if c.kind == "m" else ""]
        await self._c.run("release", key_list, args)


def _entity_keys(shard: int, entity: tuple[str, str]) -> list[str]:
    kind, entity_id = entity
    if kind == "s":
        return [keys.state(shard, entity_id)]
    return [keys.thread(shard, entity_id), keys.messages(shard, entity_id),
            keys.window(shard, entity_id)]
