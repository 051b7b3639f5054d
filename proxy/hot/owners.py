"""Which owner each thread has, as far as this process saw: a write script must be given the
inbox index key of the thread's owner (one slot, keys declared), which only Redis knows for
sure. A script that finds another owner answers OWNER and its name; the write is retried with
it. A bounded map: a thread forgotten here costs one retry."""

from __future__ import annotations

MAX_THREADS = 100_000


class OwnerHints:
    def __init__(self, size: int = MAX_THREADS) -> None:
        self._owners: dict[str, str] = {}
        self._size = size

    def get(self, tid: str, default: str = "") -> str:
        return self._owners.get(tid, default)

    def learn(self, tid: str, owner: str) -> None:
        self._owners.pop(tid, None)
        if len(self._owners) >= self._size:  # the oldest entry goes (dicts keep order)
            del self._owners[next(iter(self._owners))]
        self._owners[tid] = owner
