"""The Sink protocol: where the flusher writes batches of log entries. One file per backend."""

from __future__ import annotations

from typing import Protocol

from proxy.writelog import Entry


class PoisonError(Exception):
    """The batch failed because of its data, not the sink's health: retrying the same entries
    unchanged will fail again, so the flusher isolates and dead-letters them."""


class Sink(Protocol):
    name: str  # also the consumer group ("pg", "ch") and the metrics label

    async def write(self, entries: list[Entry]) -> None:
        """Write the entries idempotently (a replay must neither duplicate nor regress) and
        return only once they are committed. Raise PoisonError for bad data."""
        ...

    async def close(self) -> None: ...
