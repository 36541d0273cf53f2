"""The TypeScript SDK's client and its reference server (server-everything) through the sidecar.

The other half of "every transport, every SDK": ``tests/node/client.mjs`` drives the
TypeScript SDK's ``Client`` (Streamable HTTP and the legacy SSE transport) against the sidecar
in front of ``@modelcontextprotocol/server-everything``. What the sidecar meets there, pinned
on the peers alone by ``test_node_peers.py``: server-everything never reaps sessions itself,
answers a dead Streamable HTTP session with ``400 "No valid session ID provided"`` instead of
404, and never answers a legacy POST for an unknown session at all. The last test is the
operator's own pattern (``upstream.session_gone``) for a server no built-in pattern knows,
against a small in-test fake (no Node needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiohttp import web

from tests.peers.mcp_clients import eventually, not_found_body, session_row
from tests.peers.node_peers import (
    NodeServer,
    events,
    make_script,
    node_available,
    run_client_async,
    start_server_everything,
    step_results,
)
from tests.peers.processes import HOST, SidecarFactory, SidecarHandle, free_port

pytestmark = pytest.mark.usefixtures("fast_path")  # sidecars started directly, too

_SKIP_REASON = node_available()
F = TypeVar("F", bound=Callable[..., Any])

IDLE = 2.0
SWEEP = 0.25
FLUSH = 0.2
LONG_RUNNING = "trigger-long-running-operation"
CLIENT_TIMEOUT = 30.0
ACCEPT = "application/json, text/event-stream"
PROTOCOL_VERSION = "2025-11-25"
NO_VALID_SESSION = "No valid session ID provided"


def needs_node(test: F) -> F:
    """Marked `node` and skipped with the reason when the Node peers cannot run (the
    operator-pattern test at the end needs no Node, so this is per test, not per module)."""
    marked: F = pytest.mark.node(
        pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")(test)
    )
    return marked


def start_sidecar(
    factory: SidecarFactory, upstream_url: str, idle: float = IDLE, **sections: Any
) -> SidecarHandle:
    return factory(
        upstream_url,
        sessions={"idle_timeout": idle, "sweep_interval": SWEEP},
        store={"flush_interval": FLUSH},
        **sections,
    )


def row_of(sidecar: SidecarHandle, session_id: str) -> dict[str, Any]:
    row = session_row(sidecar.db_path, session_id)
    assert row is not None, f"no row for {session_id}\n{sidecar.output()}"
    return row


def diagnose(lines: list[dict[str, Any]], sidecar: SidecarHandle, server: NodeServer) -> str:
    return (
        f"client lines: {lines}\n--- sidecar ---\n{sidecar.output()}\n"
        f"--- server-everything ---\n{server.output()}"
    )


async def post_direct(
    url: str, message: dict[str, Any], session_id: str | None = None, within: float = 5
) -> httpx.Response:
    """One JSON-RPC POST, straight to a server (or the sidecar), outside any SDK."""
    headers = {"Accept": ACCEPT, "MCP-Protocol-Version": PROTOCOL_VERSION}
    if session_id is not None:
        headers["Mcp-Session-Id"] = session_id
    async with httpx.AsyncClient(timeout=within) as http:
        return await http.post(url, json=message, headers=headers)


def ping(request_id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "ping"}


# ---- Streamable HTTP ------------------------------------------------------------------------


@needs_node
async def test_streamable_http_lifecycle_with_the_typescript_client(
    tmp_path: Path, sidecar_factory: SidecarFactory
) -> None:
    with start_server_everything(tmp_path, "streamable-http") as server:
        sidecar = start_sidecar(sidecar_factory, server.url)
        lines = await run_client_async(
            make_script(
                sidecar.url,
                "streamable-http",
                {"op": "connect"},
                {"op": "listTools"},
                {"op": "callTool", "name": "echo", "args": {"message": "via sidecar"}},
                # Longer than the idle timeout, progress all the way: the call keeps it alive.
                {
                    "op": "callTool",
                    "name": LONG_RUNNING,
                    "args": {"duration": 1.75 * IDLE, "steps": 7},
                    "progress": True,
                },
                {"op": "ping"},
                {"op": "sleep", "ms": int((IDLE + SWEEP + 0.75) * 1000)},
                {"op": "listTools"},
                {"op": "reconnect"},
                {"op": "callTool", "name": "echo", "args": {"message": "again"}},
                timeoutMs=10000,
            ),
            CLIENT_TIMEOUT,
        )
        why = diagnose(lines, sidecar, server)
        connect, tools, echo, long_call, after_call, _, expired, reconnect, again = step_results(
            lines
        )
        assert all(s["ok"] for s in (connect, tools, echo, long_call, after_call)), why
        old_id = connect["result"]["sessionId"]
        assert connect["result"]["serverInfo"]["name"] == "mcp-servers/everything"
        assert {"echo", LONG_RUNNING} <= set(tools["result"]["tools"])
        assert echo["result"]["content"] == [{"type": "text", "text": "Echo: via sidecar"}]
        assert long_call["ms"] > IDLE * 1000
        assert "completed" in long_call["result"]["content"][0]["text"]
        progress = [(p["progress"], p["total"]) for p in events(lines, "progress")]
        assert progress == [(i, 7) for i in range(1, 8)], why

        # Idle expiry: the sidecar's own 404, on which the client must start over.
        assert not expired["ok"]
        assert expired["status"] == 404, why
        assert "Session not found" in expired["error"]
        assert reconnect["ok"], why
        assert reconnect["result"]["previousSessionId"] == old_id
        new_id = reconnect["result"]["sessionId"]
        assert new_id not in (None, old_id)
        assert again["ok"], why
        assert again["result"]["content"] == [{"type": "text", "text": "Echo: again"}]

        row = row_of(sidecar, old_id)
        assert (row["state"], row["close_reason"]) == ("closed", "idle_timeout")
        assert row["client_info"] == "mcp-sidecar-node-peer 0.0.0"
        # server-everything never reaps a session itself: the sidecar's DELETE did.
        assert f"Received session termination request for session {old_id}" in server.output()
        gone = await post_direct(server.url, ping(3), old_id)
        assert gone.status_code == 400
        assert NO_VALID_SESSION in gone.json()["error"]["message"]
        # The TypeScript client's close() sends no DELETE: its new session lives on, until idle.
        assert row_of(sidecar, new_id)["state"] == "live"


# ---- legacy SSE ---------------------------------------------------------------------------


async def first_event(url: str) -> dict[str, str]:
    """The first SSE event of a fresh stream (then the stream is dropped)."""
    buffer = ""
    async with (
        httpx.AsyncClient(timeout=5) as http,
        http.stream("GET", url, headers={"Accept": "text/event-stream"}) as response,
    ):
        assert response.status_code == 200
        async for text in response.aiter_text():
            buffer += text.replace("\r\n", "\n")
            if "\n\n" in buffer:
                break
    fields: dict[str, str] = {}
    for line in buffer.split("\n\n", 1)[0].split("\n"):
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")
    return fields


@needs_node
async def test_legacy_sse_lifecycle_with_the_typescript_client(
    tmp_path: Path, sidecar_factory: SidecarFactory
) -> None:
    with start_server_everything(tmp_path, "sse") as server:
        sidecar = start_sidecar(
            sidecar_factory, server.base, upstream={"messages_path": server.message_path}
        )
        # server-everything spells the query parameter `sessionId` (the Python SDK: session_id).
        endpoint = await first_event(sidecar.sse_url)
        assert endpoint["event"] == "endpoint"
        assert endpoint["data"].startswith("/message?sessionId=")
        assert str(server.port) not in endpoint["data"]

        lines = await run_client_async(
            make_script(
                sidecar.sse_url,
                "sse",
                {"op": "connect"},
                {"op": "listTools"},
                {"op": "callTool", "name": "echo", "args": {"message": "legacy"}},
                {
                    "op": "callTool",
                    "name": LONG_RUNNING,
                    "args": {"duration": 1.5 * IDLE, "steps": 3},
                    "progress": True,
                },
                {"op": "ping"},
                # Shorter than 3 s after the stream ends: the EventSource has not yet
                # reconnected on its own (see the driver's notes).
                {"op": "sleep", "ms": int((IDLE + SWEEP + 0.6) * 1000)},
                {"op": "listTools"},
                {"op": "reconnect"},
                {"op": "callTool", "name": "echo", "args": {"message": "again"}},
                timeoutMs=10000,
            ),
            CLIENT_TIMEOUT,
        )
        why = diagnose(lines, sidecar, server)
        connect, tools, echo, long_call, after_call, _, expired, reconnect, again = step_results(
            lines
        )
        assert all(s["ok"] for s in (connect, tools, echo, long_call, after_call)), why
        old_id = connect["result"]["sessionId"]
        assert {"echo", LONG_RUNNING} <= set(tools["result"]["tools"])
        assert echo["result"]["content"] == [{"type": "text", "text": "Echo: legacy"}]
        assert long_call["ms"] > IDLE * 1000
        assert "completed" in long_call["result"]["content"][0]["text"]

        assert not expired["ok"]
        assert expired["status"] == 404, why
        assert "Session not found" in expired["error"]
        assert reconnect["ok"], why
        new_id = reconnect["result"]["sessionId"]
        assert new_id not in (None, old_id)
        assert again["ok"], why
        assert again["result"]["content"] == [{"type": "text", "text": "Echo: again"}]
        assert events(lines, "endpoint") == []  # no silent EventSource reconnect meanwhile

        row = row_of(sidecar, old_id)
        assert (row["state"], row["transport"], row["close_reason"]) == (
            "closed",
            "sse",
            "idle_timeout",
        )
        assert row["upstream_endpoint"] == f"/message?sessionId={old_id}"
        # Cutting the stream is what frees a legacy session upstream.
        await eventually(
            lambda: f"Client Disconnected:  {old_id}" in server.output(),
            what="server-everything dropped the expired session",
        )

        # server-everything never answers a POST for a session it does not hold; the
        # sidecar answers for it, at once, for closed and never-seen ids alike.
        for session_id, reason in ((old_id, "expired"), ("no-such-session", "unknown")):
            started = time.monotonic()
            response = await post_direct(
                f"{sidecar.base}/message?sessionId={session_id}", ping(11), within=3
            )
            assert response.status_code == 404, (reason, response.text)
            assert response.json() == not_found_body(11)
            assert time.monotonic() - started < 1.0
        assert "No transport found for sessionId" not in server.output()


@needs_node
async def test_idle_typescript_sse_client_quietly_reconnects_onto_a_new_session(
    tmp_path: Path, sidecar_factory: SidecarFactory
) -> None:
    """A quirk to know, pinned: the TypeScript SDK's legacy client (its EventSource) reopens
    a stream the sidecar ended after 3 s, takes the new endpoint and carries on there without
    initialize; server-everything serves it. So an idle TypeScript legacy client never sees
    the 404 unless it posts within those 3 s; the sidecar tracks each new session as usual."""
    with start_server_everything(tmp_path, "sse") as server:
        sidecar = start_sidecar(
            sidecar_factory, server.base, upstream={"messages_path": server.message_path}
        )
        lines = await run_client_async(
            make_script(
                sidecar.sse_url,
                "sse",
                {"op": "connect"},
                {"op": "sleep", "ms": int((IDLE + SWEEP + 3.5) * 1000)},
                {"op": "callTool", "name": "echo", "args": {"message": "where am I?"}},
                timeoutMs=10000,
            ),
            CLIENT_TIMEOUT,
        )
        why = diagnose(lines, sidecar, server)
        connect, slept, echo = step_results(lines)
        old_id = connect["result"]["sessionId"]
        (reopened,) = events(lines, "endpoint")
        new_id = reopened["id"]
        assert new_id != old_id
        assert reopened["url"].startswith(f"{sidecar.base}/message?sessionId=")  # still via us
        assert slept["result"]["sessionId"] == new_id
        assert echo["ok"], why
        assert echo["result"]["content"] == [{"type": "text", "text": "Echo: where am I?"}]

        assert row_of(sidecar, old_id)["close_reason"] == "idle_timeout"
        assert row_of(sidecar, new_id)["transport"] == "sse"

        # The client process has exited, so its stream is gone: the sidecar notices the
        # dropped connection at once and closes the new session too.
        def closed_by_client() -> dict[str, Any] | None:
            row = session_row(sidecar.db_path, new_id)
            return row if row is not None and row["state"] == "closed" else None

        row = await eventually(closed_by_client, what="the reopened session closed")
        assert row["close_reason"] == "client_delete"
        async with httpx.AsyncClient(timeout=5) as http:
            shown = (await http.get(f"{sidecar.admin_url}/sessions/{new_id}")).json()
        assert shown["client_label"] == "node"  # no clientInfo: it never saw an initialize


# ---- "session gone", said the wrong way --------------------------------------------------


async def first_live_session(sidecar: SidecarHandle, min_requests: int) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        async with httpx.AsyncClient(timeout=5) as http:
            listing = (await http.get(f"{sidecar.admin_url}/sessions?state=live")).json()
        ready = [s for s in listing["sessions"] if s["requests"] >= min_requests]
        return ready[0] if ready else None

    session: dict[str, Any] = await eventually(found, what="a live session at the sidecar")
    return session


@needs_node
async def test_upstream_400_for_a_session_it_forgot_becomes_404_and_the_client_recovers(
    tmp_path: Path, sidecar_factory: SidecarFactory
) -> None:
    with start_server_everything(tmp_path, "streamable-http") as server:
        sidecar = start_sidecar(sidecar_factory, server.url, idle=60)
        client = asyncio.create_task(
            run_client_async(
                make_script(
                    sidecar.url,
                    "streamable-http",
                    {"op": "connect"},
                    {"op": "listTools"},
                    {"op": "sleep", "ms": 3000},
                    {"op": "listTools"},
                    {"op": "reconnect"},
                    {"op": "ping"},
                    timeoutMs=10000,
                ),
                CLIENT_TIMEOUT,
            )
        )
        # While the client sleeps, the server loses the session behind the sidecar's back
        # (as on a server restart): a DELETE straight to it.
        live = await first_live_session(sidecar, min_requests=3)
        await asyncio.sleep(0.5)  # the tools/list answer is through; the client sleeps
        async with httpx.AsyncClient(timeout=5) as http:
            deleted = await http.delete(
                server.url,
                headers={"Mcp-Session-Id": live["id"], "MCP-Protocol-Version": PROTOCOL_VERSION},
            )
        assert deleted.status_code == 200
        lines = await client

    why = diagnose(lines, sidecar, server)
    connect, listed, _, after_loss, reconnect, pinged = step_results(lines)
    assert connect["ok"], why
    assert listed["ok"], why
    assert connect["result"]["sessionId"] == live["id"]
    # Not server-everything's 400, which the TypeScript client would never recover from.
    assert not after_loss["ok"]
    assert after_loss["status"] == 404, why
    assert "Session not found" in after_loss["error"]
    assert reconnect["ok"], why
    assert pinged["ok"], why

    row = row_of(sidecar, live["id"])
    assert (row["state"], row["close_reason"]) == ("closed", "upstream_gone")
    # The server already said the session is gone: the sidecar owes it no DELETE.
    terminations = server.output().count(f"termination request for session {live['id']}")
    assert terminations == 1


@contextlib.asynccontextmanager
async def fake_upstream(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 in this event loop; yields its MCP endpoint URL."""
    port = free_port()
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    try:
        yield f"http://{HOST}:{port}/mcp"
    finally:
        await runner.cleanup()


async def test_operator_session_gone_pattern_turns_a_403_into_the_spec_404(
    sidecar_factory: SidecarFactory,
) -> None:
    """A server that says "session gone" its own way, here 403 with a body of its own: the
    `upstream.session_gone` pattern makes it the spec's 404; any other 403 is relayed as is."""
    answers = [
        web.Response(status=403, text="forbidden: quota exceeded"),
        web.json_response({"error": "tenant session revoked"}, status=403),
    ]
    seen: list[tuple[str, str | None]] = []

    async def mcp(request: web.Request) -> web.Response:
        session_id = request.headers.get("Mcp-Session-Id")
        seen.append((request.method, session_id))
        if session_id is None:
            result = {"jsonrpc": "2.0", "id": 1, "result": {"protocolVersion": PROTOCOL_VERSION}}
            return web.json_response(result, headers={"Mcp-Session-Id": "tenant-s1"})
        return answers.pop(0)

    app = web.Application()
    app.router.add_route("*", "/mcp", mcp)
    async with fake_upstream(app) as url:
        sidecar = start_sidecar(
            sidecar_factory,
            url,
            idle=60,
            upstream={"session_gone": [r"^403 .*tenant session revoked"]},
        )
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        assert (await post_direct(sidecar.url, initialize)).status_code == 200

        other = await post_direct(sidecar.url, ping(2), "tenant-s1")
        assert (other.status_code, other.text) == (403, "forbidden: quota exceeded")
        assert row_of(sidecar, "tenant-s1")["state"] == "live"

        revoked = await post_direct(sidecar.url, ping(3), "tenant-s1")
        assert revoked.status_code == 404, revoked.text
        assert revoked.json() == not_found_body(3)
        row = row_of(sidecar, "tenant-s1")
        assert (row["state"], row["close_reason"]) == ("closed", "upstream_gone")

        after = await post_direct(sidecar.url, ping(4), "tenant-s1")
        assert after.status_code == 404
        assert after.json() == not_found_body(4)
        await asyncio.sleep(0.3)  # room for a DELETE, had one been (wrongly) owed
    assert seen == [("POST", None), ("POST", "tenant-s1"), ("POST", "tenant-s1")]
