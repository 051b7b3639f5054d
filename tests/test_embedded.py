"""The embedded servers: real redis-server and PostgreSQL processes, and the chDB DSN."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis

from proxy.embedded import (
    EmbeddedServers,
    PostgresServer,
    RedisServer,
    clickhouse_url,
    free_port,
)

REPO = Path(__file__).resolve().parents[1]

# chDB allows one data path per process, and other tests may open their own: use chDB in a
# child process so this test never pins the pytest process to its directory.
CHDB_SCRIPT = """
import sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
try:
    client.command("CREATE TABLE IF NOT EXISTS t (n UInt32) ENGINE = MergeTree ORDER BY n")
    if sys.argv[2] == "insert":
        client.insert("t", [[1], [2], [3]], column_names=["n"])
    print(client.query("SELECT count() FROM t").result_rows[0][0])
finally:
    client.close()
"""

# Starts a redis-server, prints its pid, then waits to be killed -9.
ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
from proxy.embedded import RedisServer
server = RedisServer(Path(sys.argv[1]))
server.start()
print(server.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def chdb_count(url: str, action: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHDB_SCRIPT, url, action],
                          capture_output=True, text=True, timeout=60, check=True)
    return int(done.stdout.strip().splitlines()[-1])


async def fetch_ns(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [row["n"] for row in await conn.fetch("SELECT n FROM t ORDER BY n")]
    finally:
        await conn.close()


async def create_rows(url: str, ns: list[int]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS t (n int PRIMARY KEY)")
        await conn.executemany("INSERT INTO t (n) VALUES ($1)", [(n,) for n in ns])
    finally:
        await conn.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_server(tmp_path: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path / "postgres")
    server.start()
    yield server
    server.stop(mode="immediate")


def test_free_port_can_be_bound() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_free_port_is_below_the_ephemeral_range() -> None:
    """An outgoing connection cannot take it while its server restarts."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(free_port() < low for _ in range(50))


def test_redis_answers_ping(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}


def test_redis_keeps_key_and_port_across_stop_start(redis_server: RedisServer) -> None:
    url, old_pid = redis_server.url, redis_server.pid
    with redis.Redis.from_url(url) as client:
        client.set("k", "v")
    redis_server.stop()
    assert redis_server.pid is None and old_pid is not None and not alive(old_pid)
    redis_server.start()
    assert redis_server.url == url
    with redis.Redis.from_url(url) as client:
        assert client.get("k") == b"v"


def test_redis_new_object_reuses_stored_port(redis_server: RedisServer) -> None:
    redis_server.stop()
    again = RedisServer(redis_server.data_dir)
    again.start()
    try:
        assert again.port == redis_server.port
    finally:
        again.stop()


def test_redis_kill_then_start_keeps_fsynced_key(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, extra_args=["--appendfsync", "always"])
    server.start()
    try:
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
        pid = server.pid
        server.kill()
        assert server.pid is None and pid is not None and not alive(pid)
        server.start()
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v"
    finally:
        server.stop()


def test_redis_stop_is_idempotent(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.stop()
    server.kill()
    server.start()
    server.stop()
    server.stop()
    server.kill()
    assert server.pid is None


def test_redis_start_failure_reports_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = RedisServer(tmp_path, port=busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="did not answer PING") as info:
            server.start()
    assert "Address already in use" in str(info.value)
    assert server.pid is None


def test_redis_dies_with_its_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert parent.stdout is not None
    with parent.stdout:
        redis_pid = int(parent.stdout.readline())
    assert alive(redis_pid)
    parent.kill()
    parent.wait()
    assert wait_dead(redis_pid)


async def test_postgres_accepts_connections(postgres_server: PostgresServer) -> None:
    url = postgres_server.url
    assert url == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/tierproxy"
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT current_database()") == "tierproxy"
        assert await conn.fetchval("SHOW max_connections") == "200"
        assert await conn.fetchval("SHOW fsync") == "on"
    finally:
        await conn.close()


async def test_postgres_keeps_rows_and_port_across_stop_start(
        postgres_server: PostgresServer) -> None:
    url = postgres_server.url
    await create_rows(url, [1, 2, 3])
    postgres_server.stop()
    assert postgres_server.pid is None
    postgres_server.start()
    assert postgres_server.url == url
    assert await fetch_ns(url) == [1, 2, 3]


async def test_postgres_recovers_after_immediate_stop(postgres_server: PostgresServer) -> None:
    await create_rows(postgres_server.url, [7])
    postgres_server.stop(mode="immediate")
    assert postgres_server.pid is None
    postgres_server.start()
    assert await fetch_ns(postgres_server.url) == [7]


def test_postgres_reuses_running_postmaster(postgres_server: PostgresServer) -> None:
    other = PostgresServer(postgres_server.data_dir)
    other.start()
    assert other.pid == postgres_server.pid is not None
    assert other.url == postgres_server.url


def test_postgres_stop_is_idempotent(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path / "pg")
    server.stop()
    server.start()
    pid = server.pid
    server.stop()
    server.stop(mode="immediate")
    assert server.pid is None and pid is not None and wait_dead(pid)
    with pytest.raises(ValueError, match="stop mode"):
        server.stop(mode="abrupt")


def test_clickhouse_url_is_absolute_chdb_dsn(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert clickhouse_url(Path("data")) == f"chdb://{tmp_path / 'data' / 'clickhouse'}"
    assert (tmp_path / "data" / "clickhouse").is_dir()


async def test_embedded_servers_keep_data_across_instances(tmp_path: Path) -> None:
    with EmbeddedServers(tmp_path, redis=True, postgres=True, clickhouse=True) as first:
        assert first.redis_url and first.postgres_url and first.clickhouse_url
        urls = (first.redis_url, first.postgres_url, first.clickhouse_url)
        with redis.Redis.from_url(first.redis_url) as client:
            client.set("k", "v")
        await create_rows(first.postgres_url, [1, 2])
        assert chdb_count(first.clickhouse_url, "insert") == 3
    assert first.redis and first.redis.pid is None
    assert first.postgres and first.postgres.pid is None

    with EmbeddedServers(tmp_path, redis=True, postgres=True, clickhouse=True) as second:
        assert (second.redis_url, second.postgres_url, second.clickhouse_url) == urls
        assert second.redis_url and second.postgres_url and second.clickhouse_url
        with redis.Redis.from_url(second.redis_url) as client:
            assert client.get("k") == b"v"
        assert await fetch_ns(second.postgres_url) == [1, 2]
        assert chdb_count(second.clickhouse_url, "count") == 3


def test_embedded_servers_start_only_what_is_wanted(tmp_path: Path) -> None:
    with EmbeddedServers(tmp_path, redis=True, postgres=False, clickhouse=False) as servers:
        assert servers.redis_url and servers.postgres_url is None and servers.clickhouse_url is None
        assert servers.postgres is None
    assert not (tmp_path / "postgres").exists()
