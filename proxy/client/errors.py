"""What the client raises: one tree, built from the API's JSON errors (HTTP or WebSocket).

Each leaf also inherits the builtin it resembles (`NotFound` is a `LookupError`, `Invalid` a
`ValueError`), so callers may catch either. `ambiguous` is the one thing to read before
reacting to a write's error: it says an attempt of the same call may have been applied
although its answer was lost, so the write may have happened — and a 412 (If-Match) or
404 (DELETE) may be the consequence of our own first attempt; re-read to learn the state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


class ClientError(Exception):
    """Base of everything the tierproxy client raises.

    `attempts`: how many times the call was sent. `ambiguous`: this write may have been
    applied all the same (an attempt's answer was lost, or it was cut off mid-way)."""

    def __init__(self, message: str, *, attempts: int = 1, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts
        self.ambiguous = ambiguous


class TransportError(ClientError, ConnectionError):
    """No answer: the connection could not be made, was cut, or timed out (after retries).
    `sent`: the request may have reached the server (False: the connection was refused)."""

    def __init__(self, message: str, *, sent: bool, attempts: int = 1,
                 ambiguous: bool = False) -> None:
        super().__init__(message, attempts=attempts, ambiguous=ambiguous)
        self.sent = sent


class ProtocolError(ClientError):
    """The server sent something this client does not understand (a client/server mismatch)."""


class APIError(ClientError):
    """An error answer. `code` is the API's stable name, `detail` its structured detail
    (e.g. `{"field": "role"}` for 422), `status` the HTTP status (None on a WebSocket),
    `retry_after_s` the Retry-After header, `thread_id` the thread of a WebSocket error."""

    def __init__(self, message: str, *, code: str = "http_error", status: int | None = None,
                 detail: Any = None, retry_after_s: float | None = None,
                 thread_id: str | None = None, attempts: int = 1,
                 ambiguous: bool = False) -> None:
        super().__init__(message, attempts=attempts, ambiguous=ambiguous)
        self.code = code
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.thread_id = thread_id

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"


class Malformed(APIError, ValueError):
    """400: the request could not be parsed (JSON, query parameter, header)."""


class Unauthorized(APIError, PermissionError):
    """401: the bearer token is missing or wrong."""


class NotFound(APIError, LookupError):
    """404: unknown or deleted."""


class Conflict(APIError):
    """409: the thread was deleted, or the message id exists with another body."""


class Resync(Conflict):
    """409 `resync` (changes feed, or a WebSocket error frame): the position is past the
    thread's last change (a Redis that lost data); start again from the current state, at
    `cseq`."""

    @property
    def cseq(self) -> int | None:
        detail = self.detail if isinstance(self.detail, dict) else {}
        cseq = detail.get("cseq")
        return cseq if isinstance(cseq, int) else None


class PreconditionFailed(APIError):
    """412: If-Match named a version that is not the current one (`detail["version"]`)."""


class TooLarge(APIError, ValueError):
    """413: the body is over the server's `api.max_body_bytes`."""


class UnsupportedMediaType(APIError, ValueError):
    """415: the body was not sent as application/json."""


class Invalid(APIError, ValueError):
    """422 (or a WebSocket `invalid_field`): a bad, missing or unknown field, `detail`
    names it."""


class TooManySubscriptions(APIError):
    """WebSocket: the socket already follows `ws.max_subscriptions` threads."""


class Unavailable(APIError):
    """503: a store is down or the request was not answered in time; retry after
    `retry_after_s`."""


class Backpressure(Unavailable):
    """503 `backpressure` or 429: the server refused the request before doing anything."""


class ServerError(APIError):
    """500: a server bug (logged on the server)."""


_BY_CODE: dict[str, type[APIError]] = {
    "malformed": Malformed, "unknown_op": Malformed, "unauthorized": Unauthorized,
    "not_found": NotFound, "conflict": Conflict, "precondition_failed": PreconditionFailed,
    "too_large": TooLarge, "unsupported_media_type": UnsupportedMediaType,
    "invalid_field": Invalid, "too_many_subscriptions": TooManySubscriptions,
    "unavailable": Unavailable, "backpressure": Backpressure, "internal": ServerError,
    "rate_limited": Backpressure, "resync": Resync,
}
_BY_STATUS: dict[int, type[APIError]] = {
    400: Malformed, 401: Unauthorized, 404: NotFound, 409: Conflict, 412: PreconditionFailed,
    413: TooLarge, 415: UnsupportedMediaType, 422: Invalid, 429: Backpressure,
    500: ServerError, 503: Unavailable,
}


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (the API sends whole seconds; an HTTP date is not used)."""
    raw = headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def error_from_response(status: int, headers: Mapping[str, str], raw: bytes, *,
                        attempts: int = 1, ambiguous: bool = False) -> APIError:
    """The typed error of an error answer. The code picks the class (it is the stable
    name); the status decides when the body is not the API's JSON (e.g. a proxy's 502)."""
    error = _error_object(raw)
    code = str(error.get("code") or "http_error")
    cls = Backpressure if status == 429 else (_BY_CODE.get(code)
                                              or _BY_STATUS.get(status, APIError))
    message = str(error.get("message") or raw[:200].decode("utf-8", "replace") or
                  f"HTTP {status}")
    return cls(message, code=code, status=status, detail=error.get("detail"),
               retry_after_s=retry_after(headers), attempts=attempts, ambiguous=ambiguous)


def _error_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, dict) else {}


def error_from_frame(frame: Mapping[str, Any]) -> APIError:
    """The typed error of a WebSocket `{"type": "error", "code", "message"[, "thread_id"]}`."""
    code = str(frame.get("code") or "error")
    cls = _BY_CODE.get(code, APIError)
    detail = {"cseq": frame["cseq"]} if "cseq" in frame else None  # resync: the current cseq
    return cls(str(frame.get("message") or code), code=code, detail=detail,
               thread_id=frame.get("thread_id"))
