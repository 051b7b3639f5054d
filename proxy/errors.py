"""The error tree: every error a client may see, over HTTP (`status`) or on a WebSocket (`code`
in an error frame). Messages name the component, the action and the target."""

from __future__ import annotations

from typing import Any, ClassVar


class ProxyError(Exception):
    """Base of every error a client may see; `code` is the stable machine-readable name."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class Malformed(ProxyError, ValueError):
    """The request cannot be parsed (bad JSON, bad query parameter or header)."""

    code, status = "malformed", 400


class UnknownOp(Malformed):
    """A WebSocket frame names an op the protocol does not have."""

    code = "unknown_op"


class Invalid(ProxyError, ValueError):
    """A field is missing, unknown or has a bad value; `detail` names the field."""

    code, status = "invalid_field", 422


class TooLarge(ProxyError, ValueError):
    code, status = "too_large", 413


class UnsupportedMediaType(ProxyError, ValueError):
    code, status = "unsupported_media_type", 415


class Unauthorized(ProxyError, PermissionError):
    code, status = "unauthorized", 401


class NotFound(ProxyError, LookupError):
    code, status = "not_found", 404


class Conflict(ProxyError):
    code, status = "conflict", 409


class TooManySubscriptions(Conflict):
    """A WebSocket already follows `ws.max_subscriptions` threads."""

    code = "too_many_subscriptions"


class PreconditionFailed(ProxyError):
    """If-Match named a version that is not the current one."""

    code, status = "precondition_failed", 412


class Unavailable(ProxyError, ConnectionError):
    """A dependency needed for this request is down; the client should retry later."""

    code, status = "unavailable", 503

    def __init__(self, message: str, retry_after_s: float = 1.0, detail: Any = None) -> None:
        super().__init__(message, detail)
        self.retry_after_s = retry_after_s


class RedisDown(Unavailable):
    """Redis did not answer a call. `sent` False: the call never left this process (no
    connection), so it cannot have run — a write may then be made in PostgreSQL instead."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class BackingDown(Unavailable):
    """The store below Redis (PostgreSQL) cannot be reached: only this lets a read fall to
    the degraded tier (ClickHouse, which lags). Redis failing during a read-through is not it:
    PostgreSQL still holds the truth, so that is a 503 to retry, never a lagging answer."""


class Backpressure(Unavailable):
    """The write-behind backlog is above its bound; the client should retry later."""

    code = "backpressure"


class RateLimited(ProxyError):
    """Over a rate (a thread's ephemeral events past ephemeral.rate_per_s and its burst):
    nothing was done; the client may retry after `retry_after_s` (429, Retry-After)."""

    code, status = "rate_limited", 429

    def __init__(self, message: str, retry_after_s: float, detail: Any = None) -> None:
        super().__init__(message, detail)
        self.retry_after_s = retry_after_s


class Resync(Conflict):
    """A changes position this thread cannot continue from (past its last cseq: a Redis that
    lost data, or erased history): start again from the current state; `detail` holds the
    thread's current `cseq`."""

    code = "resync"
