"""Stopping the nemesis heals the fault in effect and never leaves a sidecar down: a stop
that came while a restart was between its kill and its start left one dead for the checks
that follow (seed 1, 600 s). Pure logic: a cluster stand-in that records what was done."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from tests.faults.nemesis import Fault, Nemesis


class Recorder:
    """Kills and starts sidecars in name only; says when the healing restart has killed."""

    size = 1

    def __init__(self) -> None:
        self.running = True
        self.restarts = 0
        self.healing = asyncio.Event()

    async def restart(self, i: int, failpoints: str = "") -> None:
        self.running = False
        self.restarts += 1
        if self.restarts == 2:  # the stall's heal: killed, not started yet
            self.healing.set()
        await asyncio.sleep(0.2)  # the start
        self.running = True


async def test_a_stop_during_a_heal_lets_the_heal_finish() -> None:
    cluster = Recorder()
    stall = Fault(0.0, "stall", 0, 0.05, "before-trim:sleep:1")
    chaos = Nemesis(cast(Any, cluster), [stall], cast(Any, None), cast(Any, None),
                    cast(Any, None))
    chaos.start(time.monotonic())
    await asyncio.wait_for(cluster.healing.wait(), 5)
    await chaos.stop()
    assert cluster.running and cluster.restarts == 2
    assert chaos.events[0].ended >= chaos.events[0].healed > 0


async def test_a_stop_ends_the_fault_in_effect_early_and_starts_no_other() -> None:
    cluster = Recorder()
    faults = [Fault(0.0, "stall", 0, 60.0), Fault(0.5, "stall", 0, 60.0)]
    chaos = Nemesis(cast(Any, cluster), faults, cast(Any, None), cast(Any, None),
                    cast(Any, None))
    chaos.start(time.monotonic())
    await asyncio.sleep(0.3)  # the first stall is in effect
    await asyncio.wait_for(chaos.stop(), 5)  # not its 60 s
    assert cluster.running and cluster.restarts == 2 and len(chaos.events) == 1
