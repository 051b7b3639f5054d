"""A circuit breaker per sink: stop hammering a dependency that keeps failing."""

from __future__ import annotations

import time

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"


class Circuit:
    """Opens after `threshold` consecutive failures; after `open_s` lets one trial through
    (half-open); a success closes it, a failure opens it again."""

    def __init__(self, threshold: int, open_s: float) -> None:
        self._threshold = threshold
        self._open_s = open_s
        self._failures = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        if time.monotonic() - self._opened_at >= self._open_s:
            return HALF_OPEN
        return OPEN

    def allows(self) -> bool:
        return self.state != OPEN

    def wait_s(self) -> float:
        """Seconds until a trial is allowed (0 when it is now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._open_s - time.monotonic())

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None

    def failure(self) -> None:
        self._failures += 1
        if self._failures >= self._threshold or self._opened_at is not None:
            self._opened_at = time.monotonic()
