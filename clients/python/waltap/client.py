"""The waltap client: subscriptions and persisted streams over Server-Sent Events, stream
management and tokens, on asyncio with no dependencies."""

import asyncio
import inspect
import json
import time
from typing import (Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Union)
from urllib.parse import quote, urlencode

from . import _http
from .errors import (StreamBusyError, TokenExpiredError, WaltapConnectionError, WaltapError,
                     error_from, is_transient)

TokenSource = Union[str, Callable[[], Union[str, Awaitable[str]]]]


class Item(dict):
    """One delivered item: the wire's JSON object (a dict), plus ``type`` (``change``,
    ``snapshot``, ``initialized``, ``snapshotComplete``, ``completed``, ``schemaChange``),
    ``cursor`` (the position or ``snapshot-<seq>`` after it; None for markers) and
    ``await ack()``."""

    type: str
    cursor: Optional[str]

    def __init__(self, data: Dict[str, Any], type_: str, cursor: Optional[str],
                 ack: Optional[Callable[[], Awaitable[None]]] = None):
        super().__init__(data)
        self.type = type_
        self.cursor = cursor
        self._ack = ack

    async def ack(self) -> None:
        """Acknowledges this item and every one before it (streams; a no-op elsewhere).
        An ack the server cannot take at once (the connection just dropped) is sent with
        the next connection (``Last-Event-ID``)."""
        if self._ack is not None:
            await self._ack()


def _parse_error(text: bytes) -> Any:
    try:
        body = json.loads(text)
        return body.get("error", body) if isinstance(body, dict) else None
    except ValueError:
        return {"code": "internal", "message": text.decode("utf-8", "replace")[:200]}


class Client:
    """A client of one waltap server. Server-side code passes ``key`` (an API key);
    code running for an end user passes ``token`` (from ``create_token``), or a function
    returning a fresh one, called again when the server says ``token_expired``.

    ``int8="string"`` delivers int8 values as decimal strings. Reconnects wait
    ``backoff[0]`` seconds doubling to ``backoff[1]``; ``stream_busy`` is retried for
    ``busy_timeout`` seconds (longer than the server's 30 s lease by default, so the lease
    of a consumer that died expires); a connection silent for ``idle_timeout`` seconds is
    opened again (the server sends keepalives every 15 s)."""

    def __init__(self, url: str, key: Optional[str] = None, token: Optional[TokenSource] = None,
                 int8: str = "number", backoff: "tuple[float, float]" = (0.25, 30.0),
                 busy_timeout: float = 35.0, idle_timeout: float = 45.0):
        if int8 not in ("number", "string"):
            raise ValueError('int8 must be "number" or "string"')
        self.url = url.rstrip("/")
        self.key = key
        self.token = token
        self.int8 = int8
        self.backoff = backoff
        self.busy_timeout = busy_timeout
        self.idle_timeout = idle_timeout
        self._current_token: Optional[str] = None

    async def _token(self, refresh: bool) -> Optional[str]:
        if callable(self.token):
            if refresh or self._current_token is None:
                value = self.token()
                self._current_token = await value if inspect.isawaitable(value) else value
            return self._current_token
        return self.token

    async def _target(self, path: str, params: Dict[str, Any], refresh: bool = False):
        query = {k: v for k, v in params.items() if v is not None}
        headers = {}
        if self.key is not None:
            headers["Authorization"] = f"Bearer {self.key}"
        else:
            token = await self._token(refresh)
            if token is not None:
                query["token"] = token
        url = self.url + path + ("?" + urlencode(query) if query else "")
        return url, headers

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        url, headers = await self._target(path, {})
        headers["Accept"] = "application/json"
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        response = await _http.request(method, url, headers, data)
        try:
            text = await response.read()
        finally:
            response.close()
        if response.status >= 400:
            raise error_from(_parse_error(text), response.status)
        return json.loads(text) if text else None

    # Management (needs a key).

    async def create_stream(self, name: str, table: str, filter: Any = None,
                            initial_state: bool = False, from_position: Optional[str] = None) -> Dict[str, Any]:
        body: Dict[str, Any] = {"name": name, "table": table, "initialState": initial_state}
        if filter is not None:
            body["filter"] = filter
        if from_position is not None:
            body["from"] = from_position
        return await self._json("POST", "/v1/streams", body)

    async def list_streams(self) -> List[Dict[str, Any]]:
        return (await self._json("GET", "/v1/streams"))["streams"]

    async def get_stream(self, name: str) -> Dict[str, Any]:
        return await self._json("GET", f"/v1/streams/{quote(name, safe='')}")

    async def delete_stream(self, name: str) -> None:
        await self._json("DELETE", f"/v1/streams/{quote(name, safe='')}")

    async def reset_stream(self, name: str, initial_state: bool = False) -> Dict[str, Any]:
        """Moves the cursor to the log's head (after ``StaleCursorError``); with
        ``initial_state`` the stream starts over with the current rows."""
        return await self._json("POST", f"/v1/streams/{quote(name, safe='')}/reset",
                                {"initialState": initial_state})

    async def create_token(self, table: Optional[str] = None, filter: Any = None,
                           stream: Optional[str] = None, position: Optional[str] = None,
                           ttl_seconds: int = 3600) -> Dict[str, Any]:
        """A token for one table (and filter) or one stream: ``{"token", "expiresAt"}``."""
        body: Dict[str, Any] = {"ttlSeconds": ttl_seconds}
        for k, v in (("table", table), ("filter", filter), ("stream", stream), ("position", position)):
            if v is not None:
                body[k] = v
        return await self._json("POST", "/v1/tokens", body)

    # Delivery.

    async def _deliver(self, path: str, params: Dict[str, Any], resume: Callable[[], Optional[str]],
                       reconnect: bool, stream: Optional[str]) -> AsyncIterator[Dict[str, Any]]:
        delay = self.backoff[0]
        busy_since: Optional[float] = None
        refresh = False
        opened = False
        while True:
            response = None
            try:
                url, headers = await self._target(path, params, refresh)
                headers["Accept"] = "text/event-stream"
                last = resume()
                if last:
                    headers["Last-Event-ID"] = last
                response = await _http.request("GET", url, headers)
                if response.status >= 400:
                    raise error_from(_parse_error(await response.read()), response.status, stream)
                opened, refresh, busy_since = True, False, None
                async for frame in _http.sse(response, self.idle_timeout):
                    delay = self.backoff[0]
                    if frame["event"] == "error":
                        raise error_from(_parse_error((frame["data"] or "").encode()), None, stream)
                    yield frame
                    if frame["event"] == "completed":
                        return
                failure: WaltapError = WaltapConnectionError("the server closed the connection")
            except WaltapError as e:
                failure = e
            except (OSError, ValueError, asyncio.IncompleteReadError) as e:
                failure = WaltapConnectionError(f"connection lost: {e}")
            finally:
                if response is not None:
                    response.close()
            if isinstance(failure, TokenExpiredError) and callable(self.token) and not refresh:
                refresh = True
                continue
            if isinstance(failure, StreamBusyError):
                busy_since = busy_since if busy_since is not None else time.monotonic()
                if time.monotonic() - busy_since >= self.busy_timeout:
                    raise failure
            elif not is_transient(failure) or (opened and not reconnect):
                raise failure
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def subscribe(self, table: Optional[str] = None, filter: Any = None,
                        initial_state: bool = False, int8: Optional[str] = None) -> AsyncIterator[Item]:
        """An ephemeral subscription, at-most-once from now on: ``initialized``, then
        (with ``initial_state``) the current rows and ``snapshotComplete``, then changes. A
        dropped connection raises ``WaltapConnectionError`` (subscribe again for a fresh
        start), a slow reader ``LaggedError``. With a token, ``table`` and ``filter`` come
        from the token."""
        params = {"initialState": "true" if initial_state else None,
                  "int8": "string" if (int8 or self.int8) == "string" else None}
        if self.key is not None:
            params["table"] = table
            params["filter"] = json.dumps(filter) if filter is not None else None
        async for frame in self._deliver("/v1/subscribe", params, lambda: None, False, None):
            yield Item(json.loads(frame["data"] or "{}"), frame["event"] or "", frame["id"] or None)

    async def stream(self, name: str, cursor: Optional[str] = None,
                     int8: Optional[str] = None) -> AsyncIterator[Item]:
        """A persisted stream, at-least-once: resumes after the last acknowledged item (or
        ``cursor``), reconnecting with backoff; what was not acknowledged comes again after
        a reconnect, nothing acknowledged does. Raises ``StaleCursorError``,
        ``StreamBusyError`` (after ``busy_timeout``), ``UnauthorizedError``,
        ``TokenExpiredError``."""
        state = {"acked": cursor, "acked_index": -1, "delivered": 0}
        path = f"/v1/streams/{quote(name, safe='')}"
        params = {"int8": "string" if (int8 or self.int8) == "string" else None}

        def make_ack(position: str) -> Callable[[], Awaitable[None]]:
            index = state["delivered"]
            state["delivered"] += 1

            async def ack() -> None:
                if index <= state["acked_index"]:
                    return
                state["acked_index"] = index
                state["acked"] = position
                try:
                    await self._json("POST", f"{path}/ack", {"position": position})
                except WaltapError as e:
                    # Not taken now: the next connection sends it as Last-Event-ID.
                    if is_transient(e) or isinstance(e, StreamBusyError):
                        return
                    raise
            return ack

        async for frame in self._deliver(path, params, lambda: state["acked"], True, name):
            ident = frame["id"] or None
            yield Item(json.loads(frame["data"] or "{}"), frame["event"] or "", ident,
                       make_ack(ident) if ident else None)
