"""Typed errors: every failure the server reports carries its stable ``code``."""

from typing import Any, Mapping, Optional


class WaltapError(Exception):
    """Every error the client raises. ``code`` is the server's error code, ``status`` the
    HTTP status when the error came as a response."""

    code = "internal"

    def __init__(self, message: str, code: Optional[str] = None, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.status = status


class UnauthorizedError(WaltapError):
    code = "unauthorized"


class TokenExpiredError(WaltapError):
    code = "token_expired"


class StaleCursorError(WaltapError):
    """The stream's cursor is behind what retention deleted. ``advice`` says what to do:
    ``await client.reset_stream(name, initial_state=True)``."""

    code = "stale_cursor"

    def __init__(self, message: str, code: Optional[str] = None, status: Optional[int] = None,
                 stream: Optional[str] = None):
        super().__init__(message, code, status)
        self.stream = stream
        self.advice = message


class StreamBusyError(WaltapError):
    """Another consumer holds the stream's lease."""

    code = "stream_busy"


class LaggedError(WaltapError):
    """A subscription fell behind by more than its queue and was cut off."""

    code = "lagged"


class WaltapConnectionError(WaltapError):
    """The connection failed or dropped (raised where resuming could lose events)."""

    code = "connection"


_CLASSES = {
    "unauthorized": UnauthorizedError,
    "token_expired": TokenExpiredError,
    "stale_cursor": StaleCursorError,
    "stream_busy": StreamBusyError,
    "lagged": LaggedError,
}

# Codes after which connecting again can succeed without the caller doing anything.
TRANSIENT = frozenset({
    "shutting_down", "source_unavailable", "source_interrupted", "server_busy",
    "too_many_connections", "internal", "connection",
})


def error_from(body: Any, status: Optional[int] = None, stream: Optional[str] = None) -> WaltapError:
    """The typed error for a server error object ``{"code", "message"}``."""
    body = body if isinstance(body, Mapping) else {}
    code = body.get("code") if isinstance(body.get("code"), str) else "internal"
    message = body.get("message") if isinstance(body.get("message"), str) else f"HTTP {status}"
    cls = _CLASSES.get(code)
    if cls is StaleCursorError:
        return StaleCursorError(message, code, status, stream=stream)
    if cls is not None:
        return cls(message, code, status)
    return WaltapError(message, code, status)


def is_transient(e: BaseException) -> bool:
    return isinstance(e, WaltapError) and (
        e.code in TRANSIENT or (e.status is not None and e.status >= 500))
