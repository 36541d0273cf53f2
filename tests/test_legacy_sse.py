"""The legacy HTTP+SSE transport (2024-11-05) through the sidecar, under the same lifecycle.

A real FastMCP server in SSE mode (or serving both transports at once; a small in-test fake
for two legal server habits the SDK servers lack), the real sidecar process, and either the MCP
Python SDK's ``sse_client`` or a hand-held stream for what the SDK hides (the exact
``endpoint`` event, keepalive comments, when the stream ends). Each test checks what the
client saw, what reached the upstream (its own request log and session table) and what the
sidecar committed to SQLite. SPEC 2.2 and 2.3; "what is not activity" on both transports.
The TypeScript SDK's legacy client is in ``test_typescript_interop.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
from aiohttp import web
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.shared.exceptions import McpError
from mcp.shared.message import SessionMessage

from tests.peers.mcp_clients import (
    CALL_TIMEOUT,
    RawSession,
    eventually,
    live_sessions,
    not_found_body,
    sdk_session,
    session_row,
    text_of,
)
from tests.peers.processes import HOST, SidecarFactory, SidecarHandle, UpstreamHandle, free_port

IDLE = 2.0
SWEEP = 0.25
FLUSH = 0.2
# Expiry is enforced by a sweep at most SWEEP after the deadline; the rest is process latency.
EXPIRY_SLACK = SWEEP + 1.5
PROTOCOL_VERSION = "2025-11-25"


def legacy_sidecar(
    factory: SidecarFactory, upstream_url: str, idle: float = IDLE, **sections: Any
) -> SidecarHandle:
    sessions = {"idle_timeout": idle, "sweep_interval": SWEEP, **sections.pop("sessions", {})}
    return factory(upstream_url, sessions=sessions, store={"flush_interval": FLUSH}, **sections)


def row_of(sidecar: SidecarHandle, session_id: str) -> dict[str, Any]:
    row = session_row(sidecar.db_path, session_id)
    assert row is not None, f"no row for {session_id}\n{sidecar.output()}"
    return row


async def closed_row(sidecar: SidecarHandle, session_id: str) -> dict[str, Any]:
    """The session's row once closed: the close flips memory (and cuts streams) first, and
    commits a moment later."""

    def closed() -> dict[str, Any] | None:
        row = session_row(sidecar.db_path, session_id)
        return row if row is not None and row["state"] == "closed" else None

    found: dict[str, Any] = await eventually(closed, what=f"session {session_id} closed")
    return found


def rpc(method: str, request_id: int | None = None, **params: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
    if request_id is not None:
        message["id"] = request_id
    return message


def initialize_message(request_id: int = 1) -> dict[str, Any]:
    return rpc(
        "initialize",
        request_id,
        protocolVersion=PROTOCOL_VERSION,
        capabilities={},
        clientInfo={"name": "legacy-test", "version": "1.0"},
    )


# ---- an SDK client whose stream end the test can see ----------------------------------------


@dataclass
class Legacy:
    """An initialized SDK session over the legacy transport, and whether its stream ended."""

    session: ClientSession
    session_id: str
    stream_ended: asyncio.Event


@contextlib.asynccontextmanager
async def legacy_session(sse_url: str) -> AsyncIterator[Legacy]:
    """``sse_client`` + ``ClientSession``, with the SSE reader's end made visible.

    ``sse_client`` only closes its read stream when the SSE stream ends; the ClientSession
    swallows that. A tap between the two sets ``stream_ended``.
    """
    created: list[str] = []
    ended = asyncio.Event()
    async with sse_client(
        sse_url, timeout=5, sse_read_timeout=60, on_session_created=created.append
    ) as (read, write):
        tap_send, tap_receive = anyio.create_memory_object_stream[SessionMessage | Exception](16)

        async def tap() -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                async with tap_send:
                    async for item in read:
                        await tap_send.send(item)
            ended.set()

        async with anyio.create_task_group() as tasks, tap_receive:
            tasks.start_soon(tap)
            try:
                async with ClientSession(
                    tap_receive, write, read_timeout_seconds=CALL_TIMEOUT
                ) as session:
                    await session.initialize()
                    assert len(created) == 1
                    yield Legacy(session, created[0], ended)
            finally:
                tasks.cancel_scope.cancel()


# ---- a stream held by hand ------------------------------------------------------------------


@dataclass
class HeldStream:
    """A GET stream read event by event: its events, its keepalive comments, its end."""

    events: asyncio.Queue[dict[str, str]] = field(default_factory=asyncio.Queue)
    comments: int = 0
    status: int | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float | None = None
    task: asyncio.Task[None] | None = None

    async def _run(self, http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
        buffer = ""
        try:
            async with http.stream("GET", url, headers=headers) as response:
                self.status = response.status_code
                self.opened.set()
                async for text in response.aiter_text():
                    buffer += text.replace("\r\n", "\n")
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        self._block(block)
        except httpx.HTTPError:
            pass  # the end of the stream is what the tests look at
        finally:
            self.ended_at = time.monotonic()
            self.opened.set()
            self.ended.set()

    def _block(self, block: str) -> None:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = f"{fields[name]}\n{value}" if name in fields else value
        if fields:
            self.events.put_nowait(fields)

    async def next_event(self, within: float = 10.0) -> dict[str, str]:
        async with asyncio.timeout(within):
            return await self.events.get()

    async def next_message(self, within: float = 10.0) -> dict[str, Any]:
        while True:
            event = await self.next_event(within)
            if event.get("data"):
                message: dict[str, Any] = json.loads(event["data"])
                return message

    async def wait_ended(self, within: float) -> float:
        async with asyncio.timeout(within):
            await self.ended.wait()
        assert self.ended_at is not None
        return self.ended_at


@contextlib.asynccontextmanager
async def held_stream(
    http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[HeldStream]:
    stream = HeldStream()
    stream.task = asyncio.create_task(
        stream._run(http, url, {"Accept": "text/event-stream", **(headers or {})})
    )
    try:
        async with asyncio.timeout(10):
            await stream.opened.wait()
        yield stream
    finally:
        stream.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream.task


@dataclass
class RawLegacy:
    """One legacy session by hand: the stream, the endpoint it named, POSTs to that endpoint."""

    http: httpx.AsyncClient
    base: str
    stream: HeldStream
    endpoint: str

    @property
    def session_id(self) -> str:
        query = parse_qs(urlsplit(self.endpoint).query)
        return (query.get("session_id") or query["sessionId"])[0]

    async def post(self, message: dict[str, Any]) -> httpx.Response:
        return await self.http.post(self.base + self.endpoint, json=message)

    async def initialize(self) -> None:
        assert (await self.post(initialize_message())).status_code == 202
        answer = await self.stream.next_message()
        assert answer["id"] == 1
        assert "result" in answer, answer
        assert (await self.post(rpc("notifications/initialized"))).status_code == 202


@contextlib.asynccontextmanager
async def raw_legacy(
    http: httpx.AsyncClient, base: str, *, initialize: bool = True
) -> AsyncIterator[RawLegacy]:
    async with held_stream(http, base + "/sse") as stream:
        assert stream.status == 200
        endpoint = await stream.next_event()
        assert endpoint.get("event") == "endpoint", endpoint
        legacy = RawLegacy(http, base, stream, endpoint["data"])
        if initialize:
            await legacy.initialize()
        yield legacy


def posts_for(upstream: UpstreamHandle, session_id: str) -> list[dict[str, Any]]:
    return [r for r in upstream.requests_for(session_id) if r["method"] == "POST"]


# ---- the lifecycle ------------------------------------------------------------------------


async def test_idle_legacy_session_ends_its_stream_frees_upstream_and_then_gets_404(
    sse_upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = legacy_sidecar(sidecar_factory, sse_upstream.url)
    async with legacy_session(sidecar.sse_url) as legacy:
        session_id = legacy.session_id
        assert text_of(await legacy.session.call_tool("echo", {"text": "héllo"})) == "héllo"
        assert text_of(await legacy.session.call_tool("add", {"a": 2, "b": 3})) == "5"
        assert await live_sessions(legacy.session) == 1
        last_activity = time.monotonic()

        await asyncio.sleep(3 * FLUSH)  # the activity (and what it taught) is in the store
        row = row_of(sidecar, session_id)
        assert (row["state"], row["transport"]) == ("live", "sse")
        assert row["upstream_endpoint"] == f"/messages/?session_id={session_id}"
        assert row["protocol_version"] == PROTOCOL_VERSION  # from the initialize it relayed

        # No POST, no stream of its own to keep it: the sidecar ends the client's stream.
        async with asyncio.timeout(IDLE + EXPIRY_SLACK):
            await legacy.stream_ended.wait()
        waited = time.monotonic() - last_activity
        assert IDLE - 0.1 <= waited <= IDLE + EXPIRY_SLACK, waited
        with pytest.raises((McpError, anyio.ClosedResourceError, anyio.BrokenResourceError)):
            await legacy.session.call_tool("echo", {"text": "anyone?"})

    posts_before = len(posts_for(sse_upstream, session_id))
    async with httpx.AsyncClient(timeout=5) as http:
        started = time.monotonic()
        response = await http.post(
            f"{sidecar.base}/messages/?session_id={session_id}", json=rpc("tools/list", 9)
        )
        answered_in = time.monotonic() - started
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == not_found_body(9)
    assert answered_in < 1.0
    assert len(posts_for(sse_upstream, session_id)) == posts_before  # never reached upstream
    # The id lives in the message URL here, yet the log shows it shortened, and only so.
    assert f"rejected POST /messages/ session={session_id[:8]}… reason=expired" in sidecar.output()
    assert session_id not in sidecar.output()

    row = await closed_row(sidecar, session_id)
    assert row["close_reason"] == "idle_timeout"

    # The upstream freed the session when its stream was cut: a fresh session is alone there.
    async with legacy_session(sidecar.sse_url) as fresh:
        assert fresh.session_id != session_id

        async def alone() -> bool:
            return await live_sessions(fresh.session) == 1

        await eventually(alone, what="upstream session table without the expired session")


async def test_endpoint_event_names_the_sidecar_by_a_relative_url(
    sse_upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = legacy_sidecar(sidecar_factory, sse_upstream.url)
    upstream_authority = f"{HOST}:{sse_upstream.port}"
    async with httpx.AsyncClient(timeout=5) as http:
        async with raw_legacy(http, sidecar.base, initialize=False) as legacy:
            assert legacy.endpoint.startswith("/messages/?session_id=")
            assert upstream_authority not in legacy.endpoint
            assert str(sse_upstream.port) not in legacy.endpoint
            # The relative URL, resolved against the sidecar, reaches the upstream's session.
            await legacy.initialize()
            tools = await legacy.post(rpc("tools/list", 2))
            assert tools.status_code == 202
            listed = await legacy.stream.next_message()
            assert listed["id"] == 2
            assert "echo" in {tool["name"] for tool in listed["result"]["tools"]}
            assert len(posts_for(sse_upstream, legacy.session_id)) == 3

        # Behind a path-prefixing proxy, the client must post under the prefix.
        async with held_stream(http, sidecar.sse_url, {"X-Forwarded-Prefix": "/pfx"}) as prefixed:
            endpoint = await prefixed.next_event()
            assert endpoint["event"] == "endpoint"
            assert endpoint["data"].startswith("/pfx/messages/?session_id=")
            assert upstream_authority not in endpoint["data"]


class InlineLegacyServer:
    """A fake legacy upstream of the kind that handles each message inline: it answers on the
    stream *before* it acknowledges the POST with 202, and names its message URL absolutely.
    Both are legal, and both are what the Python and TypeScript SDK servers happen not to do.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.posted: list[str] = []
        self.streams: dict[str, web.StreamResponse] = {}
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        session_id = f"inline-{len(self.streams) + 1}"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        endpoint = f"{self.base}/rpc/msg?sessionId={session_id}&tenant=t1"
        await response.write(f"event: endpoint\r\ndata: {endpoint}\r\n\r\n".encode())
        self.streams[session_id] = response
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await asyncio.sleep(30)
        return response

    async def _message(self, request: web.Request) -> web.Response:
        self.posted.append(request.path_qs)
        message = await request.json()
        if "id" in message:
            answer = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {}})
            await self.streams[request.query["sessionId"]].write(
                f"event: message\r\ndata: {answer}\r\n\r\n".encode()
            )
            await asyncio.sleep(0.1)  # the answer is surely relayed before the 202 is
        return web.Response(status=202, text="Accepted")

    async def __aenter__(self) -> InlineLegacyServer:
        app = web.Application()
        app.router.add_get("/sse", self._sse)
        app.router.add_post("/rpc/msg", self._message)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port).start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_absolute_endpoint_url_from_the_upstream_is_rewritten_to_the_sidecar(
    sidecar_factory: SidecarFactory,
) -> None:
    """An absolute message URL would send the client around the sidecar: it gets a relative
    one instead, query and all, and its POSTs still reach the upstream's own path."""
    async with InlineLegacyServer() as server:
        sidecar = legacy_sidecar(
            sidecar_factory, server.base, upstream={"messages_path": "/rpc/msg"}
        )
        async with (
            httpx.AsyncClient(timeout=5) as http,
            raw_legacy(http, sidecar.base, initialize=False) as legacy,
        ):
            assert legacy.endpoint == "/rpc/msg?sessionId=inline-1&tenant=t1"
            assert legacy.session_id == "inline-1"
            assert (await legacy.post(initialize_message())).status_code == 202
            assert (await legacy.stream.next_message())["id"] == 1
            row = row_of(sidecar, "inline-1")
            assert row["transport"] == "sse"
            assert row["upstream_endpoint"] == "/rpc/msg?sessionId=inline-1&tenant=t1"
        assert server.posted == ["/rpc/msg?sessionId=inline-1&tenant=t1"]


async def test_answer_relayed_before_the_posts_202_still_ends_the_call(
    sidecar_factory: SidecarFactory,
) -> None:
    """A legacy call is in flight from its POST until its answer shows on the stream. When the
    answer overtakes the POST's 202, the call must not stay "in flight" (which would keep
    the session alive until upstream.read_timeout)."""
    async with InlineLegacyServer() as server:
        sidecar = legacy_sidecar(
            sidecar_factory, server.base, upstream={"messages_path": "/rpc/msg"}
        )
        async with (
            httpx.AsyncClient(timeout=5) as http,
            raw_legacy(http, sidecar.base, initialize=False) as legacy,
        ):
            assert (await legacy.post(initialize_message())).status_code == 202
            assert (await legacy.stream.next_message())["id"] == 1
            for request_id in (2, 3):
                assert (await legacy.post(rpc("tools/list", request_id))).status_code == 202
                assert (await legacy.stream.next_message())["id"] == request_id
            last_activity = time.monotonic()
            shown = (await http.get(f"{sidecar.admin_url}/sessions/{legacy.session_id}")).json()
            assert shown["in_flight"] == 0, shown
            ended = await legacy.stream.wait_ended(IDLE + EXPIRY_SLACK + 1)
            assert ended - last_activity <= IDLE + EXPIRY_SLACK
        row = await closed_row(sidecar, legacy.session_id)
        assert row["close_reason"] == "idle_timeout"


async def test_legacy_session_restored_after_restart_is_closed_with_reason_restart(
    sse_upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = legacy_sidecar(sidecar_factory, sse_upstream.url, idle=60)
    async with httpx.AsyncClient(timeout=5) as http:
        async with raw_legacy(http, sidecar.base) as legacy:
            session_id = legacy.session_id
            assert (await legacy.post(rpc("tools/list", 2))).status_code == 202
            assert (await legacy.stream.next_message())["id"] == 2

            assert await asyncio.to_thread(sidecar.terminate) == 0
            await legacy.stream.wait_ended(5)  # shutdown ends the stream on both sides
        row = row_of(sidecar, session_id)
        assert (row["state"], row["close_reason"]) == ("live", None)  # a stop closes nothing

        await asyncio.to_thread(sidecar.restart)
        # Its stream cannot be recovered, so the start's restore closes it, durably (restart()
        # returns once the restore is done; a request before that closes it the same way).
        row = row_of(sidecar, session_id)
        assert (row["state"], row["close_reason"]) == ("closed", "restart")
        posts_before = len(posts_for(sse_upstream, session_id))
        response = await http.post(
            f"{sidecar.base}/messages/?session_id={session_id}", json=rpc("tools/list", 3)
        )
        assert response.status_code == 404, response.text
        assert response.json() == not_found_body(3)
        assert len(posts_for(sse_upstream, session_id)) == posts_before
    assert "legacy closed" in sidecar.output()

    async with legacy_session(sidecar.sse_url) as fresh:

        async def alone() -> bool:
            return await live_sessions(fresh.session) == 1

        await eventually(alone, what="upstream freed the stream cut by the restart")


async def test_upstream_ending_the_stream_ends_the_legacy_session(
    sse_upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    """The stream is the session: when the upstream drops it (a restart, say), the session is
    closed as `upstream_gone` and its id gets the sidecar's 404, not a 502."""
    sidecar = legacy_sidecar(sidecar_factory, sse_upstream.url, idle=60)
    async with legacy_session(sidecar.sse_url) as legacy:
        assert text_of(await legacy.session.call_tool("echo", {"text": "x"})) == "x"
        await asyncio.to_thread(sse_upstream.stop)
        async with asyncio.timeout(10):
            await legacy.stream_ended.wait()
    row = await closed_row(sidecar, legacy.session_id)
    assert row["close_reason"] == "upstream_gone"
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.post(
            f"{sidecar.base}/messages/?session_id={legacy.session_id}", json=rpc("ping", 4)
        )
    assert response.status_code == 404, response.text
    assert response.json() == not_found_body(4)


# ---- what is not activity, on both transports --------------------------------------------


async def test_open_streams_and_their_keepalives_do_not_keep_sessions_alive(
    upstream_factory: Callable[..., UpstreamHandle], sidecar_factory: SidecarFactory
) -> None:
    """A GET stream (Streamable HTTP) and a legacy stream held open, keepalive comments
    flowing every 0.3 s, and no POST: both sessions expire on time and their streams end."""
    upstream = upstream_factory("both", sse_ping=0.3)
    sidecar = legacy_sidecar(sidecar_factory, upstream.url)
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=30.0)) as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        streamable_id = raw.session_id
        assert streamable_id is not None
        streamable_active = time.monotonic()
        get_headers = raw.headers(accept="text/event-stream")
        del get_headers["Content-Type"]
        async with (
            held_stream(http, sidecar.url, get_headers) as get_stream,
            raw_legacy(http, sidecar.base) as legacy,
        ):
            legacy_active = time.monotonic()
            assert get_stream.status == 200
            get_ended = await get_stream.wait_ended(IDLE + EXPIRY_SLACK + 1)
            legacy_ended = await legacy.stream.wait_ended(IDLE + EXPIRY_SLACK + 1)

            # Keepalives did flow through the sidecar, on both streams, all the while.
            assert get_stream.comments >= 3
            assert legacy.stream.comments >= 3
            assert IDLE - 0.1 <= get_ended - streamable_active <= IDLE + EXPIRY_SLACK
            assert IDLE - 0.1 <= legacy_ended - legacy_active <= IDLE + EXPIRY_SLACK

            assert (await raw.call("echo", {"text": "late"})).status_code == 404
            late = await legacy.post(rpc("tools/list", 5))
            assert late.status_code == 404
            assert late.json() == not_found_body(5)

    for session_id in (streamable_id, legacy.session_id):
        row = await closed_row(sidecar, session_id)
        assert row["close_reason"] == "idle_timeout"
    await eventually(lambda: streamable_id in upstream.deletes(), what="upstream DELETE")


async def test_server_pings_and_the_answers_to_them_are_not_activity_on_both_transports(
    upstream_factory: Callable[..., UpstreamHandle], sidecar_factory: SidecarFactory
) -> None:
    """With tool calls ignored (`sessions.ignore_methods`), the only client traffic left is
    the answer to each server ping: it must not move last activity on either transport."""
    upstream = upstream_factory("both")
    idle = 2.5
    sidecar = legacy_sidecar(
        sidecar_factory, upstream.url, idle=idle, sessions={"ignore_methods": ["tools/call"]}
    )
    async with (
        sdk_session(sidecar.url) as (streamable, get_id),
        legacy_session(sidecar.sse_url) as legacy,
    ):
        streamable_id = get_id()
        assert streamable_id is not None
        # The SDK lists the tools before its first call (to validate results): done here.
        await streamable.list_tools()
        await legacy.session.list_tools()
        await asyncio.sleep(3 * FLUSH)  # that activity is in the store
        before = {
            sid: row_of(sidecar, sid)["last_activity_at"]
            for sid in (streamable_id, legacy.session_id)
        }
        for _ in range(3):
            assert text_of(await streamable.call_tool("ping_client")) == "pong"
            assert text_of(await legacy.session.call_tool("ping_client")) == "pong"
            await asyncio.sleep(0.3)
        await asyncio.sleep(3 * FLUSH)
        after = {sid: row_of(sidecar, sid)["last_activity_at"] for sid in before}
        assert after == before
        assert all(row_of(sidecar, sid)["requests"] >= 4 for sid in before)  # they did pass

        async with asyncio.timeout(idle + EXPIRY_SLACK):
            await legacy.stream_ended.wait()
        with pytest.raises(McpError):
            await streamable.call_tool("echo", {"text": "gone?"})

    for session_id in before:
        row = await closed_row(sidecar, session_id)
        assert row["close_reason"] == "idle_timeout"


# ---- both transports at once ----------------------------------------------------------------


async def test_one_sidecar_carries_both_transports_side_by_side(
    upstream_factory: Callable[..., UpstreamHandle], sidecar_factory: SidecarFactory
) -> None:
    upstream = upstream_factory("both", sse_ping=0.5)
    sidecar = legacy_sidecar(sidecar_factory, upstream.url, idle=30)
    async with (
        sdk_session(sidecar.url) as (streamable, get_id),
        legacy_session(sidecar.sse_url) as legacy,
    ):
        streamable_id = get_id()
        assert streamable_id is not None
        assert text_of(await streamable.call_tool("add", {"a": 1, "b": 2})) == "3"
        assert text_of(await legacy.session.call_tool("add", {"a": 3, "b": 4})) == "7"
        assert await live_sessions(streamable) == 2  # the upstream holds one of each
        assert await live_sessions(legacy.session) == 2

        async with httpx.AsyncClient(timeout=5) as http:
            listing = (await http.get(f"{sidecar.admin_url}/sessions?state=live")).json()
        transports = {s["id"]: s["transport"] for s in listing["sessions"]}
        assert transports == {streamable_id: "streamable_http", legacy.session_id: "sse"}
        assert listing["total"] == 2

    # Each ends its own way: a DELETE for the one, the client dropping its stream for the other.
    async def both_closed() -> bool:
        rows = [session_row(sidecar.db_path, sid) for sid in (streamable_id, legacy.session_id)]
        return all(r is not None and r["state"] == "closed" for r in rows)

    await eventually(both_closed, what="both sessions closed")
    assert row_of(sidecar, streamable_id)["close_reason"] == "client_delete"
    assert row_of(sidecar, legacy.session_id)["close_reason"] == "client_delete"
    assert streamable_id in upstream.deletes()


async def test_client_dropping_a_quiet_stream_frees_the_session_upstream_at_once(
    upstream_factory: Callable[..., UpstreamHandle], sidecar_factory: SidecarFactory
) -> None:
    """Keepalives only every 60 s: nothing would show the sidecar that the client is gone
    before then, unless it watches the client connection itself. It must close the session
    (`client_delete`) and drop the upstream stream, which frees the upstream session, at
    once."""
    upstream = upstream_factory("sse", sse_ping=60)
    sidecar = legacy_sidecar(sidecar_factory, upstream.url, idle=60)
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=30.0)) as http:
        async with raw_legacy(http, sidecar.base) as legacy:
            session_id = legacy.session_id
        dropped = time.monotonic()
        row = await closed_row(sidecar, session_id)
        assert row["close_reason"] == "client_delete"
        assert time.monotonic() - dropped < 5
        async with legacy_session(upstream.sse_url) as direct:
            # Only the direct session is left: the dropped one is gone upstream too.
            deadline = time.monotonic() + 5
            while (count := await live_sessions(direct.session)) != 1:
                assert time.monotonic() < deadline, f"upstream still holds {count} sessions"
                await asyncio.sleep(0.2)
