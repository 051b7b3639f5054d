"""proxy.circuit, on a controlled clock: closed until `threshold` consecutive failures, open
for `open_s`, then half-open (one trial); a success closes it, a failed trial reopens it."""

from __future__ import annotations

import pytest

from proxy import circuit
from proxy.circuit import CLOSED, HALF_OPEN, OPEN, Circuit


class Clock:
    """Stands in for the `time` module inside proxy.circuit only."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(circuit, "time", c)
    return c


def failing(threshold: int = 3, open_s: float = 10.0, failures: int = 3) -> Circuit:
    c = Circuit(threshold, open_s)
    for _ in range(failures):
        c.failure()
    return c


def test_closed_until_the_threshold(clock: Clock) -> None:
    c = failing(failures=2)
    assert c.state == CLOSED and c.allows() and c.wait_s() == 0.0
    c.failure()
    assert c.state == OPEN and not c.allows()
    assert c.wait_s() == 10.0


def test_a_success_resets_the_count(clock: Clock) -> None:
    c = failing(failures=2)
    c.success()
    c.failure()
    c.failure()
    assert c.state == CLOSED


def test_half_open_after_open_s(clock: Clock) -> None:
    c = failing()
    clock.now += 9.5
    assert c.state == OPEN and c.wait_s() == pytest.approx(0.5)
    clock.now += 0.5
    assert c.state == HALF_OPEN and c.allows() and c.wait_s() == 0.0


def test_a_success_in_half_open_closes(clock: Clock) -> None:
    c = failing()
    clock.now += 10
    c.success()
    assert c.state == CLOSED
    c.failure()
    assert c.state == CLOSED  # the count starts again from zero


def test_a_failure_in_half_open_reopens_for_open_s(clock: Clock) -> None:
    c = failing()
    clock.now += 60
    assert c.state == HALF_OPEN
    c.failure()  # one failed trial is enough, whatever the threshold
    assert c.state == OPEN and c.wait_s() == 10.0
    clock.now += 10
    assert c.state == HALF_OPEN


def test_failures_while_open_keep_it_open(clock: Clock) -> None:
    c = failing()
    clock.now += 5
    c.failure()  # e.g. a read-through that failed while the flusher waits
    clock.now += 6
    assert c.state == OPEN


def test_a_threshold_of_one_opens_at_the_first_failure(clock: Clock) -> None:
    assert failing(threshold=1, failures=1).state == OPEN
