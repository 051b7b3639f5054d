"""Real servers for the whole session (embedded, or external ones named by
TIERPROXY_TEST_{REDIS,POSTGRES,CLICKHOUSE}_URL), clean state per test, and app clients."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy import settings as config
from proxy.app import create_app
from proxy.backends import clickhouse
from proxy.backends.clickhouse import ClickHouseStore
from proxy.backends.postgres import apply_migrations
from proxy.embedded import PostgresServer, RedisServer, clickhouse_url
from proxy.settings import Settings
from tests.redis_topology import Cluster, SentinelSet

AppClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@dataclass
class Servers:
    redis_url: str
    postgres_url: str
    clickhouse_url: str
    redis: RedisServer | None  # None when external: fault tests that need it skip
    postgres: PostgresServer | None
    root: Path


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    # Not under pytest's 0700 temp root: PostgreSQL runs as its own user and must reach it.
    root = Path(tempfile.mkdtemp(prefix="tierproxy-test-"))
    root.chmod(0o755)
    redis_srv = pg_srv = None
    redis_url = os.environ.get("TIERPROXY_TEST_REDIS_URL", "")
    pg_url = os.environ.get("TIERPROXY_TEST_POSTGRES_URL", "")
    ch_url = os.environ.get("TIERPROXY_TEST_CLICKHOUSE_URL", "") or clickhouse_url(root / "ch")
    if not redis_url:
        redis_srv = RedisServer(root / "redis")
        redis_srv.start()
        redis_url = redis_srv.url
    if not pg_url:
        pg_srv = PostgresServer(root / "pg")
        pg_srv.start()
        pg_url = pg_srv.url
    try:
        yield Servers(redis_url, pg_url, ch_url, redis_srv, pg_srv, root)
    finally:
        if redis_srv:
            redis_srv.stop()
        if pg_srv:
            pg_srv.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """A Redis primary, its replica and three sentinels (started on first use, ~2 s)."""
    deployment = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    deployment.start()
    yield deployment
    deployment.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-primary Redis Cluster (started on first use, ~2 s)."""
    deployment = Cluster(tmp_path_factory.mktemp("cluster"))
    deployment.start()
    yield deployment
    deployment.stop()


def make_settings(servers: Servers, **sections: dict[str, Any]) -> Settings:
    """Test settings: real URLs, few shards, fast flushing and failure detection."""
    s = config.load(env={})
    base: dict[str, dict[str, Any]] = {
        "redis": {"url": servers.redis_url, "shards": 4, "socket_timeout_s": 3.0,
                  "health_check_interval_s": 1.0},
        "postgres": {"url": servers.postgres_url, "command_timeout_s": 5.0},
        "clickhouse": {"url": servers.clickhouse_url, "interval_ms": 100},
        "flush": {"max_delay_ms": 10, "claim_idle_ms": 1500, "backoff_base_ms": 20,
                  "backoff_max_ms": 300, "trim_interval_s": 0.2},
        "circuit": {"open_s": 0.3},
        "shutdown": {"deadline_s": 5.0},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    for section, values in base.items():
        s = s.replace(section, **values)
    return s


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(servers)


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    """A plain client for assertions; the database is emptied before each test."""
    client = aioredis.Redis.from_url(servers.redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis of the test's own, to kill and start again (its AOF fsynced at every write, so
    what it acknowledged comes back)."""
    server = RedisServer(tmp_path / "redis", extra_args=["--appendfsync", "always"])
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def pg(servers: Servers) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for assertions; the schema exists and the tables are empty."""
    conn = await asyncpg.connect(servers.postgres_url)
    await apply_migrations(conn)
    await conn.execute("TRUNCATE threads, messages, state_entries, write_through_events,"
                       " read_markers, write_through_leases")
    yield conn
    await conn.close()


@pytest.fixture
async def poison(pg: asyncpg.Connection) -> AsyncIterator[None]:
    """PostgreSQL rejects messages whose content is 'poison' while this fixture is active."""
    await pg.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS poison;"
                     " ALTER TABLE messages ADD CONSTRAINT poison CHECK (content <> 'poison')"
                     " NOT VALID")
    yield
    await pg.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS poison")


@pytest.fixture
async def ch(servers: Servers) -> AsyncIterator[ClickHouseStore]:
    """A store on the session's ClickHouse for assertions; the events table exists and is
    empty (chDB allows one data path per process: in-process sidecars use this one too)."""
    store = ClickHouseStore(servers.clickhouse_url)
    await store.create_schema()
    await store.command(f"TRUNCATE TABLE {clickhouse.TABLE}")
    yield store
    await store.close()


@pytest.fixture
async def client_for(redis: aioredis.Redis, pg: asyncpg.Connection,
                     aiohttp_client: Any) -> AppClient:
    """Start an app (a real sidecar in this process) on the given settings."""

    async def start(s: Settings) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(s))  # type: ignore[no-any-return]

    return start


@pytest.fixture
async def client(client_for: AppClient, settings: Settings) -> TestClient[Any, Any]:
    return await client_for(settings)


@pytest.fixture
async def pair(client_for: AppClient, settings: Settings) -> tuple[TestClient[Any, Any],
                                                                   TestClient[Any, Any]]:
    """Two sidecars on the same servers, with the module's settings."""
    return await client_for(settings), await client_for(settings)
