"""The real MCP server the integration tests put behind the sidecar.

Run as ``python -m tests.peers.upstream_server --port N --transport streamable-http|sse``
from the repository root. It is an unmodified FastMCP server of the MCP Python SDK with a
few tools the tests drive (``echo``, ``add``, ``live_sessions``, ``slow``, ``ping_client``),
an in-memory event store so ``Last-Event-ID`` resumption works, and an ASGI wrapper that
appends one JSON line per HTTP request (with the ``Authorization`` it arrived with, so a
test can tell whose request it was) to ``--log`` so a test can assert what reached the
upstream (and what did not) without trusting the sidecar's own account.

FastMCP 1.x reaps sessions itself after 30 idle minutes (and counts an open GET stream as
activity); that reaper is switched off here so only the sidecar ever expires a session.

``--transport both`` serves Streamable HTTP (``/mcp``) and the legacy transport (``/sse``,
``/messages/``) from one server, as FastMCP deployments that keep old clients working do.
``--sse-ping SECONDS`` makes every SSE stream carry a ``: ping`` comment that often (sse-starlette's
default is 15 s), for tests of "keepalives are not activity".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs

import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.types import JSONRPCMessage
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROGRESS_INTERVAL = 0.5


class InMemoryEventStore(EventStore):
    """Every event of every stream, in order, so a reconnecting client can be replayed.

    The SDK ships no event store in the package (only in its examples). Priming events
    (``message is None``) get an id, since the client resumes from them, but are never
    replayed: they carry no data.
    """

    def __init__(self) -> None:
        self._events: list[tuple[EventId, StreamId, JSONRPCMessage | None]] = []
        self._positions: dict[EventId, int] = {}
        self._ids = count(1)

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = str(next(self._ids))
        self._positions[event_id] = len(self._events)
        self._events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        position = self._positions.get(last_event_id)
        if position is None:
            return None
        stream_id = self._events[position][1]
        for event_id, event_stream, message in self._events[position + 1 :]:
            if event_stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


class SessionCounter:
    """Reads how many sessions the SDK transport holds, from the transport's own table.

    Private attributes, read on purpose: they are the server's real state, which is what
    a test of "the sidecar made the upstream free the session" has to look at.
    """

    def __init__(self, mcp: FastMCP) -> None:
        self._mcp = mcp
        self.sse: SseServerTransport | None = None

    def live(self) -> int:
        legacy = 0 if self.sse is None else len(self.sse._read_stream_writers)
        if self.sse is not None and self._mcp._session_manager is None:
            return legacy  # legacy transport only
        return legacy + len(self._mcp.session_manager._server_instances)


def find_sse_transport(app: Starlette) -> SseServerTransport:
    """The transport FastMCP.sse_app() keeps in a closure: its message route's bound method."""
    for route in app.routes:
        if isinstance(route, Mount):
            target = getattr(route, "_base_app", route.app)
            owner = getattr(target, "__self__", None)
            if isinstance(owner, SseServerTransport):
                return owner
    raise RuntimeError("FastMCP.sse_app() has no message route bound to an SseServerTransport")


def build_server(*, stateless: bool, json_response: bool) -> tuple[FastMCP, SessionCounter]:
    mcp = FastMCP(
        "sidecar-test-upstream",
        event_store=None if stateless else InMemoryEventStore(),
        host="127.0.0.1",
        log_level="WARNING",
        stateless_http=stateless,
        json_response=json_response,
        session_idle_timeout=None,
    )
    counter = SessionCounter(mcp)

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    def live_sessions() -> int:
        """How many sessions this server currently holds."""
        return counter.live()

    @mcp.tool()
    async def slow(seconds: float, ctx: Context[Any, Any, Any]) -> str:
        """Take `seconds`, reporting progress every 0.5 s, then answer "done"."""
        started = time.monotonic()
        while True:
            elapsed = min(time.monotonic() - started, seconds)
            await ctx.report_progress(elapsed, seconds, f"{elapsed:.1f}s of {seconds:.1f}s")
            if elapsed >= seconds:
                return "done"
            await asyncio.sleep(min(PROGRESS_INTERVAL, seconds - elapsed))

    # Session-scoped setup a resumed session must get again (SPEC 2.7): accepted, and logged
    # by the request log like every other request.
    @mcp._mcp_server.set_logging_level()  # type: ignore[misc]
    async def set_level(level: str) -> None:
        return None

    @mcp._mcp_server.subscribe_resource()  # type: ignore[misc]
    async def subscribe(uri: Any) -> None:
        return None

    @mcp._mcp_server.unsubscribe_resource()  # type: ignore[misc]
    async def unsubscribe(uri: Any) -> None:
        return None

    @mcp.tool()
    async def notify_me(ctx: Context[Any, Any, Any]) -> str:
        """Send a resource-list-changed notification on the session's GET stream."""
        await ctx.session.send_resource_list_changed()
        return "sent"

    @mcp.tool()
    async def ping_client(ctx: Context[Any, Any, Any]) -> str:
        """Send the client a server-initiated ping and answer "pong" once it replies."""
        await ctx.session.send_ping()
        return "pong"

    return mcp, counter


def _rpc_methods(body: bytes) -> list[str]:
    """The JSON-RPC methods a request body carried (responses have none), for the log."""
    try:
        data = json.loads(body) if body else []
    except ValueError:
        return []
    items = data if isinstance(data, list) else [data]
    return [m["method"] for m in items if isinstance(m, dict) and isinstance(m.get("method"), str)]


class RequestLog:
    """ASGI wrapper: one JSON line per HTTP request, written when the response starts.

    Written and flushed at response start (not end) so a long SSE stream is on record
    while it is still open.
    """

    def __init__(self, app: ASGIApp, file: IO[str]) -> None:
        self.app = app
        self.file = file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        session_id = (
            headers.get("mcp-session-id")
            or next(iter(query.get("session_id", [])), None)
            or next(iter(query.get("sessionId", [])), None)
        )

        started = False
        body = bytearray()

        async def recording_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(body) < 65536:
                body.extend(message.get("body", b""))
            return message

        async def logging_send(message: Message) -> None:
            nonlocal started
            # Only the first start: FastMCP's legacy SSE endpoint sends a second one (an
            # empty Response) after its stream has ended, which the server then drops.
            if message["type"] == "http.response.start" and not started:
                started = True
                response_headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1")
                    for k, v in message.get("headers", [])
                }
                self.write(
                    {
                        "method": scope["method"],
                        "path": scope["path"],
                        "session_id": session_id,
                        "status": message["status"],
                        "response_session_id": response_headers.get("mcp-session-id"),
                        "header_session_id": headers.get("mcp-session-id"),
                        "authorization": headers.get("authorization"),
                        "rpc_methods": _rpc_methods(bytes(body)),
                    }
                )
            await send(message)

        await self.app(scope, recording_receive, logging_send)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--transport", choices=["streamable-http", "sse", "both"], default="streamable-http"
    )
    parser.add_argument("--sse-ping", type=float, help="SSE keepalive comment interval (s)")
    parser.add_argument("--stateless", action="store_true", help="no sessions (stateless_http)")
    parser.add_argument("--json-response", action="store_true", help="JSON instead of SSE bodies")
    parser.add_argument("--log", type=Path, help="append one JSON line per HTTP request here")
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace) -> Starlette:
    mcp, counter = build_server(stateless=args.stateless, json_response=args.json_response)
    if args.transport == "sse":
        app = mcp.sse_app()
        counter.sse = find_sse_transport(app)
        return app
    app = mcp.streamable_http_app()  # its lifespan runs the Streamable HTTP session manager
    if args.transport == "both":
        legacy = mcp.sse_app()
        counter.sse = find_sse_transport(legacy)
        app.router.routes.extend(legacy.routes)  # /sse and /messages/ need no lifespan
    return app


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sse_ping is not None:
        EventSourceResponse.DEFAULT_PING_INTERVAL = args.sse_ping
    app: ASGIApp = build_app(args)
    log_file = args.log.open("a", encoding="utf-8") if args.log else None
    if log_file is not None:
        app = RequestLog(app, log_file)
    # A bounded graceful shutdown: open SSE streams would otherwise hold SIGTERM up forever.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, log_level="warning", timeout_graceful_shutdown=2
    )
    try:
        asyncio.run(uvicorn.Server(config).serve())
    finally:
        if log_file is not None:
            log_file.close()


if __name__ == "__main__":
    main()
