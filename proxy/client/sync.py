"""SyncClient: the same methods, blocking, for scripts. It owns an event loop (an
asyncio.Runner) that runs each call to completion, so it must not be used from inside a
running event loop (there, use Client). One SyncClient per thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from proxy.client.http import Client
from proxy.client.results import Durability
from proxy.client.retry import RetryPolicy
from proxy.client.ws import Event, Subscription

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


async def _next(it: AsyncIterator[T]) -> T:
    return await it.__anext__()


class _Loop:
    """The runner, and async iterators driven one item at a time."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.closed = False

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        return self.runner.run(coro)

    def iterate(self, it: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    item = self.run(_next(it))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None and not self.closed:  # an async generator left early
                self.run(aclose())

    def close(self) -> None:
        self.closed = True
        self.runner.close()


def _blocking(method: Callable[Concatenate[Client, P], Coroutine[Any, Any, R]]
              ) -> Callable[Concatenate[SyncClient, P], R]:
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._loop.run(method(self._client, *args, **kwargs))

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


def _iterating(method: Callable[Concatenate[Client, P], AsyncIterator[T]]
               ) -> Callable[Concatenate[SyncClient, P], Iterator[T]]:
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._loop.iterate(method(self._client, *args, **kwargs))

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


class SyncSubscription:
    """A Subscription, iterated with a plain `for` (see proxy.client.ws)."""

    def __init__(self, loop: _Loop, sub: Subscription) -> None:
        self._loop = loop
        self._sub = sub

    @property
    def positions(self) -> dict[str, int | None]:
        return self._sub.positions

    def __enter__(self) -> SyncSubscription:
        self._loop.run(self._sub.connect())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return self._loop.run(_next(self._sub))
        except StopAsyncIteration:
            raise StopIteration from None

    def add(self, thread_id: str, after_seq: int | None = None, *,
            after_cseq: int = 0) -> None:
        self._loop.run(self._sub.add(thread_id, after_seq, after_cseq=after_cseq))

    def remove(self, thread_id: str) -> None:
        self._loop.run(self._sub.remove(thread_id))

    def close(self) -> None:
        if not self._loop.closed:
            self._loop.run(self._sub.close())


class SyncClient:
    """Blocking twin of Client (same arguments, same methods, same errors):
    `with SyncClient(url) as c: c.append("t1", "hi")`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8750", *, token: str | None = None,
                 retry: RetryPolicy | None = None, timeout_s: float = 10.0,
                 durability: Durability | None = None, connections: int = 100) -> None:
        self._loop = _Loop()
        self._client = Client(base_url, token=token, retry=retry, timeout_s=timeout_s,
                              durability=durability, connections=connections)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.closed:
            self._loop.run(self._client.close())
            self._loop.close()

    def subscribe(self, *thread_ids: str, after_seq: int | None = None,
                  after_cseq: int | None = None, heartbeat_s: float = 20.0,
                  reconnect: RetryPolicy | None = None,
                  resume: bool = True) -> SyncSubscription:
        return SyncSubscription(self._loop, self._client.subscribe(
            *thread_ids, after_seq=after_seq, after_cseq=after_cseq, heartbeat_s=heartbeat_s,
            reconnect=reconnect, resume=resume))

    put_thread = _blocking(Client.put_thread)
    get_thread = _blocking(Client.get_thread)
    delete_thread = _blocking(Client.delete_thread)
    thread_stats = _blocking(Client.thread_stats)
    append = _blocking(Client.append)
    list_messages = _blocking(Client.list_messages)
    pages = _iterating(Client.pages)
    messages = _iterating(Client.messages)
    get_message = _blocking(Client.get_message)
    edit_message = _blocking(Client.edit_message)
    delete_message = _blocking(Client.delete_message)
    inbox = _blocking(Client.inbox)
    inbox_pages = _iterating(Client.inbox_pages)
    changes = _blocking(Client.changes)
    change_pages = _iterating(Client.change_pages)
    put_read_marker = _blocking(Client.put_read_marker)
    get_read_marker = _blocking(Client.get_read_marker)
    put_state = _blocking(Client.put_state)
    get_state = _blocking(Client.get_state)
    delete_state = _blocking(Client.delete_state)
    update_state = _blocking(Client.update_state)
    publish_event = _blocking(Client.publish_event)
    status = _blocking(Client.status)
    replay_dead_letters = _blocking(Client.replay_dead_letters)
    ready = _blocking(Client.ready)
    request = _blocking(Client.request)
