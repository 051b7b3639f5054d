"""The Redis connection, error mapping and Lua scripts shared by the hot tier and the log."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.commands.core import AsyncScript

from proxy.errors import Unavailable
from proxy.settings import Settings

T = TypeVar("T")
RedisClient = aioredis.Redis  # the client type other modules name, without importing redis
SCRIPTS = Path(__file__).parent / "scripts"
# Replies that mean Redis cannot take the command now (not that the command is wrong): a 503
# on the request path, a retry with backoff in the background. Inside a script's error (Redis
# 6.2 wraps them: "Error running script ...: -NOREPLICAS ...") they follow a dash.
_UNAVAILABLE = re.compile(r"(?:^|-)(MISCONF|OOM|READONLY|LOADING|MASTERDOWN|NOGROUP|NOREPLICAS"
                          r"|BUSY|CLUSTERDOWN|TRYAGAIN|NOTREADY)\b")


def connect(settings: Settings, url: str, max_connections: int | None = None) -> aioredis.Redis:
    """A bounded pool with socket timeouts and health checks (dead TCP must not hang us)."""
    r = settings.redis
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections or r.pool_size, timeout=r.socket_timeout_s,
        socket_timeout=r.socket_timeout_s, socket_connect_timeout=r.socket_timeout_s,
        health_check_interval=r.health_check_interval_s)
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


async def redis_call(make: Callable[[], Awaitable[T]]) -> T:
    """Run one Redis call; an unreachable or refusing Redis becomes `Unavailable` (503)."""
    try:
        return await make()
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
        raise Unavailable(f"redis: {e or type(e).__name__}") from e
    except rexc.ResponseError as e:
        if _UNAVAILABLE.search(str(e)):
            raise Unavailable(f"redis: {e}") from e
        raise


class Scripts:
    """Every Lua script, registered once; redis-py runs them with EVALSHA and reloads a script
    after NOSCRIPT (e.g. SCRIPT FLUSH or a Redis restart)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {
            p.stem: client.register_script(p.read_text()) for p in SCRIPTS.glob("*.lua")}

    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        return await redis_call(lambda: script(keys=keys, args=args))
