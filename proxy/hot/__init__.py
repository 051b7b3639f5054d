"""The hot tier: reads and writes Redis, one room per entity. Each write is one script call
that checks, stores and logs; what Redis no longer holds (expired after a flush, older than a
thread's window) is read through the backing (PostgreSQL) and cached again.

    hot.threads   get, put, delete            hot.pages     page
    hot.messages  append, get, edit, delete   hot.state     get, put, delete
    hot.changes   after (the changes feed, by cseq)
    hot.release   the flush acknowledgement (cache policy: unflushed counts, TTLs, windows)
    hot.ephemeral publish (pushed to subscribers, never stored)
    hot.markers   get, put, unread (read markers, issue 12.2)
    hot.inbox     an owner's threads by last activity (Redis's index merged with PostgreSQL)
    hot.recovery  erased (after write-through: what Redis holds of an erasure made without it)
"""

from __future__ import annotations

from proxy.backends import Backing
from proxy.failpoints import Failpoints
from proxy.hot.changes import Changes, Feed
from proxy.hot.core import Core, Result
from proxy.hot.ephemeral import Ephemerals
from proxy.hot.erasure import Recovery
from proxy.hot.inbox import Inbox, InboxPage
from proxy.hot.markers import Marker, Markers
from proxy.hot.messages import Messages
from proxy.hot.pages import Page, Pages, page_range
from proxy.hot.release import Release
from proxy.hot.state import States
from proxy.hot.threads import Threads
from proxy.redisconn import RedisClient
from proxy.settings import Settings
from proxy.writelog import Backlog

__all__ = ["Feed", "HotTier", "InboxPage", "Marker", "Page", "Result", "page_range"]


class HotTier:
    def __init__(self, client: RedisClient, settings: Settings, backing: Backing,
                 backlog: Backlog, degraded: Backing | None, failpoints: Failpoints) -> None:
        core = Core(client, settings, backing, backlog, degraded, failpoints)
        self.backlog = backlog
        self.threads = Threads(core)
        self.messages = Messages(core, self.threads)
        self.pages = Pages(core, self.threads, self.messages)
        self.state = States(core)
        self.changes = Changes(core, self.threads)
        self.release = Release(core)
        self.ephemeral = Ephemerals(core, self.threads)
        self.markers = Markers(core, self.threads)
        self.inbox = Inbox(core)
        self.recovery = Recovery(core)
        self.aclose = core.aclose
