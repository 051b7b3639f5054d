"""Every Redis key, stream and group name, and the shard function: the key layout on one screen.

All keys of one thread (or one state key) carry the hash tag `{s}` of their shard, and each
shard has its own log stream, so every script touches a single slot (Redis Cluster ready).
"""

from __future__ import annotations

import re
import zlib

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
ID_RE = re.compile(ID_PATTERN)

GROUP_PG = "pg"
GROUP_CH = "ch"
GROUPS = (GROUP_PG, GROUP_CH)

EPOCH = "tp:epoch"  # a random token set once per Redis dataset; a change means Redis lost data


def shard_of(entity_id: str, shards: int) -> int:
    return zlib.crc32(entity_id.encode()) % shards


def _tag(shard: int) -> str:
    return f"tp:{{{shard}}}"


def thread(shard: int, tid: str) -> str:
    """Hash: doc (thread JSON), v (version), seq (last seq), del, pend (unflushed changes)."""
    return f"{_tag(shard)}:t:{tid}"


def messages(shard: int, tid: str) -> str:
    """Hash of a thread's messages: d|mid (doc JSON), v|mid (version), f|mid (body fingerprint)."""
    return f"{_tag(shard)}:m:{tid}"


def window(shard: int, tid: str) -> str:
    """Sorted set mid -> seq: a contiguous suffix of the thread's messages."""
    return f"{_tag(shard)}:w:{tid}"


def cold(shard: int, tid: str) -> str:
    """Hash mid -> doc of messages read through from PostgreSQL outside the window (has a TTL)."""
    return f"{_tag(shard)}:c:{tid}"


def state(shard: int, key: str) -> str:
    """Hash: doc (state JSON), v (version), pend (unflushed changes)."""
    return f"{_tag(shard)}:k:{key}"


def log(shard: int) -> str:
    """The write-behind log stream of a shard."""
    return f"{_tag(shard)}:wb"


def dead_letters(shard: int) -> str:
    """Entries that failed `flush.max_attempts` times, with their error."""
    return f"{_tag(shard)}:dlq"


def events(shard: int) -> str:
    """Pub/sub channel of a shard's message and thread events (WebSocket fan-out)."""
    return f"{_tag(shard)}:ev"
