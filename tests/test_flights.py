"""proxy.flights: one load per key for concurrent misses (its result or its failure reaches
every waiter; a waiter that gives up leaves the others alone), and per-key locks."""

from __future__ import annotations

import asyncio

import pytest

from proxy.flights import KeyedLocks, SingleFlight


class Load:
    """A load that counts its calls and finishes when released."""

    def __init__(self, result: object = "row", error: Exception | None = None) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self._result = result
        self._error = error

    async def __call__(self) -> object:
        self.calls += 1
        await self.release.wait()
        if self._error is not None:
            raise self._error
        return self._result


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_misses_make_one_call() -> None:
    flights, load = SingleFlight(), Load()
    waiters = [asyncio.create_task(flights.do("k", load)) for _ in range(100)]
    await settle()
    load.release.set()
    assert await asyncio.gather(*waiters) == ["row"] * 100
    assert load.calls == 1


async def test_keys_fly_separately_and_a_finished_flight_is_not_a_cache() -> None:
    flights, a, b = SingleFlight(), Load("a"), Load("b")
    both = asyncio.gather(flights.do("a", a), flights.do("b", b))
    await settle()
    a.release.set()
    b.release.set()
    assert list(await both) == ["a", "b"]
    assert await flights.do("a", a) == "a"  # a new miss after the flight landed: a new load
    assert a.calls == 2 and b.calls == 1


async def test_a_failure_reaches_every_waiter() -> None:
    flights, load = SingleFlight(), Load(error=LookupError("postgres: no row"))
    waiters = [asyncio.create_task(flights.do("k", load)) for _ in range(10)]
    await settle()
    load.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, LookupError) and str(r) == "postgres: no row" for r in results)
    assert load.calls == 1
    retry = Load("row")
    retry.release.set()
    assert await flights.do("k", retry) == "row"  # the failure is not remembered


@pytest.mark.parametrize("cancelled", [0, 5])
async def test_a_cancelled_waiter_does_not_cancel_the_others(cancelled: int) -> None:
    """Whether it is the waiter that started the load (0) or a later one."""
    flights, load = SingleFlight(), Load()
    waiters = [asyncio.create_task(flights.do("k", load)) for _ in range(10)]
    await settle()
    waiters[cancelled].cancel()
    await settle()
    load.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert isinstance(results[cancelled], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != cancelled] == ["row"] * 9
    assert load.calls == 1


async def test_a_lock_serializes_one_key_only() -> None:
    locks, inside, most = KeyedLocks(), {"a": 0, "b": 0}, {"a": 0, "b": 0}
    b_entered = asyncio.Event()

    async def work(key: str) -> None:
        async with locks.hold(key):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            if key == "b":
                b_entered.set()
            await settle()
            inside[key] -= 1

    async def hold_a_until_b_entered() -> None:
        async with locks.hold("a"):
            inside["a"] += 1
            await asyncio.wait_for(b_entered.wait(), 5)  # b is not blocked by a
            inside["a"] -= 1

    await asyncio.gather(hold_a_until_b_entered(), *(work(k) for k in "aaaabbbb"))
    assert most == {"a": 1, "b": 1}
    assert locks._locks == {}  # dropped once nobody holds or awaits them


async def test_a_cancelled_lock_waiter_leaves_no_lock_behind() -> None:
    locks, release = KeyedLocks(), asyncio.Event()

    async def holder() -> None:
        async with locks.hold("k"):
            await release.wait()

    first = asyncio.create_task(holder())
    await settle()
    waiter = asyncio.create_task(holder())
    await settle()
    waiter.cancel()
    await settle()
    release.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert locks._locks == {}
    async with locks.hold("k"):  # still usable
        pass
