"""Backpressure (issue 11.4): writes get 503 + Retry-After while the PostgreSQL backlog, its
age (flush.max_lag_s) or Redis's memory use (redis.max_memory_ratio) is over its bound; a
refused write changes nothing, reads go on, and writes are accepted again by themselves once
the monitor measures the load back under the bound."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from proxy.app import FAILPOINTS
from tests.conftest import AppClient, Servers, make_settings
from tests.helpers import body, wait_for

Client = TestClient[Any, Any]


class Writer:
    """Puts state entries one by one; remembers the first refused one."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.n = 0
        self.refusal: dict[str, Any] | None = None
        self.refused_key = ""

    async def refused(self) -> bool:
        self.n += 1
        key = f"bp{self.n}"
        resp = await self.client.put(f"/v1/state/{key}", json={"value": self.n})
        if resp.status != 503:
            await body(resp, 201)
            return False
        assert resp.headers["Retry-After"] == "1"
        self.refusal, self.refused_key = (await resp.json())["error"], key
        return True

    async def accepted(self) -> bool:
        return not await self.refused()


async def check_refused(w: Writer, bound: str, words: str) -> None:
    before = _refusals(bound)
    await wait_for(w.refused, timeout_s=20, interval_s=0.05)
    assert w.refusal is not None and w.refusal["code"] == "backpressure", w.refusal
    assert words in w.refusal["message"], w.refusal
    assert _refusals(bound) > before
    # The refused write changed nothing; reads go on.
    assert (await w.client.get(f"/v1/state/{w.refused_key}")).status == 404
    assert (await body(await w.client.get("/v1/state/bp1"), 200))["value"] == 1


async def test_a_full_backlog_refuses_writes_until_it_drains(client_for: AppClient,
                                                              servers: Servers) -> None:
    client = await client_for(make_settings(servers, flush={"max_backlog": 5},
                                            debug={"failpoint": "after-read:sleep:2"}))
    w = Writer(client)
    await check_refused(w, "backlog", "flush.max_backlog")
    assert (REGISTRY.get_sample_value("tierproxy_backlog_entries", {"sink": "pg"}) or 0) >= 5
    client.server.app[FAILPOINTS].set("")
    await wait_for(w.accepted, timeout_s=20, interval_s=0.1)


async def test_an_old_backlog_refuses_writes_until_it_is_flushed(client_for: AppClient,
                                                                 servers: Servers) -> None:
    client = await client_for(make_settings(servers, flush={"max_lag_s": 0.5},
                                            debug={"failpoint": "after-read:sleep:2"}))
    w = Writer(client)
    await check_refused(w, "lag", "flush.max_lag_s")
    assert (REGISTRY.get_sample_value("tierproxy_lag_seconds", {"sink": "pg"}) or 0) > 0.5
    client.server.app[FAILPOINTS].set("")
    await wait_for(w.accepted, timeout_s=20, interval_s=0.1)


async def test_a_full_redis_refuses_writes_until_it_has_room(
        client_for: AppClient, servers: Servers, redis: aioredis.Redis) -> None:
    """maxmemory set to 1.5 x what Redis uses: 67% > a bound of 50% (and far from Redis's own
    OOM refusals); maxmemory 0 again lifts it."""
    client = await client_for(make_settings(servers, redis={"max_memory_ratio": 0.5}))
    w = Writer(client)
    assert await w.accepted()
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", int(used * 1.5))
    try:
        await check_refused(w, "memory", "redis.max_memory_ratio")
        assert (REGISTRY.get_sample_value("tierproxy_redis_memory_ratio") or 0) > 0.5
    finally:
        await redis.config_set("maxmemory", 0)
    await wait_for(w.accepted, timeout_s=20, interval_s=0.1)
    assert REGISTRY.get_sample_value("tierproxy_redis_memory_ratio") == 0


@pytest.mark.parametrize("bound", ["backlog", "lag", "memory"])
def test_every_bound_is_counted_from_zero(bound: str) -> None:
    assert _refusals(bound) >= 0


def _refusals(bound: str) -> float:
    value = REGISTRY.get_sample_value("tierproxy_backpressure_refusals_total", {"bound": bound})
    assert value is not None, f"no series for bound {bound}"
    return value
