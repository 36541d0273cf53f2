"""Paths the exact routes did not claim: which transport's rules they get (no side doors).

Upstreams match routes loosely (Express: any case, a trailing `/`; Starlette mounts: any
sub-path), so a path the upstream could take for its MCP, SSE or message endpoint gets that
endpoint's handler, and a request naming a session gets its session's rules on any path.
Only what is left passes through untouched (OAuth metadata, health pages).
"""

from __future__ import annotations

from aiohttp import web

from ..errors import UpstreamError
from ..gate import Route, names_legacy_session, route_of
from ..intake import Rejected, RequestTimer
from ..upstream import SESSION_HEADER
from .forwarder import Dispatch, Forwarder
from .legacy import LegacySse
from .streamable import StreamableHttp


class Router:
    def __init__(self, forwarder: Forwarder, streamable: StreamableHttp, legacy: LegacySse) -> None:
        self.fw = forwarder
        self.streamable = streamable
        self.legacy = legacy

    async def handle_mcp(self, request: web.Request) -> web.StreamResponse:
        """The exact MCP routes: a session named in the query gets its rules here too."""
        dispatch = self.dispatch_for(Route.MCP, request)
        assert dispatch is not None  # the MCP route always has a handler
        return await self.fw.handle(request, dispatch)

    async def handle_passthrough(self, request: web.Request) -> web.StreamResponse:
        options = self.fw.options
        route = route_of(request.path, options.mcp_path, options.sse_path, options.messages_path)
        dispatch = self.dispatch_for(route, request)
        if dispatch is not None:
            return await self.fw.handle(request, dispatch)
        timer = RequestTimer()
        try:
            self.fw.check(request)
            return await self.streamable.passthrough(request, timer)
        except Rejected as rejection:
            return await self.fw.reject(request, rejection)
        except UpstreamError as exc:
            return await self.fw.upstream_failed(request, b"", exc)

    def dispatch_for(self, route: Route | None, request: web.Request) -> Dispatch | None:
        """The session-checking handler for a path the exact routes missed, if it needs one."""
        if route is Route.SSE:
            return self.legacy.open_stream
        if route is Route.MESSAGE or names_legacy_session(request):
            return self.legacy.post
        if route is Route.MCP or SESSION_HEADER in request.headers:
            return self.streamable.dispatch
        return None
