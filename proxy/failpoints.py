"""Named failpoints for crash tests, enabled by the `debug.failpoint` setting
(TIERPROXY_DEBUG_FAILPOINT="<name>:crash|sleep|raise"), or switched at runtime by an
in-process test (`set`). Disabled, `hit` does nothing."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

logger = logging.getLogger(__name__)
NAMES = ("after-read", "before-pg-commit", "after-pg-commit-before-xack",
         "after-ch-insert-before-xack", "ch-insert")
ACTIONS = ("crash", "sleep", "raise")


class FailpointHit(RuntimeError):
    """Raised at a failpoint set to `raise` (a transient failure)."""


class Failpoints:
    def __init__(self, spec: str) -> None:
        self.set(spec)

    def set(self, spec: str) -> None:
        """Arm one failpoint ("<name>:<action>"), or none ("")."""
        name, _, action = spec.partition(":")
        if spec and (name not in NAMES or action not in ACTIONS):
            raise ValueError(f"debug.failpoint: {spec!r} is not <{'|'.join(NAMES)}>:"
                             f"<{'|'.join(ACTIONS)}>")
        self.name, self.action = name, action

    async def hit(self, name: str) -> None:
        if name != self.name:
            return
        logger.warning("failpoint %s: %s", name, self.action)
        if self.action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)  # like kill -9: no cleanup, no flush
        elif self.action == "sleep":
            await asyncio.sleep(3600)
        else:
            raise FailpointHit(f"failpoint {name}")
