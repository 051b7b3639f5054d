"""Named failpoints at the race windows, for crash and race tests, enabled by the
`debug.failpoint` setting (TIERPROXY_DEBUG_FAILPOINT) or switched at runtime by an in-process
test (`set`). A spec is a comma-separated list of `<name>:crash`, `<name>:raise`,
`<name>:sleep` (an hour: parked) or `<name>:sleep:<seconds>` (a widened race window).
Disabled, `hit` does nothing."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
from dataclasses import dataclass

from proxy.backends import SINKS

logger = logging.getLogger(__name__)
NAMES = (
    "after-read",              # the flusher read a batch, nothing written yet
    "before-pg-commit",        # the batch is written in the open PostgreSQL transaction
    "ch-insert",               # before the ClickHouse insert
    *(s.after_write for s in SINKS),  # committed in the sink, not yet acknowledged
    "before-release",          # committed in PostgreSQL, before release.lua
    "after-load-before-fill",  # a read-through loaded a row, before its fill script
    "before-trim",             # the trim floor is computed, before XTRIM
    "before-replay-move",      # dead letters read, before they move back to the log
)
ACTIONS = ("crash", "sleep", "raise")
PARKED_S = 3600.0


class FailpointHit(RuntimeError):
    """Raised at a failpoint set to `raise` (a transient failure)."""


@dataclass(frozen=True)
class _Armed:
    action: str
    seconds: float


def parse(spec: str) -> dict[str, _Armed]:
    """The armed failpoints of a spec; ValueError naming the setting and the bad part."""
    armed: dict[str, _Armed] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, rest = part.partition(":")
        action, timed, seconds = rest.partition(":")
        if name not in NAMES or action not in ACTIONS or (timed and action != "sleep"):
            raise ValueError(f"debug.failpoint: {part!r} is not <{'|'.join(NAMES)}>:"
                             f"<{'|'.join(ACTIONS)}>[:<seconds> for sleep]")
        armed[name] = _Armed(action, _seconds(part, seconds) if timed else PARKED_S)
    return armed


def _seconds(part: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"debug.failpoint: {part!r}: sleep takes a number of seconds >= 0")
    return value


class Failpoints:
    def __init__(self, spec: str) -> None:
        self.set(spec)

    def set(self, spec: str) -> None:
        """Arm the failpoints of `spec` ("" disarms all)."""
        self._armed = parse(spec)

    async def hit(self, name: str) -> None:
        armed = self._armed.get(name)
        if armed is None:
            return
        logger.warning("failpoint %s: %s", name, armed.action)
        if armed.action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)  # like kill -9: no cleanup, no flush
        elif armed.action == "sleep":
            await asyncio.sleep(armed.seconds)
        else:
            raise FailpointHit(f"failpoint {name}")
