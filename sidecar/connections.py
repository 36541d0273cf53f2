"""Client connections below the request handlers: slow heads and malformed HTTP (SPEC 2.5).

aiohttp parses requests before any handler of ours runs, so two rules need its connection
class rather than a handler:

* **Header timeout.** A client that opens a connection and trickles its request head (a
  slowloris) holds a socket and a parser buffer for as long as it likes. A connection that
  has not delivered one complete request head within `server.header_timeout` is closed.
  Later requests on a kept-alive connection are bounded by `server.keepalive_timeout`, which
  aiohttp applies to a connection that is waiting for its next request head.
* **Malformed HTTP.** aiohttp answers a request it cannot parse (a header line over 8 KiB, bad
  framing, an invalid method) with a text/plain 400 and logs a full traceback, so anyone could
  flood the journal. Here the answer is a JSON body, the log is one throttled line without a
  traceback, and `rejected_total{reason="malformed_http"}` counts it.

The connection is also where the fast path (`transports/lane.py`, `transports/fast.py`)
takes a live session's POST before aiohttp parses it; what it does not take reaches aiohttp
byte for byte. While it serves one, aiohttp's handler sits idle: its keep-alive timer must
not close the connection, and a graceful shutdown waits for the answer as for its own.

The class names below follow aiohttp's (`Server` makes one `RequestHandler` per connection).
What they need of aiohttp's internals is in `aiohttp_private.py`, checked at start
(`proxy_runner`): with another aiohttp whose internals differ, the fast path is off, or
aiohttp's own runner serves, with one warning line.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from . import aiohttp_private, jsonrpc
from .aiohttp_private import Handler, Runner, server_kwargs, server_loop
from .log import Throttled
from .transports.lane import Lane

if TYPE_CHECKING:
    from .transports.fast import FastPath

log = logging.getLogger("sidecar.connections")

Count = Callable[[str], None]


class ClientConnection(Handler):
    """One client connection, with the header timeout and the quiet malformed-HTTP answer."""

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout: float,
        guard: ConnectionGuard,
        fast: FastPath | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._guard = guard
        self._fast = fast
        self._lane: Lane | None = None
        self._fast_busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._header_timeout > 0:
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self._header_timeout, self._head_too_slow)
        # Decided per connection: one opened while the switch is off stays on the full path.
        if self._fast is not None and self._fast.enabled:
            peer = transport.get_extra_info("peername")
            remote = str(peer[0]) if isinstance(peer, (list, tuple)) else peer
            scheme = "https" if transport.get_extra_info("sslcontext") else "http"
            self._lane = Lane(self, self._fast, remote, scheme)
            # aiohttp sets TCP_NODELAY when it writes its first answer; the fast path writes
            # without it, and Nagle's algorithm would hold an SSE answer's later small writes.
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._lane is None:
            self.hand_over(data)
        else:
            self._lane.feed(data)

    def hand_over(self, data: bytes) -> None:
        """Bytes for aiohttp's own parser and handler."""
        super().data_received(data)
        if self._header_timer is not None and self.requests_begun() > 0:
            self._header_timer.cancel()  # a whole request head arrived
            self._header_timer = None

    def fast_begins(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()  # a whole request head arrived
            self._header_timer = None
        self._fast_busy = True
        self.outside_begins()

    def fast_ended(self) -> None:
        self._fast_busy = False
        self.outside_ended()

    def busy_outside(self) -> bool:
        return self._fast_busy

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._lane is not None:
            self._lane.pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._lane is not None:
            self._lane.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._lane is not None:
            self._lane.lost()
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._header_timer = None
        if self.requests_begun() == 0:
            self._guard.slow_head(self._header_timeout)
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        self._guard.malformed(request.remote, status, exc)
        response = web.Response(
            status=status,
            content_type="application/json",
            body=jsonrpc.error_body(
                jsonrpc.INVALID_REQUEST, f"Malformed HTTP request: {_reason(exc, message)}"
            ),
        )
        response.force_close()
        return response


def _reason(exc: BaseException | None, message: str | None) -> str:
    text = getattr(exc, "message", None) or message or type(exc).__name__
    return str(text).splitlines()[0][:200] if text else "unreadable request"


class ConnectionGuard:
    """What the connections report: one throttled line each, and a count."""

    def __init__(self, count: Count) -> None:
        self._count = count
        self._log = Throttled(log)

    def malformed(self, peer: str | None, status: int, exc: BaseException | None) -> None:
        self._count("malformed_http")
        self._log.info(
            "malformed",
            "rejected malformed HTTP from %s status=%d (%s)",
            peer or "-",
            status,
            _reason(exc, None),
        )

    def slow_head(self, timeout: float) -> None:
        self._count("header_timeout")
        self._log.info(
            "slow_head",
            "closed a connection that sent no complete request head within %gs "
            "(server.header_timeout)",
            timeout,
        )


class GuardedServer(web.Server):
    """aiohttp's per-listener connection factory, making `ClientConnection`s."""

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        guard: ConnectionGuard,
        fast: FastPath | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._guard = guard
        self._fast = fast

    def __call__(self) -> web.RequestHandler:
        return ClientConnection(
            self,
            loop=server_loop(self),
            header_timeout=self._header_timeout,
            guard=self._guard,
            fast=self._fast,
            **server_kwargs(self),
        )


class GuardedAppRunner(Runner):
    """An AppRunner whose connections are `ClientConnection`s."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        guard: ConnectionGuard,
        fast: FastPath | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._guard = guard
        self._fast = fast

    def wrap_server(self, base: web.Server) -> web.Server:
        return GuardedServer(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=server_loop(base),
            header_timeout=self._header_timeout,
            guard=self._guard,
            fast=self._fast,
            **server_kwargs(base),
        )


def proxy_runner(
    app: web.Application,
    *,
    header_timeout: float,
    guard: ConnectionGuard,
    fast: FastPath | None,
    **kwargs: Any,
) -> web.AppRunner:
    """The proxy listener's runner, as far as the aiohttp installed allows
    (`aiohttp_private`): connections with the header timeout, the quiet malformed-HTTP
    answer and the fast path; without the fast path when the names its hand-over with
    aiohttp's handler needs are not there; aiohttp's own runner when even the connections'
    are not. One warning line says which, and why."""
    absent = aiohttp_private.missing_for_connections()
    if absent:
        log.warning(
            "aiohttp %s lacks what the sidecar's connections use (%s): the fast path, "
            "server.header_timeout and the JSON answer to malformed HTTP are off",
            aiohttp.__version__,
            ", ".join(absent),
        )
        return web.AppRunner(app, **kwargs)
    if fast is not None and (absent := aiohttp_private.missing_for_fast_path()):
        log.warning(
            "aiohttp %s lacks what the fast path uses (%s): server.fast_path is off, "
            "every request takes the full path",
            aiohttp.__version__,
            ", ".join(absent),
        )
        fast = None
    return GuardedAppRunner(app, header_timeout=header_timeout, guard=guard, fast=fast, **kwargs)


def admin_runner(
    app: web.Application, *, header_timeout: float, guard: ConnectionGuard, **kwargs: Any
) -> web.AppRunner:
    """The admin listener's runner: guarded as the proxy's (a head aiohttp refuses answered
    in JSON and counted, a slow head cut), or aiohttp's own where the installed aiohttp
    lacks what that needs (`proxy_runner`'s warning has said so already)."""
    if aiohttp_private.missing_for_connections():
        return web.AppRunner(app, **kwargs)
    return GuardedAppRunner(app, header_timeout=header_timeout, guard=guard, fast=None, **kwargs)
