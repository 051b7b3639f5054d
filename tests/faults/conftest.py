"""Fixtures of the fault scenarios: sidecar subprocesses on clean Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from proxy.embedded import clickhouse_url
from tests.conftest import Servers
from tests.faults.results import Outcome, recording
from tests.sidecar import Sidecar

StartSidecar = Callable[..., Awaitable[Sidecar]]
SHARDS = 4  # what tests/sidecar.py configures


@pytest.fixture
async def sidecars(servers: Servers, redis: aioredis.Redis, pg: asyncpg.Connection,
                   tmp_path: Path) -> AsyncIterator[StartSidecar]:
    """Start sidecar subprocesses on clean Redis and PostgreSQL: `await start(name, **env)`
    (may_die: it may exit before it is ready; ready=False: do not wait until it is). Each has
    its own data and chDB directory (chDB is one process per directory); all are killed at
    teardown."""
    started: list[Sidecar] = []

    async def start(name: str, *, redis_url: str = "", postgres_url: str = "",
                    may_die: bool = False, ready: bool = True, **env: Any) -> Sidecar:
        data = tmp_path / name
        sidecar = Sidecar(data, redis_url or servers.redis_url,
                          postgres_url or servers.postgres_url, clickhouse_url(data),
                          **{k: str(v) for k, v in env.items()})
        started.append(sidecar)
        try:
            await asyncio.to_thread(sidecar.start, 30.0, ready)
        except RuntimeError:  # exited before it was ready (e.g. a failpoint crash)
            if not may_die:
                raise
        return sidecar

    yield start
    for sidecar in started:
        await asyncio.to_thread(sidecar.kill)


@pytest.fixture
def outcome(request: pytest.FixtureRequest) -> Iterator[Outcome]:
    """The scenario's figures, recorded for RELIABILITY.md's matrix when
    TIERPROXY_FAULTS_RESULTS asks for them (tests/faults/results.py)."""
    yield from recording(request)


async def metric(sidecar: Sidecar, sample: str) -> float:
    """One sample of a sidecar's Prometheus exposition, e.g. 'name{sink="pg"}' (0 if absent)."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{sidecar.metrics_port}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
