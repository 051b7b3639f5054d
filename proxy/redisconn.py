"""Redis connections, error mapping and Lua scripts: redis-py clients (from the topology
`redis.url` names) for the background work, and the auto-pipeline for the request path."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.commands.core import AsyncScript

from proxy import topology
from proxy.autopipe import unavailable_reply
from proxy.errors import Unavailable
from proxy.luascripts import scripts
from proxy.settings import Settings

T = TypeVar("T")
RedisClient = aioredis.Redis  # the client type other modules name, without importing redis



def connect(settings: Settings, url: str, max_connections: int | None = None) -> Any:
    """A redis-py client for the deployment `url` names: bounded pools with socket timeouts
    and health checks (dead TCP must not hang us), no command retries (a resent script would
    run twice)."""
    r = settings.redis
    return topology.connect(topology.parse(url), max_connections=max_connections or r.pool_size,
                            socket_timeout_s=r.socket_timeout_s,
                            health_check_interval_s=r.health_check_interval_s)


async def redis_call(make: Callable[[], Awaitable[T]]) -> T:
    """Run one Redis call; an unreachable or refusing Redis becomes `Unavailable` (503)."""
    try:
        return await make()
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
        raise Unavailable(f"redis: {e or type(e).__name__}") from e
    except rexc.ResponseError as e:
        if unavailable_reply(str(e)):
            raise Unavailable(f"redis: {e}") from e
        raise


class Scripts:
    """Every Lua script, registered once; redis-py runs them with EVALSHA and reloads a script
    after NOSCRIPT (e.g. SCRIPT FLUSH or a Redis restart)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(text) for name, text in scripts().items()}

    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        return await redis_call(lambda: script(keys=keys, args=args))
