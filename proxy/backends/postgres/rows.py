"""A batch of changes as the staging table's records: each doc as the log holds it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.backends import PoisonError

KINDS = frozenset("tmsr")  # thread, message, state, read marker

Record = tuple[str, str, str | None]  # kind, doc (JSON), fingerprint


@dataclass(frozen=True)
class Rows:
    """The records to COPY into the staging table, and how many there are of each kind."""

    records: list[Record]
    counts: Counter[str]

    @classmethod
    def of(cls, docs: Iterable[tuple[str, bytes, str]]) -> Rows:
        """From (kind, doc, fingerprint): kind 't' thread, 'm' message, 's' state; the doc
        carries the version; the fingerprint (messages) that of the appended body; 'r' a
        read marker. Only the
        UTF-8 is decoded here (PostgreSQL parses the JSON). Raises PoisonError on an entry
        that cannot be staged."""
        try:
            records = [(kind, doc.decode(), fingerprint or None)
                       for kind, doc, fingerprint in docs]
        except UnicodeDecodeError as err:
            raise PoisonError(f"undecodable log entry: {err!r}") from err
        counts = Counter(kind for kind, _, _ in records)
        if unknown := counts.keys() - KINDS:
            raise PoisonError(f"unknown entity kind {sorted(unknown)!r}")
        return cls(records, counts)
