"""Background workers and readiness: every background task has this one owner, which starts
it, restarts it with backoff if it dies (logged with its traceback, counted in
tierproxy_worker_errors_total, readiness red until it runs again), and on exit stops, awaits
and if need be cancels it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy import metrics
from proxy.backoff import Backoff

logger = logging.getLogger(__name__)


class Health:
    """What /readyz reports: ready once started, not draining, no background worker dead."""

    def __init__(self) -> None:
        self.started = False
        self.failed: list[str] = []
        self._drain_started: float | None = None

    @property
    def draining(self) -> bool:
        return self._drain_started is not None

    def drain(self) -> None:
        """Shutdown began: readiness goes red (once)."""
        if self._drain_started is None:
            self._drain_started = time.monotonic()

    def left_of(self, deadline_s: float) -> float:
        """Seconds left of a shutdown deadline counted from the start of the drain (all of it
        when there was no drain), so drain and final flush share one deadline."""
        if self._drain_started is None:
            return deadline_s
        return max(0.0, deadline_s - (time.monotonic() - self._drain_started))

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and not self.failed


@dataclass
class _Worker:
    task: asyncio.Task[None]
    stop: Callable[[], None] | None  # asks it to finish; None: cancelled at once on exit


class Workers:
    def __init__(self, health: Health, restart_base_s: float = 0.1,
                 restart_max_s: float = 10.0) -> None:
        self._health = health
        self._workers: list[_Worker] = []
        self._restart = (restart_base_s, restart_max_s)
        self._stopping = False

    def start(self, name: str, run: Callable[[], Awaitable[None]],
              stop: Callable[[], None] | None = None) -> None:
        """Run `run` as a background task; `stop` asks it to finish what it holds."""
        metrics.WORKER_ERRORS.labels(name)  # exported at 0 from the start
        task = asyncio.create_task(self._guard(name, run), name=name)
        self._workers.append(_Worker(task, stop))

    async def _guard(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff(*self._restart)
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.WORKER_ERRORS.labels(name).inc()
                logger.exception("background worker %s crashed; restarting", name)
            if self._stopping:
                return
            self._health.failed.append(name)
            try:
                await asyncio.sleep(backoff.failed())
            finally:
                self._health.failed.remove(name)

    async def stop(self, deadline_s: float) -> None:
        """Ask every worker to finish, give them what is left of deadline_s since the drain
        began, then cancel the rest; in reverse start order."""
        workers, self._workers = self._workers[::-1], []
        self._stopping = True
        for w in workers:
            if w.stop is None:
                w.task.cancel()
            else:
                w.stop()
        pending = {w.task for w in workers}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self._health.left_of(deadline_s))
        # Cancel until they end: a cancel can be lost. On Python 3.11 asyncio.wait_for, which
        # redis-py wraps around every command it sends, swallows a cancellation that arrives
        # as the send completes (CPython gh-86296), and the worker then just carries on.
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
