"""proxy.backoff, pure: full jitter under a cap that doubles per failure and saturates at
max_s, reset after a success, and the 1st / 10th / every-100th log rule."""

from __future__ import annotations

import pytest

from proxy.backoff import Backoff

SAMPLES = 400


def spread(b: Backoff) -> tuple[float, float]:
    """The smallest and largest of many delays at the current attempt."""
    delays = [b.delay_s() for _ in range(SAMPLES)]
    return min(delays), max(delays)


@pytest.mark.parametrize("attempt,cap", [(0, 0.1), (1, 0.2), (2, 0.4), (4, 1.6), (5, 2.0),
                                         (6, 2.0), (40, 2.0), (10_000, 2.0)])
def test_full_jitter_under_a_doubling_cap(attempt: int, cap: float) -> None:
    b = Backoff(0.1, 2.0)
    for _ in range(attempt):
        b.failed()
    assert b.attempt == attempt
    low, high = spread(b)
    # Uniform in 0..cap: never above it, and it really spreads over it (400 draws all in one
    # half has a probability of 2**-399).
    assert 0 <= low < cap / 2 < high <= cap


def test_failed_counts_and_returns_a_delay_under_the_new_cap() -> None:
    b = Backoff(1.0, 1000.0)
    delays = [b.failed() for _ in range(6)]
    assert b.attempt == 6
    assert all(0 <= d <= 2**n for n, d in enumerate(delays, start=1))


def test_reset_starts_again_from_base() -> None:
    b = Backoff(0.1, 2.0)
    for _ in range(50):
        b.failed()
    b.reset()
    assert b.attempt == 0
    assert spread(b)[1] <= 0.1
    assert b.failed() <= 0.2 and b.attempt == 1


def test_a_cap_at_base_stays_at_base() -> None:
    b = Backoff(0.5, 0.5)
    for _ in range(3):
        assert b.failed() <= 0.5


def test_log_rule_first_tenth_then_every_hundredth() -> None:
    b = Backoff(0.1, 1.0)
    assert not b.should_log  # no failure yet
    logged: list[int] = []
    for _ in range(1000):
        b.failed()
        if b.should_log:
            logged.append(b.attempt)
    assert logged == [1, 10, *range(100, 1001, 100)]
    b.reset()
    assert not b.should_log
    b.failed()
    assert b.should_log  # the first failure of a new outage is logged again
