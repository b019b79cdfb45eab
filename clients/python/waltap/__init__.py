"""waltap: typed Postgres change events over HTTP, for asyncio.

    import asyncio, waltap

    async def main():
        client = waltap.Client("http://127.0.0.1:7373", key="orders-reader-7f3a9c")
        async for ev in client.stream("billing"):
            if ev.type == "change":
                print(ev["action"], ev.get("after") or ev.get("created"))
            await ev.ack()

    asyncio.run(main())
"""

from .client import Client, Item
from .errors import (LaggedError, StaleCursorError, StreamBusyError, TokenExpiredError,
                     UnauthorizedError, WaltapConnectionError, WaltapError, error_from)

__all__ = [
    "Client", "Item", "WaltapError", "UnauthorizedError", "TokenExpiredError",
    "StaleCursorError", "StreamBusyError", "LaggedError", "WaltapConnectionError", "error_from",
]
__version__ = "0.1.0"
