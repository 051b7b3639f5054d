"""proxy.failpoints: specs (lists, durations, parked sleeps), bad specs refused naming the
setting, and what each action does when hit."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.backends import SINKS
from proxy.failpoints import NAMES, PARKED_S, FailpointHit, Failpoints, parse

ROOT = Path(__file__).resolve().parent.parent


def test_an_empty_spec_arms_nothing() -> None:
    assert parse("") == {}
    assert parse(" , ,") == {}


def test_a_list_of_failpoints() -> None:
    armed = parse("after-read:crash, before-trim:sleep:0.25 ,ch-insert:raise,before-release:sleep")
    assert {n: (a.action, a.seconds) for n, a in armed.items()} == {
        "after-read": ("crash", PARKED_S), "before-trim": ("sleep", 0.25),
        "ch-insert": ("raise", PARKED_S), "before-release": ("sleep", PARKED_S)}
    assert parse("after-read:sleep:0")["after-read"].seconds == 0.0


def test_every_sink_has_an_after_write_failpoint() -> None:
    for sink in SINKS:
        assert sink.after_write in NAMES
        assert parse(f"{sink.after_write}:raise")[sink.after_write].action == "raise"


@pytest.mark.parametrize("spec", [
    "nope:crash", "after-read", "after-read:", "after-read:explode", "after-read:crash:1",
    "after-read:raise:0.1", "after-read:sleep:abc", "after-read:sleep:-1", "after-read:sleep:nan",
    "after-read:sleep:inf", "after-read:sleep:1:2", "after-read:raise,before-trim:bogus",
    ":crash",
    # An empty duration (say `sleep:$DELAY` with DELAY unset) is a mistake, not a parked sleep.
    "after-read:sleep:", "after-read:raise:",
])
def test_a_bad_spec_is_refused_naming_the_setting(spec: str) -> None:
    with pytest.raises(ValueError, match=r"^debug\.failpoint: ") as caught:
        parse(spec)
    with pytest.raises(ValueError, match=r"^debug\.failpoint: "):
        Failpoints(spec)
    bad = spec.split(",")[-1]
    assert repr(bad) in str(caught.value)  # names the bad part


async def test_a_disarmed_or_other_failpoint_does_nothing() -> None:
    fp = Failpoints("before-trim:raise")
    await fp.hit("after-read")
    fp.set("")
    await fp.hit("before-trim")


async def test_raise_raises_failpoint_hit() -> None:
    fp = Failpoints("after-read:raise")
    with pytest.raises(FailpointHit, match="after-read"):
        await fp.hit("after-read")
    assert issubclass(FailpointHit, RuntimeError)


async def test_sleep_sleeps_about_that_long() -> None:
    fp = Failpoints("after-read:sleep:0.05")
    started = time.monotonic()
    await fp.hit("after-read")
    assert time.monotonic() - started >= 0.045  # a lower bound only


async def test_a_parked_sleep_holds_until_cancelled() -> None:
    fp = Failpoints("after-read:sleep")
    task = asyncio.create_task(fp.hit("after-read"))
    await asyncio.sleep(0.01)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_set_switches_at_runtime() -> None:
    fp = Failpoints("")
    fp.set("before-release:raise")
    with pytest.raises(FailpointHit):
        await fp.hit("before-release")
    with pytest.raises(ValueError, match="debug.failpoint"):
        fp.set("before-release:later")


def test_crash_is_a_kill_9() -> None:
    code = ("import asyncio; from proxy.failpoints import Failpoints;"
            "asyncio.run(Failpoints('after-read:crash').hit('after-read')); print('survived')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr)
    assert "survived" not in done.stdout
