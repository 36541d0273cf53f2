"""The Node peers on their own (no sidecar): the TypeScript SDK client against server-everything.

If these fail, an interop test through the sidecar says nothing about the sidecar. They also
pin the behaviours of these peers the sidecar has to live with: server-everything answers an
unknown Streamable HTTP session with 400 (not 404), never answers a legacy POST for an unknown
session, and the TypeScript client's close() sends no DELETE.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from tests.peers.node_peers import (
    NodeServer,
    events,
    make_script,
    node_available,
    run_client,
    start_server_everything,
    step_results,
)

_SKIP_REASON = node_available()

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or ""),
]

LONG_RUNNING = "trigger-long-running-operation"
CLIENT_TIMEOUT = 20.0


def assert_all_ok(lines: list[dict[str, Any]], server: NodeServer) -> list[dict[str, Any]]:
    steps = step_results(lines)
    failed = [s for s in steps if not s["ok"]]
    assert not failed, f"{failed}\nserver output:\n{server.output()}"
    assert lines[-1] == {"event": "done", "steps": len(steps)}
    return steps


def roundtrip_script(server: NodeServer) -> dict[str, Any]:
    return make_script(
        server.url,
        server.mode,
        {"op": "connect"},
        {"op": "listTools"},
        {"op": "callTool", "name": "echo", "args": {"message": "hello"}},
        {
            "op": "callTool",
            "name": LONG_RUNNING,
            "args": {"duration": 0.6, "steps": 3},
            "progress": True,
        },
        {"op": "close"},
        timeoutMs=10000,
    )


def check_roundtrip(lines: list[dict[str, Any]], server: NodeServer) -> str:
    """Common assertions of the round trip; returns the session id."""
    connect, list_tools, echo, long_running, close = assert_all_ok(lines, server)

    session_id = connect["result"]["sessionId"]
    assert isinstance(session_id, str)
    assert session_id
    assert events(lines, "session") == [
        {"event": "session", "step": 0, "id": session_id, "transport": server.mode}
    ]
    assert connect["result"]["serverInfo"]["name"] == "mcp-servers/everything"

    tools = list_tools["result"]["tools"]
    assert "echo" in tools
    assert LONG_RUNNING in tools

    assert echo["result"]["content"] == [{"type": "text", "text": "Echo: hello"}]
    assert "completed" in long_running["result"]["content"][0]["text"]
    assert close["result"] == {"sessionId": session_id}
    return session_id


def test_streamable_http_roundtrip(tmp_path: Path) -> None:
    with start_server_everything(tmp_path, "streamable-http") as server:
        assert server.url == f"http://127.0.0.1:{server.port}/mcp"
        lines = run_client(roundtrip_script(server), CLIENT_TIMEOUT)
        session_id = check_roundtrip(lines, server)

        progress = events(lines, "progress")
        assert [(p["step"], p["progress"], p["total"]) for p in progress] == [
            (3, 1, 3),
            (3, 2, 3),
            (3, 3, 3),
        ]
        assert f"Session initialized with ID: {session_id}" in server.output()
        # close() only aborts the client's streams: no DELETE reached the server.
        assert "session termination request" not in server.output()
        assert events(lines, "error") == []


def test_sse_roundtrip(tmp_path: Path) -> None:
    with start_server_everything(tmp_path, "sse") as server:
        assert server.url == f"http://127.0.0.1:{server.port}/sse"
        assert server.message_path == "/message"
        lines = run_client(roundtrip_script(server), CLIENT_TIMEOUT)
        session_id = check_roundtrip(lines, server)

        # The SDK 1.32 SSE client handles the tool's result before its last progress
        # notification (the wire order is right), then reports that one as an "unknown token"
        # error event: so at least the first progress events, in order.
        progress = [(p["progress"], p["total"]) for p in events(lines, "progress")]
        assert progress
        assert progress == [(i, 3) for i in range(1, len(progress) + 1)]
        assert f"Client Connected:  {session_id}" in server.output()


def test_streamable_http_errors_then_reconnect(tmp_path: Path) -> None:
    """A dead session id gets 400 from server-everything; the driver carries on, and a
    reconnect is a new session. terminateSession sends the DELETE that close() does not."""
    with start_server_everything(tmp_path, "streamable-http") as server:
        lines = run_client(
            make_script(
                server.url,
                "streamable-http",
                {"op": "connect", "sessionId": "no-such-session"},
                {"op": "listTools"},
                {"op": "reconnect"},
                {"op": "ping"},
                {"op": "terminateSession"},
                {"op": "ping"},
                timeoutMs=10000,
            ),
            CLIENT_TIMEOUT,
        )
        adopt, dead, reconnect, ping, terminate, after_delete = step_results(lines)
        assert adopt["ok"]
        assert adopt["result"]["sessionId"] == "no-such-session"
        assert not dead["ok"]
        assert dead["status"] == 400
        assert "No valid session ID provided" in dead["error"]

        assert reconnect["ok"]
        assert reconnect["result"]["previousSessionId"] == "no-such-session"
        new_id = reconnect["result"]["sessionId"]
        assert new_id not in ("no-such-session", None)
        assert [e["id"] for e in events(lines, "session")] == ["no-such-session", new_id]
        assert ping["ok"]

        assert terminate["ok"]
        assert terminate["result"] == {"sessionId": new_id}
        assert f"Received session termination request for session {new_id}" in server.output()
        # The transport forgets the id after the DELETE, so the next request carries none.
        assert not after_delete["ok"]
        assert after_delete["status"] == 400
        assert "Server not initialized" in after_delete["error"]


def _post(
    port: int, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float
) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST", path, json.dumps(body), {"Content-Type": "application/json", **headers}
        )
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_unknown_session_raw_answers(tmp_path: Path) -> None:
    """What the sidecar must translate: 400 on Streamable HTTP, no answer at all on legacy SSE."""
    ping = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
    with start_server_everything(tmp_path, "streamable-http") as server:
        status, body = _post(
            server.port,
            "/mcp",
            ping,
            {"Accept": "application/json, text/event-stream", "Mcp-Session-Id": "dead"},
            timeout=5,
        )
        assert status == 400
        assert json.loads(body) == {
            "jsonrpc": "2.0",
            "error": {"code": -32000, "message": "Bad Request: No valid session ID provided"},
        }

    with start_server_everything(tmp_path, "sse") as server:
        with pytest.raises(TimeoutError):  # socket.timeout
            _post(server.port, "/message?sessionId=dead", ping, {}, timeout=1)
        assert "No transport found for sessionId dead" in server.output()
