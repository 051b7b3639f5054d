"""What each fault scenario measured, for RELIABILITY.md's fault matrix (`make faults` runs the
suite, then tests/faults/report.py renders the matrix from these records).

A scenario test takes the `outcome` fixture and fills it with the figures its checks compute
anyway (writes acknowledged, lost, duplicated, regressed, how long recovery took). At teardown
the fixture appends it as one JSON line to the file TIERPROXY_FAULTS_RESULTS names, with whether
the test passed, so a failing scenario still leaves its figures. Unset (as in `make test`),
nothing is written. A test that named no scenario (it skipped first) records nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

ENV = "TIERPROXY_FAULTS_RESULTS"


@dataclass
class Outcome:
    """One scenario's figures. None: the scenario does not check (or count) that figure."""

    test: str  # the pytest node id
    scenario: str = ""  # what was done, in words
    faults_md: int | None = None  # the FAULTS.md scenario it implements, where one applies
    recovery: str = ""  # what recovery_s measures: from which event to which
    acknowledged: int = 0  # writes answered 2xx
    refused: int | None = None  # writes answered 5xx (503: down, backpressure) or never sent
    unknown: int | None = None  # writes with no answer (timeout, reset): may have landed
    lost: int | None = None  # acknowledged writes missing (or below their version) at the end
    duplicated: int | None = None  # a write applied more than once (a seq or version twice)
    regressed: int | None = None  # an older version stored or served after a newer one
    problems: int = 0  # every problem the checks reported, the three above included
    recovery_s: float | None = None
    notes: str = ""
    passed: bool = False  # set at teardown: the test passed
    finished: str = ""  # set at teardown: UTC, ISO 8601

    def describe(self, scenario: str, *, faults_md: int | None, recovery: str) -> None:
        """Name the scenario (once past any skip): from then on the test is recorded."""
        self.scenario, self.faults_md, self.recovery = scenario, faults_md, recovery

    def recovered(self, since: float, until: float) -> None:
        """recovery_s from two time.monotonic() readings."""
        self.recovery_s = round(until - since, 3)


def recording(request: pytest.FixtureRequest) -> Iterator[Outcome]:
    """The body of the `outcome` fixtures (tests/faults/conftest.py, tests/test_topology_app.py).

    Whether the test passed is read from the session's failure count: by a function-scoped
    fixture's teardown, pytest has already reported the test's call phase (a fixture has no
    other view of its test's result without a report hook, and a hook in tests/faults/
    conftest.py would not see tests/test_topology_app.py)."""
    outcome = Outcome(request.node.nodeid)
    failed_before = request.session.testsfailed
    yield outcome
    path = os.environ.get(ENV)
    if path and outcome.scenario:
        outcome.passed = request.session.testsfailed == failed_before
        outcome.finished = datetime.now(UTC).isoformat(timespec="seconds")
        write(Path(path), outcome)


def write(path: Path, outcome: Outcome) -> None:
    """Append one record (one JSON object per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(orjson.dumps(dataclasses.asdict(outcome)) + b"\n")
