"""One pooled aiohttp session per client: URLs, the bearer token, one attempt of a request
and its answer or typed error, repeated under the retry policy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL  # aiohttp's own URL type

from proxy.client.errors import TransportError, error_from_response
from proxy.client.retry import RetryPolicy

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful (< 400) answer, read whole."""

    status: int
    headers: Mapping[str, str]
    raw: bytes
    attempts: int = 1

    def json(self) -> Any:
        return orjson.loads(self.raw) if self.raw else None


def segment(value: str) -> str:
    """A path segment, percent-encoded. `.` and `..` are valid ids, and URL normalisation
    would resolve them as path steps: their dots are encoded too (the server decodes)."""
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted.strip(".") == "" else quoted


class Transport:
    """Owns the session (created on first use, inside the caller's event loop), so every
    call reuses pooled keep-alive connections."""

    def __init__(self, base_url: str, *, token: str | None, retry: RetryPolicy,
                 timeout_s: float, connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.timeout_s = timeout_s
        self._token = token
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def url(self, *segments: str) -> URL:
        """The URL of a route from its path segments (each one encoded)."""
        return URL(self.base_url + "".join("/" + segment(s) for s in segments), encoded=True)

    def url_of(self, path: str) -> URL:
        """The URL of a plain path (`/v1/...`), percent-encoded where needed."""
        return URL(self.base_url + "/" + path.lstrip("/"))

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:  # a new session here would be one nobody closes
            raise RuntimeError("the tierproxy client is closed")
        if self._session is None:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
            # No session-wide deadline: it would also bound WebSocket lifetimes. Each HTTP
            # attempt gets `timeout_s`; the WebSocket handshake is bounded in ws.py.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections), headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s))
            # aiohttp silently sends a GET/PUT/DELETE again when a reused connection fails,
            # even after the server processed it: every repeat must be ours, counted and
            # marked ambiguous (see retry.py). aiohttp's own TestClient turns it off so too.
            if hasattr(self._session, "_retry_connection"):
                self._session._retry_connection = False
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, method: str, url: URL, *, body: Any = None, data: bytes | None = None,
                   params: Mapping[str, str] | None = None,
                   headers: Mapping[str, str] | None = None, idempotent: bool,
                   retry: RetryPolicy | None = None, expect_error: bool = False) -> Answer:
        """Send under the retry policy; the answer of the last attempt, or its typed error
        (with `expect_error`, an error answer is returned instead). `body` is sent as JSON;
        `data` as given (with its own Content-Type in `headers`)."""
        if body is not None:
            data, headers = orjson.dumps(body), {"Content-Type": JSON, **(headers or {})}
        attempts = 0

        async def send() -> Answer:
            nonlocal attempts
            attempts += 1
            answer = await self._once(method, url, data, params, headers)
            if answer.status >= 400 and not expect_error:
                raise error_from_response(answer.status, answer.headers, answer.raw)
            return answer

        answer = await (retry or self.retry).run(send, idempotent=idempotent,
                                                 write=method != "GET")
        return replace(answer, attempts=attempts)

    async def _once(self, method: str, url: URL, data: bytes | None,
                    params: Mapping[str, str] | None,
                    headers: Mapping[str, str] | None) -> Answer:
        try:
            async with self.session.request(method, url, data=data, params=params,
                                            headers=headers, timeout=self._timeout) as resp:
                answer = Answer(resp.status, resp.headers, await resp.read())
        except aiohttp.ClientConnectorError as e:
            raise TransportError(f"{method} {url.path}: cannot connect: {e}", sent=False) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TransportError(f"{method} {url.path}: no answer: {type(e).__name__}: {e}",
                                 sent=True) from e
        return answer
