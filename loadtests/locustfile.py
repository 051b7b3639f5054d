"""Locust users for a realistic mix against a running sidecar.

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 30s \\
        --host http://127.0.0.1:8750

- ChatUser (3 of 4 users): a chat session. Opens a thread, appends messages, reads the latest
  page and single messages back, now and then starts a new thread.
- StateUser (1 of 4): a backend using the state API as its cache: put, get, conditional put.

Sends `Authorization: Bearer $TIERPROXY_API_TOKEN` when that variable is set. Locust runs on
gevent, so this file imports neither uvloop nor the proxy package (nor the bench harness).
"""

from __future__ import annotations

import os
import random
import uuid
from typing import Any

from locust import FastHttpUser, between, task

TOKEN = os.environ.get("TIERPROXY_API_TOKEN", "")
HEADERS = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
WORDS = ("hello", "thread", "message", "cache", "redis", "latency", "sidecar", "flush", "page")


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
