"""Locust users for a realistic chat mix against a running sidecar.

    make loadtest                      (a sidecar on the embedded default, Locust headless)
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 30s \\
        --host http://127.0.0.1:8750

- ChatUser (3 of 5 users): a chat session. Opens a thread, appends messages, reads the latest
  page and single messages back, now and then starts a new thread.
- StateUser (1 of 5): a backend using the state API as its cache: put, get, conditional put.
- SubscriberUser (1 of 5): a client on /v1/ws following the threads the chat users write
  to (the latest few, refreshed every few seconds). Locust lists its frames as requests of
  type WS: `connect`, `subscribe` (until the `subscribed` reply) and `message.created`, whose
  "response time" is the delivery latency: the event's `ts` (when the sidecar acknowledged
  the write) to the frame's arrival, in whole ms.

Sends `Authorization: Bearer $TIERPROXY_API_TOKEN` when that variable is set. Locust runs on
gevent, so this file imports neither uvloop nor the proxy package (nor the bench harness, nor
proxy.client: Locust's own HTTP client keeps its statistics); its WebSocket client is
simple-websocket (a dependency of Locust's own Socket.IO support), whose threads gevent
turns into greenlets.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import deque
from typing import Any

import simple_websocket
from locust import FastHttpUser, User, between, constant, task
from locust.exception import StopUser

TOKEN = os.environ.get("TIERPROXY_API_TOKEN", "")
HEADERS = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
WORDS = ("hello", "thread", "message", "cache", "redis", "latency", "sidecar", "flush", "page")
# Threads the chat users write to, newest last: what the subscribers follow (one Locust
# process runs every user, so a module-level list is shared by all).
ACTIVE_THREADS: deque[str] = deque(maxlen=200)
FOLLOW = 5  # threads per subscriber
REFRESH_S = 5.0  # how often a subscriber moves to the newest threads


def _text(words: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(words))


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class ChatUser(FastHttpUser):
    weight = 3
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.message_ids: list[str] = []
        self.thread_id = ""
        self.new_thread()

    def _call(self, method: str, path: str, name: str, expect: tuple[int, ...],
              body: Any = None) -> Any:
        """One request; a status outside `expect` is a failure. Returns the JSON body or None."""
        with self.client.request(method, path, json=body, headers=HEADERS, name=name,
                                 catch_response=True) as resp:
            if resp.status_code not in expect:
                resp.failure(f"status {resp.status_code}: {(resp.text or '')[:200]}")
                return None
            return resp.json()

    @task(1)
    def new_thread(self) -> None:
        tid = _new_id("locust-t")
        doc = self._call("PUT", f"/v1/threads/{tid}", "PUT /v1/threads/[tid]", (200, 201),
                         {"title": _text(4), "owner_id": "locust", "metadata": {"load": True}})
        if doc is not None:
            self.thread_id, self.message_ids = tid, []
            ACTIVE_THREADS.append(tid)

    @task(10)
    def append(self) -> None:
        body = {"role": random.choice(("user", "assistant")), "content": _text(30),
                "metadata": {"client": "locust"}}
        doc = self._call("POST", f"/v1/threads/{self.thread_id}/messages",
                         "POST /v1/threads/[tid]/messages", (201,), body)
        if doc is not None:
            self.message_ids = [*self.message_ids[-99:], doc["message_id"]]

    @task(5)
    def read_page(self) -> None:
        self._call("GET", f"/v1/threads/{self.thread_id}/messages?limit=50",
                   "GET /v1/threads/[tid]/messages?limit=50", (200,))

    @task(3)
    def read_message(self) -> None:
        if self.message_ids:
            mid = random.choice(self.message_ids)
            self._call("GET", f"/v1/threads/{self.thread_id}/messages/{mid}",
                       "GET /v1/threads/[tid]/messages/[mid]", (200,))

    @task(1)
    def read_thread(self) -> None:
        self._call("GET", f"/v1/threads/{self.thread_id}", "GET /v1/threads/[tid]", (200,))


class StateUser(FastHttpUser):
    weight = 1
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.keys = [_new_id("locust-k") for _ in range(5)]
        self.versions: dict[str, str] = {}

    @task(3)
    def put(self) -> None:
        key = random.choice(self.keys)
        with self.client.put(f"/v1/state/{key}", json={"value": {"step": random.randint(1, 9)},
                                                       "ttl": 3600},
                             headers=HEADERS, name="PUT /v1/state/[key]",
                             catch_response=True) as resp:
            if resp.status_code not in (200, 201):
                resp.failure(f"status {resp.status_code}: {(resp.text or '')[:200]}")
            else:
                self.versions[key] = str(resp.json()["version"])

    @task(3)
    def get(self) -> None:
        key = random.choice(list(self.versions) or self.keys)
        expect = (200,) if key in self.versions else (404,)
        with self.client.get(f"/v1/state/{key}", headers=HEADERS, name="GET /v1/state/[key]",
                             catch_response=True) as resp:
            if resp.status_code not in expect:
                resp.failure(f"status {resp.status_code}, expected {expect}")
            else:
                resp.success()  # a 404 for a key not written yet is the right answer

    @task(1)
    def conditional_put(self) -> None:
        """If-Match with the version this user last saw: it is the only writer, so 2xx."""
        if not self.versions:
            return
        key = random.choice(list(self.versions))
        with self.client.put(f"/v1/state/{key}", json={"value": {"cas": True}},
                             headers={**HEADERS, "If-Match": f'"{self.versions[key]}"'},
                             name="PUT /v1/state/[key] If-Match",
                             catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {(resp.text or '')[:200]}")
            else:
                self.versions[key] = str(resp.json()["version"])


class SubscriberUser(User):
    """One WebSocket following the newest threads; each frame is reported as a WS request."""

    weight = 1
    wait_time = constant(0)  # listen() waits on the socket itself

    def on_start(self) -> None:
        assert self.host is not None
        url = self.host.replace("http", "ws", 1).rstrip("/") + "/v1/ws"
        started = time.perf_counter()
        try:
            self.ws = simple_websocket.Client.connect(url, headers=HEADERS)
        except (simple_websocket.ConnectionError, OSError) as e:
            self._report("connect", started, exception=e)
            raise StopUser() from e
        self._report("connect", started)
        self.following: dict[str, float] = {}  # thread id -> when subscribe was sent
        self.refresh_at = 0.0

    def on_stop(self) -> None:
        self.ws.close()

    def _report(self, name: str, started: float, length: int = 0,
                exception: Exception | None = None, ms: float | None = None) -> None:
        elapsed = (time.perf_counter() - started) * 1000 if ms is None else ms
        self.environment.events.request.fire(
            request_type="WS", name=name, response_time=elapsed, response_length=length,
            exception=exception, context={})

    def _follow_newest(self) -> None:
        newest = list(ACTIVE_THREADS)[-FOLLOW:]
        for tid in set(self.following) - set(newest):
            self.ws.send(json.dumps({"op": "unsubscribe", "thread_id": tid}))
            del self.following[tid]
        for tid in newest:
            if tid not in self.following:
                self.ws.send(json.dumps({"op": "subscribe", "thread_id": tid}))
                self.following[tid] = time.perf_counter()
        # Until the chat users have made threads, look again soon.
        self.refresh_at = time.monotonic() + (REFRESH_S if self.following else 0.5)

    @task
    def listen(self) -> None:
        if time.monotonic() >= self.refresh_at:
            self._follow_newest()
        try:
            frame = self.ws.receive(timeout=1.0)
        except simple_websocket.ConnectionClosed as e:
            self._report("receive", time.perf_counter(), exception=e)
            raise StopUser() from e
        if frame is not None:
            self._on_frame(json.loads(frame), len(frame))

    def _on_frame(self, ev: dict[str, Any], length: int) -> None:
        kind = ev.get("type")
        if kind == "subscribed":
            self._report("subscribe", self.following.get(ev["thread_id"], time.perf_counter()),
                         length)
        elif kind == "message.created" and "ts" in ev:  # a live event (backfill has no ts)
            delivery_ms = max(0.0, time.time() * 1000 - ev["ts"])
            self._report("message.created", 0.0, length, ms=delivery_ms)
        elif kind == "error":
            self._report(f"error {ev.get('code')}", time.perf_counter(), length,
                         exception=RuntimeError(ev.get("message", "error frame")))
