"""A cap on the connections one client address holds open, so that a greedy or slowloris
client cannot take every file descriptor and event-loop slot of the front door.

Counted per connection, not per request: idle keep-alive and half-sent requests count too,
which is what such a client holds. A connection past the cap is answered 429 in the route's
dialect (`Retry-After`) as soon as its request arrives, then closed; one that sends nothing
is closed after `GRACE_S`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from ingest.context import begin_request
from ingest.problems import TooManyConnectionsError

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

    from ingest.problems import Handler
    from shared.settings import Settings

# How long a connection past the cap may take to send its request before it is just closed.
GRACE_S = 2.0
LINGER_S = 2.0  # how long an early answer waits for the rest of a body (handler_args)


class ConnectionLimiter:
    """Open connections by client address; `per_address` 0 means no cap."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._open: dict[str, int] = {}
        self._address: dict[RequestHandler, str] = {}
        self._over: dict[RequestHandler, asyncio.TimerHandle] = {}

    def open_count(self, address: str) -> int:
        return self._open.get(address, 0)

    def attach(self, server: web.Server) -> None:
        """Count the connections of `server` (a runner's, once set up).

        aiohttp gives no hook per connection but the server's own bookkeeping calls, which
        every RequestHandler makes: wrap those.
        """
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._opened(handler, transport)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            lost(handler, exc)
            self._closed(handler)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _opened(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        address = _address(transport)
        if address is None or not self.per_address:
            return
        count = self._open.get(address, 0) + 1
        self._open[address] = count
        self._address[handler] = address
        if count > self.per_address:
            loop = asyncio.get_running_loop()
            self._over[handler] = loop.call_later(GRACE_S, handler.force_close)

    def _closed(self, handler: RequestHandler) -> None:
        timer = self._over.pop(handler, None)
        if timer is not None:
            timer.cancel()
        address = self._address.pop(handler, None)
        if address is None:
            return
        count = self._open[address] - 1
        if count:
            self._open[address] = count
        else:
            del self._open[address]  # the map holds only addresses with open connections

    def check(self, request: web.Request) -> None:
        """Raises:
        TooManyConnectionsError: the request came on a connection past the cap.
        """
        timer = self._over.pop(request.protocol, None)
        if timer is None:
            return
        timer.cancel()
        begin_request(request)  # a request id, as every answer has
        raise TooManyConnectionsError(
            f"more than {self.per_address} open connections from your address; "
            "close idle ones or reuse them",
            headers={"Retry-After": "1"},
        )


CONNECTIONS = web.AppKey("connections", ConnectionLimiter)


def install(app: web.Application, settings: Settings) -> ConnectionLimiter:
    """Put a limiter on `app` and refuse requests of connections past the cap. The runner
    that serves `app` must `attach` it (ingest.server does)."""
    limiter = app[CONNECTIONS] = ConnectionLimiter(settings.max_connections_per_ip)

    @web.middleware
    async def refuse_over_cap(request: web.Request, handler: Handler) -> web.StreamResponse:
        limiter.check(request)
        return await handler(request)

    # Last, so inside problems_middleware: the 429 is written in the route's dialect.
    app.middlewares.append(refuse_over_cap)
    return limiter


def _address(transport: asyncio.Transport) -> str | None:
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return None  # a Unix socket: nobody to count
    host = str(peer[0])
    # An IPv4 client on a dual-stack socket is one client, however it is written.
    return host.removeprefix("::ffff:")


def handler_args(settings: Settings) -> dict[str, object]:
    """aiohttp's per-connection limits: header sizes, and how long a connection may wait for
    a request's headers (from its opening or its previous answer) before it is closed."""
    return {
        "keepalive_timeout": settings.keepalive_timeout_s,
        "max_line_size": settings.max_header_bytes,
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        # After an early answer (413, 408, 429) aiohttp reads on what the client still sends,
        # so that it sees the answer rather than a reset; 10 s by default, which lets a slow
        # client hold the connection that much longer.
        "lingering_time": LINGER_S,
    }
