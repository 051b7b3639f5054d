"""Every Redis key, stream and channel name, every hash field and log-entry field the scripts
use, and the shard function: the key layout on one screen.

All keys of one thread (or one state key) carry the hash tag `{s}` of their shard, and each
shard has its own log stream, so every script touches a single slot (Redis Cluster ready).

Thread hash `thread(s, tid)`:
    doc   the thread JSON without last_seq        v     its version
    c     created_at as a JSON string             del   '1' tombstoned, '0' live
    seq   the last message seq assigned           pend  changes of the thread and its
    ft    the latest append time (ms) of a message    messages not yet flushed to PostgreSQL
          whose id Redis forgot (0: none; an id made before then may be in PostgreSQL only)
    o     the owner_id (inbox)                    la    last activity (ms): the latest of
          the thread's changes and message appends (inbox; never goes backwards)
    cs    the thread's last change number (cseq: every change of the thread or one of its
          messages takes the next, in its script; each doc carries the cseq of its change)
    cf    the changes floor: every entity whose latest change has a cseq above it is in
          `changes(s, tid)` (set by a fill; raised when trimmed messages leave the set)
Messages hash `messages(s, tid)`, per message id `mid`:
    d|mid  the message JSON (window, overlay)     m|mid  "<version>,<fingerprint>[,<ts>]"
    p|mid  changes of the message not yet flushed (absent: none); ts: when it was appended
    c|mid  the cseq of a message trimmed out of the window, while its id is recent
Window `window(s, tid)`: sorted set mid -> seq, a contiguous suffix of the thread's messages
    (every unflushed append is in it). Recent ids `recent(s, tid)`: mid -> seq of the last
    `cache.recent_ids` messages trimmed out of the window, whose m|mid stays (idempotent
    retries need no PostgreSQL). Overlay `overlay(s, tid)`: mid -> seq of messages below the
    window with an unflushed edit (their d|mid replaces PostgreSQL's in pages). Cold cache
    `cold(s, tid)`: hash mid -> doc of messages read through below the window (has a TTL).
Changes `changes(s, tid)`: sorted set member -> cseq of the entity's latest change (member ''
    is the thread, any other the message id): the changes feed. Members trimmed out of the
    window with their docs leave it (raising `cf`); it gets its TTL with the thread.
State hash `state(s, key)`:
    doc  the entry JSON    v  its version    del  '1' | '0'
    x    expires_at in Unix ms ('' = never)  pend  changes not yet flushed
Log entry (XADD to `log(s)`):
    k  kind: t thread, m message, s state     id   the entity id (message id, thread id, key)
    tid  the thread id (threads and messages)  v   the entity version after the change
    e  the event (message.created, thread.updated, state.deleted, ...)
    ts  when the write was acknowledged (Unix ms)   d  the complete doc after the change
    f  (messages) the fingerprint of the body it was appended with (kept across edits)
    g  (replayed dead letters only) the one consumer group it is meant for
Dead letter (XADD to `dead_letters(s)`): the entry's fields plus
    error  why it was given up    group  the group that gave up    source_id  its log entry id
Inbox index `inbox(s, owner)`: sorted set tid -> last activity ms of the owner's threads on
    shard s (no TTL: an entry whose thread hash is gone is flushed, and dropped when read).
Load fence `fence(s, kind, id)` (kind t: a thread and its messages, k: a state key): the token
    a read-through's fill must present; release.lua deletes it on every release of the entity,
    so a load that began before a newer version was flushed can never install what it read.
Read markers `markers(s, tid)`: hash user_id -> the seq up to which that user has read the
    thread (only ever raised). A change counts in the thread's `pend` and the hash gets the
    thread's cache TTL with its other keys (release.lua), so it expires only once flushed;
    a field absent means "ask PostgreSQL" (fill_marker.lua, under the thread's load fence).
    Its log entries: k r (kind), id the user id, tid the thread, v the marker's seq (its
    version), e read.updated, d the marker (thread_id, user_id, seq, updated_at).
Wait mark `wait_mark(s)`: written ('1', 60 s TTL) right before WAIT on the replication
    connection, so that WAIT covers every write its server answered before (`replicated`).
Flushed keys get the cache TTL; a key with `pend` > 0 never has one.
Ephemeral rate `ephemeral_rate(s, tid)`: the GCRA theoretical arrival time (Unix ms) of the
    thread's ephemeral events, PX-expiring once the thread is idle. Nothing of an event is
    stored: ephemeral_publish.lua only PUBLISHes it on `events(s)`.
"""

from __future__ import annotations

import re
import zlib

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
ID_RE = re.compile(ID_PATTERN)
EVENT_TYPE_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"  # the type of an ephemeral event

EPOCH = "tp:epoch"  # a random token set once per Redis dataset; a change means Redis lost data
# API processes whose Redis answers while they still serve from PostgreSQL after write-through
# (proxy.failover): holder -> until (ms). Redis is behind PostgreSQL until they reconcile.
RECOVERING = "tp:recovering"


def shard_of(entity_id: str, shards: int) -> int:
    return zlib.crc32(entity_id.encode()) % shards


def _tag(shard: int) -> str:
    return f"tp:{{{shard}}}"


def thread(shard: int, tid: str) -> str:
    return f"{_tag(shard)}:t:{tid}"


def messages(shard: int, tid: str) -> str:
    return f"{_tag(shard)}:m:{tid}"


def window(shard: int, tid: str) -> str:
    return f"{_tag(shard)}:w:{tid}"


def recent(shard: int, tid: str) -> str:
    return f"{_tag(shard)}:r:{tid}"


def overlay(shard: int, tid: str) -> str:
    return f"{_tag(shard)}:o:{tid}"


def cold(shard: int, tid: str) -> str:
    return f"{_tag(shard)}:c:{tid}"


def inbox(shard: int, owner: str) -> str:
    """An owner's threads of one shard by last activity (inbox)."""
    return f"{_tag(shard)}:in:{owner}"


def changes(shard: int, tid: str) -> str:
    return f"{_tag(shard)}:cs:{tid}"


def state(shard: int, key: str) -> str:
    return f"{_tag(shard)}:k:{key}"


def pattern(shard: int, kind: str) -> str:
    """SCAN pattern of a shard's thread ('t') or state ('k') hashes; ids hold no glob chars."""
    return f"{_tag(shard)}:{kind}:*"


def id_in(key: str) -> str:
    """The thread id or state key in a key made above (the part after the third colon)."""
    return key.split(":", 3)[3]


def fence(shard: int, kind: str, entity_id: str) -> str:
    return f"{_tag(shard)}:lf:{kind}:{entity_id}"


def markers(shard: int, tid: str) -> str:
    """A thread's read markers (issue 12.2), one field per user."""
    return f"{_tag(shard)}:rm:{tid}"


def wait_mark(shard: int) -> str:
    return f"{_tag(shard)}:wm"


def log(shard: int) -> str:
    """The write-behind log stream of a shard."""
    return f"{_tag(shard)}:wb"


def dead_letters(shard: int) -> str:
    """Entries that failed `flush.max_attempts` times, with their error."""
    return f"{_tag(shard)}:dlq"


def events(shard: int) -> str:
    """Pub/sub channel of a shard's message and thread events (WebSocket fan-out)."""
    return f"{_tag(shard)}:ev"


def ephemeral_rate(shard: int, tid: str) -> str:
    """The rate counter of a thread's ephemeral events (a short-lived string, see above)."""
    return f"{_tag(shard)}:er:{tid}"
