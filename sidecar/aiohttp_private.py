"""Every name of aiohttp's internals this code leans on, in one place, checked at start.

The connection rules (`connections.py`: the header timeout, malformed HTTP answered in JSON)
and the fast path's hand-over with aiohttp's handler (`transports/lane.py`) need more of
aiohttp's server than its API offers: the state of a connection's handler, its keep-alive
timer, how `AppRunner` makes its `Server`. pyproject allows any aiohttp 3.x, and none of
these names is promised to stay. So they are read and written here only, and `missing()`
checks them against the aiohttp installed: `server.Server.start` turns the fast path off
with one warning line when one the fast path needs is not as expected (everything is then
served by aiohttp's own handler, the reference path), and falls back to aiohttp's own
`AppRunner` when one the connections need is missing; never a crash at the first request.

`tests/test_aiohttp_private.py` pins the list against the aiohttp the tests run with.
"""

from __future__ import annotations

import asyncio
import email.utils
import sys
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web

try:  # the `Server` header aiohttp's answers carry; the same words if it moved
    from aiohttp.http import SERVER_SOFTWARE
except ImportError:  # pragma: no cover - another aiohttp
    _PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
    SERVER_SOFTWARE = f"Python/{_PYTHON} aiohttp/{aiohttp.__version__}"

try:  # the `Date` header's text, cached per second by aiohttp
    from aiohttp.helpers import rfc822_formatted_time
except ImportError:  # pragma: no cover - another aiohttp

    def rfc822_formatted_time() -> str:
        return email.utils.formatdate(usegmt=True)


# The handler's state the fast path reads and sets (`RequestHandler` keeps them in slots).
FAST_HANDLER_SLOTS = (
    "_waiter",
    "_messages",
    "_request_in_progress",
    "_payload_parser",
    "_upgraded",
    "_force_close",
    "_close",
    "_handler_waiter",
    "_keepalive_timeout",
    "_loop",
    "_next_keepalive_close_time",
    "_keepalive_handle",
)
FAST_HANDLER_METHODS = ("_process_keepalive",)
# What the connections need at all: requests begun (the header timeout), how the runner
# makes its server, and the server's settings for the handlers it makes.
HANDLER_SLOTS = ("_request_count",)
RUNNER_METHODS = ("_make_server",)
SERVER_ATTRIBUTES = ("_loop", "_kwargs", "request_handler", "request_factory")


def _slots(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())}


def _absent(cls: type, names: Iterable[str], *, slots: bool) -> list[str]:
    have = _slots(cls) if slots else set(dir(cls))
    return [f"{cls.__name__}.{name}" for name in names if name not in have]


def missing_for_connections() -> list[str]:
    """The names `connections.GuardedAppRunner` needs that this aiohttp lacks."""
    absent = _absent(web.RequestHandler, HANDLER_SLOTS, slots=True)
    absent += _absent(web.AppRunner, RUNNER_METHODS, slots=False)
    try:
        server = web.Server(_never, loop=asyncio.get_running_loop())
    except Exception:  # any failure means: not the Server this code knows
        return [*absent, "Server()"]
    absent += [f"Server.{name}" for name in SERVER_ATTRIBUTES if not hasattr(server, name)]
    return absent


def missing_for_fast_path() -> list[str]:
    """The names the fast path's hand-over with aiohttp's handler needs that it lacks."""
    absent = _absent(web.RequestHandler, FAST_HANDLER_SLOTS, slots=True)
    absent += _absent(web.RequestHandler, FAST_HANDLER_METHODS, slots=False)
    return absent


# What the upstream pool's check before reuse needs (`CheckedConnector`).
CONNECTOR_METHODS = ("_get",)


def missing_for_upstream() -> list[str]:
    """The names `CheckedConnector` needs that this aiohttp lacks."""
    return _absent(aiohttp.TCPConnector, CONNECTOR_METHODS, slots=False)


async def _never(request: web.BaseRequest) -> web.StreamResponse:  # pragma: no cover
    raise AssertionError("the check's server serves nothing")


# ---- the server's settings --------------------------------------------------------------------
def server_loop(server: web.Server) -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop = server._loop
    return loop


def server_kwargs(server: web.Server) -> dict[str, Any]:
    """What the server passes to every handler it makes (timeouts, limits, loggers)."""
    kwargs: dict[str, Any] = server._kwargs
    return kwargs


class Handler(web.RequestHandler):
    """aiohttp's per-connection handler, with what the connections ask of its state."""

    def requests_begun(self) -> int:
        """Requests whose head aiohttp parsed on this connection."""
        return self._request_count

    def idle(self) -> bool:
        """aiohttp's handler waits for a request and holds none of one."""
        waiter = self._waiter
        return (
            waiter is not None
            and not waiter.done()
            and not self._messages
            and not self._request_in_progress
            and self._payload_parser is None
            and not self._upgraded
            and not self._force_close
            and not self._close
        )

    def outside_begins(self) -> None:
        """A request is served beside aiohttp's handler: a graceful shutdown waits for it
        (`drain_timeout`) as for one of aiohttp's."""
        self._request_in_progress = True

    def outside_ended(self) -> None:
        """That request is answered: the connection is idle from now (the keep-alive timer
        counts from here, and a shutdown waiting for the handler goes on)."""
        self._request_in_progress = False
        if self._handler_waiter is not None and not self._handler_waiter.done():
            self._handler_waiter.set_result(None)
        if self._keepalive_timeout > 0 and not self._force_close:
            # The running timer re-arms itself for the new time.
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def busy_outside(self) -> bool:
        """Whether a request served beside aiohttp's handler is still being answered."""
        return False

    def _process_keepalive(self) -> None:
        if self.busy_outside() and not self._force_close:
            # aiohttp sees an idle handler, but an answer is being written: not idle.
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
            return
        super()._process_keepalive()


class Runner(web.AppRunner):
    """aiohttp's `AppRunner`, whose server is made by `wrap_server` from aiohttp's own."""

    def wrap_server(self, base: web.Server) -> web.Server:
        return base

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the application's startup
        return self.wrap_server(base)


class CheckedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, whose pooled plain-TCP connections are asked before reuse whether
    the upstream closed or wrote on them while idle (`upstream/idle.py`), as the fast path's
    are: one the loop has not yet seen closing would take the request and lose it. Such a
    connection is closed here, and aiohttp's own `_get` skips it as not connected. Where
    aiohttp keeps its pool otherwise (`_conns`), nothing is checked: its own rules stand."""

    def __init__(self, spoke: Callable[[Any], bool], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._spoke = spoke  # `upstream.idle.spoke_while_idle`: asked of a pooled socket

    async def _get(self, key: Any, traces: list[Any]) -> Any:
        conns = getattr(self, "_conns", None)
        pooled = conns.get(key) if isinstance(conns, dict) and not key.is_ssl else None
        for proto, _ in pooled or ():
            transport = proto.transport
            if transport is None or transport.is_closing():
                continue  # aiohttp's own `_get` drops it
            if not self._spoke(transport.get_extra_info("socket")):
                break  # the one `_get` takes next is sound
            proto.close()
        return await super()._get(key, traces)


__all__ = [
    "SERVER_SOFTWARE",
    "CheckedConnector",
    "Handler",
    "Runner",
    "missing_for_connections",
    "missing_for_fast_path",
    "missing_for_upstream",
    "rfc822_formatted_time",
    "server_kwargs",
    "server_loop",
]
