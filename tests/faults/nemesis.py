"""The nemesis: a fault schedule drawn from the run's seed, and its execution against the
cluster, recording when each fault was in effect (for the checker's allowances and health
checks).

Faults come in three classes that run side by side; within a class they take turns, so at
most one sidecar is impaired at a time, PostgreSQL is stopped or poisoned (not both), and
Redis restarts on its own clock:

- sidecar: `kill` (kill -9, restarted on the same data dir after a while), `pause` (SIGSTOP
  past the claim idle time, then SIGCONT: a zombie flusher), `stall` (restarted with
  failpoints that widen race windows, e.g. `after-load-before-fill:sleep:2.5`, then
  restarted without);
- postgres: `pg-stop` (fast or immediate, then started), `poison` (a temporary CHECK
  constraint makes some writes' rows fail until dead-lettered; then it is dropped and the dead
  letters are replayed on two sidecars at once);
- redis: `redis-restart` (kill -9 or SIGTERM, then started from its AOF); with write-through
  on, its outages last long enough for every sidecar to switch to PostgreSQL and back.

A schedule starts with every kind of its class once, in a random order (so even the short run
meets them all), then draws kinds at random until the duration is used up. The schedule is a
pure function of (seed, duration): the same seed replays the same faults at the same offsets
(and a longer run of it begins with the faults of a shorter one).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import asyncpg

from tests.faults.cluster import Cluster
from tests.faults.health import MIN_POISON_ACKS, Prober
from tests.faults.workload import POISON, Caller, Knowledge, Op

CLASSES: dict[str, tuple[str, ...]] = {
    "sidecar": ("kill", "pause", "stall"),
    "postgres": ("pg-stop", "poison"),
    "redis": ("redis-restart",),
}
# Seconds in effect (a range to draw from) and the overhead around it (restarts), per kind.
DURATION_S = {"kill": (0.5, 2.0), "pause": (2.0, 4.0), "stall": (5.0, 9.0),
              "pg-stop": (1.5, 6.0), "poison": (3.0, 5.0), "redis-restart": (0.5, 2.0)}
WRITE_THROUGH_DURATION_S = {"redis-restart": (2.0, 8.0)}  # switch-over < 5 s, measured 0.4
GAP_S = {"sidecar": (1.0, 3.0), "postgres": (2.0, 6.0), "redis": (5.0, 12.0)}  # between faults
OVERHEAD_S = {"kill": 1.5, "pause": 0.0, "stall": 3.0, "pg-stop": 2.0, "poison": 3.0,
              "redis-restart": 0.5}
RANDOM_WEIGHT = {"stall": 2}  # after the first round: stalls widen the most races
STALLS = ("", "before-release:sleep:2", "before-trim:sleep:1.5")
POISON_CONSTRAINTS = (
    ("messages", f"content NOT LIKE '%{POISON}%'"),
    ("state_entries", f"value::text NOT LIKE '%{POISON}%'"),
)
VISIBLE_WITHIN_S = 15.0  # dead letters must show in /v1/status this soon after poison acks


@dataclass(frozen=True)
class Fault:
    at_s: float  # offset from the start of the run
    kind: str
    target: int  # the sidecar, or -1
    duration_s: float
    detail: str = ""  # stall: the failpoints; pg-stop: the mode; redis-restart: kill|term

    def __str__(self) -> str:
        target = f" s{self.target}" if self.target >= 0 else ""
        return (f"{self.at_s:6.2f}s {self.kind}{target} for {self.duration_s:.1f}s"
                f"{' ' + self.detail if self.detail else ''}")


def schedule(seed: int, duration_s: float, sidecars: int, *,
             write_through: bool = False) -> list[Fault]:
    """Each class draws from its own generator, so a longer run of the same seed starts with
    the same faults as a shorter one."""
    durations = {**DURATION_S, **(WRITE_THROUGH_DURATION_S if write_through else {})}
    faults: list[Fault] = []
    for cls in sorted(CLASSES):
        rng = random.Random(f"nemesis:{seed}:{cls}")
        faults += _class_schedule(rng, cls, duration_s, sidecars, durations)
    return sorted(faults, key=lambda f: f.at_s)


def _class_schedule(rng: random.Random, cls: str, duration_s: float, sidecars: int,
                    durations: dict[str, tuple[float, float]]) -> list[Fault]:
    kinds = CLASSES[cls]
    out, first_round = [], rng.sample(kinds, len(kinds))
    t = rng.uniform(0.5, 2.0)
    while True:
        kind = first_round.pop(0) if first_round else rng.choices(
            kinds, [RANDOM_WEIGHT.get(k, 1) for k in kinds])[0]
        fault = _draw(rng, kind, t, sidecars, durations[kind])
        t += fault.duration_s + OVERHEAD_S[kind]
        if t > duration_s:
            return out
        out.append(fault)
        t += rng.uniform(*GAP_S[cls])


def _draw(rng: random.Random, kind: str, at_s: float, sidecars: int,
          durations: tuple[float, float]) -> Fault:
    duration = round(rng.uniform(*durations), 1)
    target = rng.randrange(sidecars) if kind in CLASSES["sidecar"] else -1
    detail = ""
    if kind == "stall":
        extra = rng.choice(STALLS)
        detail = f"after-load-before-fill:sleep:{rng.uniform(3.0, 3.8):.1f}"
        detail += f",{extra}" if extra else ""
    elif kind == "pg-stop":
        detail = rng.choice(["fast", "immediate"])
    elif kind == "redis-restart":
        detail = rng.choice(["kill", "term"])
    return Fault(round(at_s, 2), kind, target, duration, detail)


@dataclass
class FaultEvent:
    """When a fault ran (monotonic): `active`..`healed` is when it was surely in effect."""

    fault: Fault
    began: float
    active: float = 0.0
    healed: float = 0.0
    ended: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        target = f" s{self.fault.target}" if self.fault.target >= 0 else ""
        return (f"{self.fault.kind}{target} [{self.began:.2f} active {self.active:.2f}-"
                f"{self.healed:.2f}, done {self.ended:.2f}]{notes}")


class Nemesis:
    """Runs a schedule against the cluster; stop() heals whatever is in effect."""

    def __init__(self, cluster: Cluster, faults: list[Fault], know: Knowledge,
                 prober: Prober, caller: Caller) -> None:
        self._c = cluster
        self._faults = faults
        self._know = know
        self._prober = prober
        self._caller = caller
        self.events: list[FaultEvent] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def start(self, t0: float) -> None:
        for cls, kinds in CLASSES.items():
            mine = [f for f in self._faults if f.kind in kinds]
            self._tasks.append(asyncio.create_task(self._run_class(t0, mine),
                                                   name=f"nemesis-{cls}"))

    async def stop(self) -> None:
        """End the run: the fault in effect ends early and heals; no other starts. Never a
        cancel: one that lands in a heal (a restart between its kill and its start) would leave
        a sidecar dead for the checks that follow (seed 1 did, 600 s)."""
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _wait(self, seconds: float) -> None:
        """Sleep, ending early once the run stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))

    async def _run_class(self, t0: float, faults: list[Fault]) -> None:
        for fault in faults:
            await self._wait(t0 + fault.at_s - time.monotonic())  # the schedule
            if self._stopping.is_set():
                return
            event = FaultEvent(fault, time.monotonic())
            self.events.append(event)
            try:
                await getattr(self, "_" + fault.kind.replace("-", "_"))(fault, event)
            finally:
                event.ended = time.monotonic()

    async def _kill(self, f: Fault, ev: FaultEvent) -> None:
        try:
            await self._c.kill(f.target)
            ev.active = time.monotonic()
            await self._wait(f.duration_s)  # the fault's duration
        finally:
            ev.healed = time.monotonic()
            await self._c.restart(f.target)

    async def _pause(self, f: Fault, ev: FaultEvent) -> None:
        try:
            self._c.pause(f.target)
            ev.active = time.monotonic()
            await self._wait(f.duration_s)
        finally:
            ev.healed = time.monotonic()
            self._c.resume(f.target)

    async def _stall(self, f: Fault, ev: FaultEvent) -> None:
        try:
            await self._c.restart(f.target, f.detail)
            ev.active = time.monotonic()
            await self._wait(f.duration_s)
        finally:
            ev.healed = time.monotonic()
            await self._c.restart(f.target)

    async def _pg_stop(self, f: Fault, ev: FaultEvent) -> None:
        try:
            await asyncio.to_thread(self._c.postgres.stop, f.detail)
            ev.active = time.monotonic()
            await self._wait(f.duration_s)
        finally:
            ev.healed = time.monotonic()
            await asyncio.to_thread(self._c.postgres.start)

    async def _redis_restart(self, f: Fault, ev: FaultEvent) -> None:
        try:
            # From this (the main) thread: redis-server dies with the thread that started it.
            if f.detail == "kill":
                self._c.redis.kill()
            else:
                self._c.redis.stop()
            ev.active = time.monotonic()
            await self._wait(f.duration_s)
        finally:
            ev.healed = time.monotonic()
            self._c.redis.start()

    async def _poison(self, f: Fault, ev: FaultEvent) -> None:
        try:
            await poison_constraints(self._c.postgres_url, add=True)
            self._know.poison = True
            ev.active = time.monotonic()
            await self._wait(f.duration_s)
            self._know.poison = False
            await self._await_dead_letters(ev)
        finally:
            self._know.poison = False
            ev.healed = time.monotonic()
            await poison_constraints(self._c.postgres_url, add=False)
        await self.replay_race()

    async def _await_dead_letters(self, ev: FaultEvent) -> None:
        """Give the poison writes time to be dead-lettered while the constraint holds (the
        checker asks that /v1/status showed it)."""
        acked = sum(1 for o in self._caller.history if o.ok and o.started >= ev.active
                    and o.poison)
        ev.notes.append(f"{acked} poison writes acked")
        if acked < MIN_POISON_ACKS:
            return
        deadline = time.monotonic() + VISIBLE_WITHIN_S
        while time.monotonic() < deadline:
            if any(p.dead_letters for p in self._prober.probes[-12:] if p.started > ev.active):
                ev.notes.append("dead letters visible")
                return
            await asyncio.sleep(0.2)

    async def replay_race(self) -> list[Op]:
        """POST the dead-letter replay to two running sidecars at once."""
        up = [i for i in range(self._c.size) if self._c.running(i)][:2]
        ops = [Op(-1, "replay", i, "", "", "POST", "/v1/admin/dead-letters/replay")
               for i in up]
        return list(await asyncio.gather(*(self._caller.send(o) for o in ops)))


async def poison_constraints(pg_url: str, *, add: bool) -> None:
    """Add (or drop) the CHECK constraints that reject rows holding POISON. NOT VALID: rows
    already there are left alone, new and updated ones are checked."""
    conn = await asyncpg.connect(pg_url, timeout=10, command_timeout=30)
    try:
        # ALTER TABLE queues for its lock, and every query of the table queues behind it: a
        # paused sidecar's open transaction would stall all reads past their timeout (and
        # into degraded answers). A short lock timeout, retried, never holds the queue.
        await conn.execute("SET lock_timeout = '200ms'")
        for table, check in POISON_CONSTRAINTS:
            await _alter(conn, f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS nemesis_{table}")
            if add:
                await _alter(conn, f"ALTER TABLE {table} ADD CONSTRAINT nemesis_{table}"
                                   f" CHECK ({check}) NOT VALID")
    finally:
        await conn.close()


async def _alter(conn: asyncpg.Connection, sql: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await conn.execute(sql)
            return
        except asyncpg.LockNotAvailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # let the queue behind us through, then try again
