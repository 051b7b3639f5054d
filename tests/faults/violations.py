"""The invariants' labels (ARCHITECTURE.md's numbering, shared by every nemesis check) and the
collector of violations, reported label by label."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

LABELS = {
    "1": "acknowledged writes are never lost",
    "2": "one row per entity version in PostgreSQL; seq unique, gapless; no regression",
    "3": "the log is trimmed only below every group's unacknowledged entries",
    "4": "unflushed data never has a TTL",
    "5": "read-your-writes through any sidecar; deleted or expired stays gone",
    "6": "poison entries are dead-lettered, visible, never block the shard",
    "7": "ClickHouse rows exactly once",
    "8": "no refill (or read) goes back to an older version or seq",
    "9": "no worker dies silently; health and status honest; the backlog drains",
    "10": "erased content is gone from every tier, every stored version included",
    "api": "answers as README.md documents them",
}


@dataclass
class Violations:
    """Violations by label; a repeat of the same text (a sampler seeing one fault again) is
    counted, not listed again."""

    items: list[tuple[str, str]] = field(default_factory=list)
    repeats: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, label: str, text: str) -> None:
        assert label in LABELS, label
        if not self.repeats[(label, text)]:
            self.items.append((label, text))
        self.repeats[(label, text)] += 1

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(label for label, _ in self.items).items()))

    def report(self, cap: int = 60) -> str:
        """Per label its meaning and count, then up to `cap` violations, the labels taking
        turns (so one noisy invariant does not hide the others)."""
        lines = [f"  [{k}] {n:5d}  {LABELS[k]}" for k, n in self.counts().items()]
        queues = [[f"[{k}] {text}{self._times(k, text)}" for label, text in self.items
                   if label == k] for k in self.counts()]
        turns = [t for row in itertools.zip_longest(*queues) for t in row if t is not None]
        return "\n".join([*lines, *turns[:cap]])

    def _times(self, label: str, text: str) -> str:
        n = self.repeats[(label, text)]
        return f" (seen {n} times)" if n > 1 else ""
