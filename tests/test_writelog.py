"""The write-behind log on real Redis (ARCHITECTURE invariant 3): entries are trimmed only
after every configured consumer group acknowledged them, groups are created together, and
removing dead consumers never orphans an entry a consumer just read."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from proxy import keys
from proxy.backends import GROUPS
from proxy.failpoints import Failpoints
from proxy.writelog import WriteLog

STREAM = keys.log(0)


def log_on(redis: aioredis.Redis) -> WriteLog:
    return WriteLog(redis, 1, GROUPS, Failpoints(""), 3.0)


async def add(redis: aioredis.Redis, n: int) -> None:
    for i in range(n):
        await redis.xadd(STREAM, {"k": "s", "id": f"k{i}", "v": "1", "e": "state.updated",
                                  "ts": "0", "d": "{}"})


async def test_no_trim_while_a_configured_group_is_missing(redis: aioredis.Redis) -> None:
    # Only the first group exists (a sidecar killed between creating the two, or an operator
    # deleted one): everything it acknowledged must stay for the other.
    await redis.xgroup_create(STREAM, GROUPS[0], id="0", mkstream=True)
    await add(redis, 5)
    read = await redis.xreadgroup(GROUPS[0], "c1", {STREAM: ">"})
    await redis.xack(STREAM, GROUPS[0], *[i for i, _ in read[0][1]])
    log = log_on(redis)
    await log.trim(0)
    assert await redis.xlen(STREAM) == 5
    late = await redis.xreadgroup(GROUPS[1], "c2", {STREAM: ">"})  # created at 0 by the trim
    assert len(late[0][1]) == 5
    await redis.xack(STREAM, GROUPS[1], *[i for i, _ in late[0][1]])
    await log.trim(0)  # now every group has them
    assert await redis.xlen(STREAM) == 0


async def test_groups_are_created_together_at_the_first_entry(redis: aioredis.Redis) -> None:
    await add(redis, 3)  # a stream with entries and no group (cold start)
    await log_on(redis).ensure_groups()
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups(STREAM)}
    assert sorted(groups) == sorted(GROUPS)
    assert all(g["last-delivered-id"] == b"0-0" for g in groups.values())


async def test_removing_dead_consumers_never_orphans_a_fresh_read(
        redis: aioredis.Redis) -> None:
    log = log_on(redis)
    await log.ensure_groups()
    group = GROUPS[0]
    await add(redis, 1)
    zombie_read: list[Any] = []

    async def zombie_reads() -> None:  # a stalled consumer wakes up and reads
        zombie_read.append(await redis.xreadgroup(group, "zombie", {STREAM: ">"}))

    # The zombie exists, idle, with nothing pending.
    await redis.xgroup_createconsumer(STREAM, group, "zombie")
    real = redis.xinfo_consumers

    async def interleaved(*args: Any, **kwargs: Any) -> Any:
        listed = await real(*args, **kwargs)
        if not zombie_read:  # it reads right after the removal looked at the consumers
            await zombie_reads()
        return listed

    redis.xinfo_consumers = interleaved  # type: ignore[method-assign]
    try:
        await log.remove_dead_consumers(0, group, "me", idle_ms=-1)
    finally:
        redis.xinfo_consumers = real  # type: ignore[method-assign]
    if not zombie_read:  # the removal did not look in two steps: the zombie reads after it
        await zombie_reads()
    pending = await redis.xpending_range(STREAM, group, "-", "+", 10)
    assert [(p["consumer"], p["times_delivered"]) for p in pending] == [(b"zombie", 1)]
