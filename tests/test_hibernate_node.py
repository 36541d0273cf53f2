"""Hibernate (SPEC 2.7) with the TypeScript SDK's client in front of server-everything.

The TypeScript client never re-initializes after a 404: its transport keeps the old id, so
only hibernate lets it carry on after idling. One client, one transport, one `initialize`:
it calls a tool, idles past the idle timeout, the sidecar hibernates the session (DELETE
upstream, the client's id kept dormant), then the same client calls a tool again. The
sidecar replays the handshake to server-everything behind the unchanged id, and the client
gets its answer. server-everything logs every initialize and DELETE with the session id,
so the test sees both sides of the binding change.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from tests.peers.mcp_clients import eventually
from tests.peers.node_peers import (
    NodeServer,
    events,
    make_script,
    node_available,
    run_client_async,
    start_server_everything,
    step_results,
)
from tests.peers.ops import Admin
from tests.peers.processes import SidecarFactory, SidecarHandle

_SKIP_REASON = node_available()

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or ""),
]

IDLE = 1.5
SWEEP = 0.25
FLUSH = 0.2
# How long the client idles: past the idle timeout and a sweep, with room for the test to
# see the session dormant (and the client's GET stream cut and re-opened) before it wakes.
IDLE_MS = int((IDLE + SWEEP + 3.0) * 1000)
CLIENT_TIMEOUT = 25.0
HIBERNATED = "mcp_sidecar_sessions_hibernated_total"
RESUMED = "mcp_sidecar_sessions_resumed_total"
RESUME_FAILURES = "mcp_sidecar_resume_failures_total"
INITIALIZED = re.compile(r"Session initialized with ID: (\S+)")
UPSTREAM_REQUEST = re.compile(r"Received MCP (POST|GET) request|Received session termination")


def diagnose(lines: list[dict[str, Any]], sidecar: SidecarHandle, server: NodeServer) -> str:
    return (
        f"client lines: {lines}\n--- sidecar ---\n{sidecar.output()}\n"
        f"--- server-everything ---\n{server.output()}"
    )


def upstream_requests_after(output: str, marker: str) -> list[str]:
    """The methods server-everything logged after `marker` (DELETE for a termination)."""
    _, _, after = output.partition(marker)
    return [m.group(1) or "DELETE" for m in UPSTREAM_REQUEST.finditer(after)]


async def session_in_state(admin: Admin, session_id: str, state: str) -> dict[str, Any] | None:
    response = await admin.get(f"/sessions/{session_id}")
    if response.status_code != 200:
        return None
    shown: dict[str, Any] = response.json()
    return shown if shown["state"] == state else None


async def only_live_session(admin: Admin, min_requests: int) -> dict[str, Any] | None:
    listing = await admin.json("/sessions?state=live")
    ready = [s for s in listing["sessions"] if s["requests"] >= min_requests]
    return ready[0] if len(ready) == 1 else None


async def test_typescript_client_keeps_its_session_id_through_hibernate_and_resume(
    tmp_path: Path, sidecar_factory: SidecarFactory
) -> None:
    with start_server_everything(tmp_path, "streamable-http") as server:
        sidecar = sidecar_factory(
            server.url,
            sessions={"idle_timeout": IDLE, "sweep_interval": SWEEP, "idle_action": "hibernate"},
            store={"flush_interval": FLUSH},
        )
        admin = Admin(sidecar.admin_url)
        client = asyncio.create_task(
            run_client_async(
                make_script(
                    sidecar.url,
                    "streamable-http",
                    {"op": "connect"},
                    {"op": "callTool", "name": "echo", "args": {"message": "before"}},
                    {"op": "sleep", "ms": IDLE_MS},
                    {"op": "callTool", "name": "echo", "args": {"message": "after"}},
                    {"op": "listTools"},
                    {"op": "sleep", "ms": 0},  # reports the transport's sessionId
                    timeoutMs=10000,
                ),
                CLIENT_TIMEOUT,
            )
        )
        try:
            # initialize and tools/call (notifications/initialized may or may not count).
            live = await eventually(
                lambda: only_live_session(admin, min_requests=2),
                what="the client's session live at the sidecar",
            )
            session_id: str = live["id"]

            # Idle past the timeout: hibernated, not closed.
            dormant = await eventually(
                lambda: session_in_state(admin, session_id, "dormant"),
                within=IDLE + 4 * SWEEP + 2.0,
                what=f"session {session_id} dormant",
            )
            assert dormant["close_reason"] is None, dormant
            assert dormant["closed_at"] is None, dormant
            # The upstream session was freed: server-everything got the DELETE for the id
            # it gave at initialize (the same id the client holds, before any resume).
            await eventually(
                lambda: (
                    f"Received session termination request for session {session_id}"
                    in server.output()
                ),
                what="server-everything received the hibernating DELETE",
            )
            scrape = await admin.scrape()
            assert scrape.value(HIBERNATED) == 1
            assert scrape.value(RESUMED, cause="hibernated") == 0
            assert scrape.value("mcp_sidecar_sessions", state="dormant") == 1
            assert scrape.value("mcp_sidecar_sessions", state="live") == 0

            lines = await client
        finally:
            if not client.done():
                client.cancel()

        why = diagnose(lines, sidecar, server)
        steps = step_results(lines)
        assert [s["op"] for s in steps] == [
            "connect",
            "callTool",
            "sleep",
            "callTool",
            "listTools",
            "sleep",
        ], why
        connect, before, slept, after, tools, final = steps
        assert all(s["ok"] for s in steps), why
        assert lines[-1] == {"event": "done", "steps": len(steps)}, why

        # One transport, one initialize, one id throughout: the client never saw an error.
        assert connect["result"]["sessionId"] == session_id
        assert connect["result"]["serverInfo"]["name"] == "mcp-servers/everything"
        assert [e["id"] for e in events(lines, "session")] == [session_id], why
        assert before["result"]["content"] == [{"type": "text", "text": "Echo: before"}]
        assert slept["result"] == {"sessionId": session_id}
        assert after["result"]["content"] == [{"type": "text", "text": "Echo: after"}], why
        assert "echo" in tools["result"]["tools"]
        assert final["result"] == {"sessionId": session_id}
        assert events(lines, "error") == [], why

        # Behind the unchanged id, server-everything saw a second, replayed initialize.
        upstream_ids = INITIALIZED.findall(server.output())
        assert len(upstream_ids) == 2, why
        assert upstream_ids[0] == session_id
        assert upstream_ids[1] != session_id

        shown = await eventually(
            lambda: session_in_state(admin, session_id, "live"),
            what=f"session {session_id} live again",
        )
        if "resumes" in shown:  # the admin view may not show it (yet)
            assert shown["resumes"] >= 1, shown
        assert shown["requests"] >= 4, shown  # initialize, 2 tools/call, tools/list
        scrape = await admin.scrape()
        assert scrape.value(RESUMED, cause="hibernated") == 1, scrape.text
        assert scrape.value(RESUMED, cause="upstream_lost") == 0
        assert scrape.value(HIBERNATED) == 1
        assert sum(v for (name, _), v in scrape.samples.items() if name == RESUME_FAILURES) == 0
        assert scrape.value("mcp_sidecar_sessions", state="dormant") == 0
        assert scrape.value("mcp_sidecar_sessions", state="live") == 1

        # The client's GET stream, cut at hibernation and re-opened on the dormant id by the
        # SDK (1 s later), was held and joined to the new upstream session before the
        # tools/call that woke it was forwarded (SPEC 2.7): notifications/initialized, GET,
        # tools/call, tools/list. And the new upstream session was not deleted.
        resumed_at = f"Session initialized with ID: {upstream_ids[1]}"
        assert upstream_requests_after(server.output(), resumed_at) == [
            "POST",
            "GET",
            "POST",
            "POST",
        ], why
        assert f"Establishing new SSE stream for session {upstream_ids[1]}" in server.output()

        log = sidecar.output()
        assert f"hibernated session {session_id[:8]}" in log, log
        assert f"resumed session {session_id[:8]}… cause=hibernated" in log, log
        assert "cannot resume" not in log, log
