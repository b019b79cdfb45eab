"""A small HTTP/1.1 client on asyncio streams (one request per connection), enough for
waltap's JSON endpoints and Server-Sent Events; no dependencies."""

import asyncio
import ssl
from typing import AsyncIterator, Dict, Optional
from urllib.parse import urlsplit

from .errors import WaltapConnectionError

# Bounds on what a server may send in a response head.
MAX_HEAD_LINE = 16 * 1024
MAX_HEADERS = 100
# Bound on one JSON response body.
MAX_BODY = 16 * 1024 * 1024


class Response:
    def __init__(self, status: int, headers: Dict[str, str], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.status = status
        self.headers = headers
        self._reader = reader
        self._writer = writer

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, as it arrives (chunked transfer decoded)."""
        r = self._reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await r.readline()
                if not size_line:
                    raise WaltapConnectionError("the connection closed inside a chunked body")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    return
                data = await r.readexactly(size)
                await r.readexactly(2)
                yield data
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left > 0:
                data = await r.read(min(left, 65536))
                if not data:
                    raise WaltapConnectionError("the connection closed inside the body")
                left -= len(data)
                yield data
        else:
            while True:
                data = await r.read(65536)
                if not data:
                    return
                yield data

    async def read(self) -> bytes:
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk
            if len(out) > MAX_BODY:
                raise WaltapConnectionError("the response body is too large")
        return bytes(out)

    def close(self) -> None:
        self._writer.close()


async def request(method: str, url: str, headers: Dict[str, str], body: Optional[bytes] = None,
                  connect_timeout: float = 10.0) -> Response:
    """Sends one request and reads the response's head; the caller reads the body and
    closes the response."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl.create_default_context() if secure else None,
                                    limit=MAX_HEAD_LINE * 4),
            connect_timeout)
    except (OSError, asyncio.TimeoutError) as e:
        raise WaltapConnectionError(f"cannot connect to {host}:{port}: {e}") from e
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise WaltapConnectionError("the server closed the connection without answering")
        try:
            status = int(status_line.split(b" ", 2)[1])
        except (IndexError, ValueError) as e:
            raise WaltapConnectionError(f"not an HTTP response: {status_line[:80]!r}") from e
        response_headers: Dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            response_headers[name.strip().lower()] = value.strip()
        else:
            raise WaltapConnectionError("the response has too many headers")
        return Response(status, response_headers, reader, writer)
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        writer.close()
        raise WaltapConnectionError(f"connection lost: {e}") from e
    except BaseException:
        writer.close()
        raise


async def sse(response: Response, idle_timeout: float) -> AsyncIterator[Dict[str, Optional[str]]]:
    """Server-Sent Events (``event``, ``id``, ``data``) from a response; a connection silent
    for ``idle_timeout`` seconds (the server sends keepalives) is taken as dead."""
    buf = b""
    event, ident, data = "", None, []
    chunks = response.chunks().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), idle_timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError as e:
            raise WaltapConnectionError(f"nothing from the server for {idle_timeout} s") from e
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            raise WaltapConnectionError(f"connection lost: {e}") from e
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line = buf[:nl].rstrip(b"\r").decode("utf-8")
            buf = buf[nl + 1:]
            if line == "":
                if data:
                    yield {"event": event or "message", "id": ident, "data": "\n".join(data)}
                event, ident, data = "", None, []
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
                elif field == "id":
                    ident = value
