"""The error tree. No HTTP here: routes.py maps each class to a status and a code."""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    """Base of every error a client may see; `code` is the stable machine-readable name."""

    code = "internal"

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class Malformed(ProxyError, ValueError):
    """The request cannot be parsed (bad JSON, bad query parameter)."""

    code = "malformed"


class Invalid(ProxyError, ValueError):
    """A field is missing, unknown or has a bad value; `detail` names the field."""

    code = "invalid_field"


class TooLarge(ProxyError, ValueError):
    code = "too_large"


class UnsupportedMediaType(ProxyError, ValueError):
    code = "unsupported_media_type"


class Unauthorized(ProxyError, PermissionError):
    code = "unauthorized"


class NotFound(ProxyError, LookupError):
    code = "not_found"


class Conflict(ProxyError):
    code = "conflict"


class PreconditionFailed(ProxyError):
    """If-Match named a version that is not the current one."""

    code = "precondition_failed"


class Unavailable(ProxyError, ConnectionError):
    """A dependency needed for this request is down; the client should retry later."""

    code = "unavailable"

    def __init__(self, message: str, retry_after_s: float = 1.0, detail: Any = None) -> None:
        super().__init__(message, detail)
        self.retry_after_s = retry_after_s


class Backpressure(Unavailable):
    """The write-behind backlog is above its bound; the client should retry later."""

    code = "backpressure"
