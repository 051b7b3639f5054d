"""One retry pace for every loop that waits on a dependency: exponential backoff with full
jitter (no synchronized retry storms across sidecars), and a log rule that says something at
the first, the tenth and then every hundredth attempt (bounded log rate in long outages)."""

from __future__ import annotations

import random


class Backoff:
    """Counts consecutive failures; `delay_s()` is the next sleep (uniform in 0..cap, the cap
    doubling per attempt from base_s up to max_s). `reset()` after a success."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self._base_s = base_s
        self._max_s = max_s
        self.attempt = 0

    def failed(self) -> float:
        """Count one more failure; the seconds to wait before the next attempt."""
        self.attempt += 1
        return self.delay_s()

    def delay_s(self) -> float:
        cap = min(self._max_s, self._base_s * 2 ** min(self.attempt, 30))
        return random.uniform(0, cap)

    def reset(self) -> None:
        self.attempt = 0

    @property
    def should_log(self) -> bool:
        """Log this attempt? The 1st, the 10th, then every 100th."""
        return self.attempt in (1, 10) or (self.attempt > 0 and self.attempt % 100 == 0)
