"""When a call is sent again, and how long the client waits in between.

What is safe to repeat:

- A call the server surely did not process is always repeated: the connection was refused,
  or the server answered 429 / 503 `backpressure` (it refuses those before doing anything).
- An *idempotent* call is also repeated after a cut connection, a timeout or another 503:
  GET, PUT, DELETE, an append carrying a `message_id` (the client generates one by default:
  the server answers a repeat with the original message), and a PATCH with If-Match (a
  repeat is either applied once or answered 412 — raised with `ambiguous=True`, since that
  412 may be caused by our own first attempt).
- Anything else (a PATCH without If-Match, the dead-letter replay) is not repeated once it
  may have reached the server: a second edit would be a second version and event.

Waits are exponential with full jitter (uniform in [0, min(cap, base·2^n)]) and never
shorter than the server's Retry-After; attempts and the total time are both bounded.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from proxy.client.errors import Backpressure, ClientError, TransportError, Unavailable

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`attempts`: sends per call at most (1 = never repeat); `total_s`: no attempt starts
    later than this after the first; `base_s`/`cap_s`: the backoff's scale and ceiling."""

    attempts: int = 4
    total_s: float = 20.0
    base_s: float = 0.05
    cap_s: float = 2.0

    def backoff_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """The wait after failed attempt number `attempt` (1-based)."""
        jitter = random.uniform(0.0, min(self.cap_s, self.base_s * 2 ** attempt))
        return max(jitter, retry_after_s or 0.0)

    async def run(self, send: Callable[[], Awaitable[T]], *, idempotent: bool,
                  write: bool) -> T:
        """Call `send` until it succeeds or a failure may not (or need not) be repeated.
        The error raised carries how many attempts were made and whether one of them may
        have applied this write."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.total_s
        attempt, ambiguous = 0, False
        while True:
            attempt += 1
            try:
                return await send()
            except ClientError as e:
                ambiguous = ambiguous or (write and maybe_applied(e))
                e.attempts, e.ambiguous = attempt, ambiguous
                delay = self.backoff_s(attempt, getattr(e, "retry_after_s", None))
                if (not repeatable(e, idempotent) or attempt >= self.attempts
                        or loop.time() + delay > give_up_at):
                    raise
            await asyncio.sleep(delay)


NO_RETRY = RetryPolicy(attempts=1)


def maybe_applied(e: ClientError) -> bool:
    """Whether the failed attempt may have changed something on the server. A 503 other
    than backpressure may come after the write was stored (X-Durability: persisted while
    PostgreSQL is down, or the server's request timeout)."""
    if isinstance(e, TransportError):
        return e.sent
    return isinstance(e, Unavailable) and not isinstance(e, Backpressure)


def repeatable(e: ClientError, idempotent: bool) -> bool:
    if isinstance(e, Backpressure) or (isinstance(e, TransportError) and not e.sent):
        return True
    return idempotent and isinstance(e, TransportError | Unavailable)
