"""The upstream peer itself, talked to directly (no sidecar): the ground the other tests stand on.

If these fail, a failing integration test says nothing about the sidecar. They also pin the
SDK behaviours the sidecar depends on: a DELETE (or a closed legacy SSE stream) really frees
the server's session, unknown ids get 404, a foreign Host gets 421, and Last-Event-ID replays.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from tests.peers.mcp_clients import eventually
from tests.peers.processes import UpstreamHandle

ACCEPT = "application/json, text/event-stream"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "test-peers", "version": "0"},
    },
}


def text_of(result: CallToolResult) -> str:
    assert not result.isError, result
    first = result.content[0]
    assert isinstance(first, TextContent)
    return first.text


async def live_sessions(session: ClientSession) -> int:
    return int(text_of(await session.call_tool("live_sessions")))


async def test_streamable_http_session_is_freed_by_client_delete(upstream: UpstreamHandle) -> None:
    async with (
        streamable_http_client(upstream.url) as (read, write, get_session_id),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert text_of(await session.call_tool("add", {"a": 2, "b": 3})) == "5"
        assert text_of(await session.call_tool("echo", {"text": "hi"})) == "hi"
        assert await live_sessions(session) == 1
        first_id = get_session_id()
    assert first_id

    # Leaving streamable_http_client sent DELETE; a fresh session sees only itself.
    async with (
        streamable_http_client(upstream.url) as (read, write, get_session_id),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert get_session_id() != first_id

        async def only_this_one_left() -> bool:
            return await live_sessions(session) == 1

        await eventually(only_this_one_left)

    assert upstream.deletes() == [first_id, get_session_id()]
    assert ("DELETE", 200) in [(r["method"], r["status"]) for r in upstream.requests_for(first_id)]
    created = [r["response_session_id"] for r in upstream.requests() if r["response_session_id"]]
    assert created[0] == first_id


async def test_sse_session_is_freed_when_its_stream_closes(sse_upstream: UpstreamHandle) -> None:
    created: list[str] = []
    async with (
        sse_client(sse_upstream.sse_url, on_session_created=created.append) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert text_of(await session.call_tool("add", {"a": 40, "b": 2})) == "42"
        assert await live_sessions(session) == 1
    assert len(created) == 1

    async with (
        sse_client(sse_upstream.sse_url) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()

        async def only_this_one_left() -> bool:
            return await live_sessions(session) == 1

        await eventually(only_this_one_left)

    posts = sse_upstream.requests_for(created[0])
    assert posts
    assert {(r["method"], r["path"], r["status"]) for r in posts} == {("POST", "/messages/", 202)}


async def test_slow_tool_reports_progress_every_half_second(upstream: UpstreamHandle) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with (
        streamable_http_client(upstream.url) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        started = time.monotonic()
        result = await session.call_tool("slow", {"seconds": 1.2}, progress_callback=on_progress)
        elapsed = time.monotonic() - started

    assert text_of(result) == "done"
    assert elapsed >= 1.2
    assert len(seen) >= 3  # at 0, 0.5, 1.0 and the final 1.2
    assert seen[-1][0] == seen[-1][1] == 1.2
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)


async def test_ping_client_round_trips_a_server_initiated_request(
    upstream: UpstreamHandle, sse_upstream: UpstreamHandle
) -> None:
    async with (
        streamable_http_client(upstream.url) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert text_of(await session.call_tool("ping_client")) == "pong"

    async with sse_client(sse_upstream.sse_url) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        assert text_of(await s.call_tool("ping_client")) == "pong"


async def initialize_raw(client: httpx.AsyncClient, url: str) -> tuple[str, list[dict[str, str]]]:
    """POST initialize by hand; return the session id and the SSE events of the answer."""
    response = await client.post(url, json=INITIALIZE, headers={"Accept": ACCEPT})
    assert response.status_code == 200, response.text
    return response.headers["mcp-session-id"], parse_sse(response.text)


def parse_sse(text: str) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            name, _, value = line.partition(":")
            fields[name] = fields.get(name, "") + value.removeprefix(" ")
        if fields:
            events.append(fields)
    return events


async def test_unknown_session_gets_404_and_foreign_host_gets_421(
    upstream: UpstreamHandle,
) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        headers = {"Accept": ACCEPT, "Mcp-Session-Id": "0" * 32}
        response = await client.post(upstream.url, json=ping, headers=headers)
        assert response.status_code == 404

        response = await client.post(
            upstream.url, json=INITIALIZE, headers={"Accept": ACCEPT, "Host": "example.com"}
        )
        assert response.status_code == 421

    statuses = [(r["session_id"], r["status"]) for r in upstream.requests()]
    assert statuses == [("0" * 32, 404), (None, 421)]


async def test_last_event_id_replays_from_the_event_store(upstream: UpstreamHandle) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        session_id, events = await initialize_raw(client, upstream.url)
        priming, answer = events
        assert priming["data"] == ""
        assert json.loads(answer["data"])["id"] == 1

        headers = {
            "Accept": "text/event-stream",
            "Mcp-Session-Id": session_id,
            "MCP-Protocol-Version": "2025-11-25",
            "Last-Event-ID": priming["id"],
        }
        async with client.stream("GET", upstream.url, headers=headers) as response:
            assert response.status_code == 200
            replayed = ""
            async for chunk in response.aiter_text():
                replayed += chunk
                if answer["data"] in replayed:
                    break
        assert any(e.get("id") == answer["id"] for e in parse_sse(replayed))


async def test_stateless_json_upstream_sets_no_session(
    upstream_factory: Callable[..., UpstreamHandle],
) -> None:
    upstream = upstream_factory(stateless=True, json_response=True)
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(upstream.url, json=INITIALIZE, headers={"Accept": ACCEPT})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "mcp-session-id" not in response.headers
    body: dict[str, Any] = response.json()
    assert body["result"]["serverInfo"]["name"] == "sidecar-test-upstream"
