"""A batch of changes as column arrays, one list per table column."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from proxy.backends import PoisonError


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass
class Rows:
    """A batch split by table, as column arrays (one parameter per column: no limit on rows)."""

    threads: list[list[Any]]
    messages: list[list[Any]]
    last_seq: dict[str, int]
    state: list[list[Any]]

    @classmethod
    def of(cls, docs: Iterable[tuple[str, bytes, str]]) -> Rows:
        """From (kind, doc, fingerprint): kind 't' thread, 'm' message, 's' state; the doc
        carries the version; the fingerprint (messages) that of the appended body. Raises
        PoisonError on a doc that is not one."""
        rows = cls([[] for _ in range(8)], [[] for _ in range(11)], {}, [[] for _ in range(6)])
        try:
            for kind, doc, fingerprint in docs:
                rows._add(kind, orjson.loads(doc), fingerprint or None)
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise PoisonError(f"undecodable log entry: {err!r}") from err
        return rows

    def conflict_args(self, table: str) -> list[list[Any]]:
        """The CONFLICTS query's arrays (the compared columns of each row)."""
        if table == "threads":
            t = self.threads
            return [t[0], t[1], t[2], t[3], t[6], t[7]]
        if table == "messages":
            m = self.messages
            return [m[0], m[1], m[3], m[4], m[5], m[8], m[9]]
        s = self.state
        return [s[0], s[1], s[2], s[5]]

    def _add(self, kind: str, d: dict[str, Any], fingerprint: str | None) -> None:
        if kind == "t":
            values = [d["thread_id"], d["title"], d["owner_id"],
                      orjson.dumps(d["metadata"]).decode(), _ts(d["created_at"]),
                      _ts(d["updated_at"]), int(d["version"]), d["deleted"]]
            _append(self.threads, values)
        elif kind == "m":
            values = [d["message_id"], d["thread_id"], d["seq"], d["role"], d["content"],
                      orjson.dumps(d["metadata"]).decode(), _ts(d["created_at"]),
                      _ts(d["updated_at"]), int(d["version"]), d["deleted"], fingerprint]
            _append(self.messages, values)
            tid = d["thread_id"]
            self.last_seq[tid] = max(self.last_seq.get(tid, 0), d["seq"])
        elif kind == "s":
            value = None if d["deleted"] else orjson.dumps(d["value"]).decode()
            _append(self.state, [d["key"], value, int(d["version"]), _ts(d["expires_at"]),
                                 _ts(d["updated_at"]), d["deleted"]])
        else:
            raise ValueError(f"unknown entity kind {kind!r}")


def _append(columns: list[list[Any]], values: list[Any]) -> None:
    for column, value in zip(columns, values, strict=True):
        column.append(value)


