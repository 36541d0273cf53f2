"""Hibernation and recovery end to end (SPEC 2.7): real FastMCP, real sidecar, real clients.

What each test reads: what the client got (its answers and its unchanged session id), what
reached the upstream (its own request log: which session each request named, and which
JSON-RPC methods it carried, in order), and what the sidecar shows (admin API, database).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import McpError

from tests.peers.mcp_clients import (
    PROTOCOL_VERSION,
    RawSession,
    eventually,
    initialize_message,
    live_sessions,
    open_stream,
    raw_client,
    rpc_messages,
    sdk_session,
    session_row,
    text_of,
)
from tests.peers.processes import SidecarFactory, SidecarHandle, UpstreamHandle

IDLE = 1.5
SWEEP = 0.3


def hibernating(
    factory: SidecarFactory, upstream: UpstreamHandle, **upstream_opts: Any
) -> SidecarHandle:
    return factory(
        upstream.url,
        sessions={"idle_timeout": IDLE, "sweep_interval": SWEEP, "idle_action": "hibernate"},
        upstream={"recover_lost": False, **upstream_opts},
        store={"flush_interval": 0.2},
    )


async def admin_get(sidecar: SidecarHandle, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as http:
        return await http.get(f"{sidecar.admin_url}{path}")


async def state_of(sidecar: SidecarHandle, session_id: str) -> dict[str, Any]:
    response = await admin_get(sidecar, f"/sessions/{session_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_state(sidecar: SidecarHandle, session_id: str, state: str) -> dict[str, Any]:
    async def reached() -> bool:
        return (await state_of(sidecar, session_id))["state"] == state

    await eventually(reached, within=15, what=f"session {session_id[:8]} {state}")
    return await state_of(sidecar, session_id)


def new_upstream_sessions(upstream: UpstreamHandle, known: set[str | None]) -> list[str]:
    """Session ids the upstream issued that are not in `known`, in order."""
    issued = [r["response_session_id"] for r in upstream.requests() if r["response_session_id"]]
    return [s for s in dict.fromkeys(issued) if s not in known]


def methods_of(upstream: UpstreamHandle, session_id: str) -> list[str]:
    """The JSON-RPC methods the upstream received for a session, its initialize included."""
    requests = [
        r for r in upstream.requests() if session_id in (r["session_id"], r["response_session_id"])
    ]
    return [m for r in requests for m in r.get("rpc_methods", [])]


async def test_sdk_client_resumes_behind_its_unchanged_id_with_its_setup_replayed(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = hibernating(sidecar_factory, upstream)
    async with sdk_session(sidecar.url) as (session, get_id):
        assert text_of(await session.call_tool("echo", {"text": "one"})) == "one"
        await session.set_logging_level("warning")
        session_id = get_id()
        assert session_id is not None

        # Idle past the timeout: the upstream gets its DELETE, the id stays dormant.
        await eventually(lambda: session_id in upstream.deletes(), within=15, what="DELETE")
        dormant = await wait_state(sidecar, session_id, "dormant")
        assert dormant["upstream_id"] is None
        before = {r["session_id"] for r in upstream.requests()} | {session_id}

        # The same ClientSession, never re-initialized: its next call just works.
        assert text_of(await session.call_tool("echo", {"text": "two"})) == "two"
        assert get_id() == session_id
        # The upstream holds exactly one session: the new one behind the client's id.
        assert await live_sessions(session) == 1

    created = new_upstream_sessions(upstream, before)
    assert len(created) == 1, created
    new_id = created[0]
    assert new_id != session_id
    methods = methods_of(upstream, new_id)
    # The replayed handshake and setup came first, then the client's own call.
    assert methods[:4] == [
        "initialize",
        "notifications/initialized",
        "logging/setLevel",
        "tools/call",
    ], methods
    shown = await state_of(sidecar, session_id)
    assert shown["resumes"] == 1
    metrics = (await admin_get(sidecar, "/metrics")).text
    assert 'mcp_sidecar_sessions_resumed_total{cause="hibernated"} 1.0' in metrics
    assert "mcp_sidecar_sessions_hibernated_total 1.0" in metrics
    assert "resumed session" in sidecar.output()
    assert "hibernated session" in sidecar.output()
    assert new_id not in sidecar.output()  # ids are shortened in the log


async def test_held_stream_on_dormant_id_wakes_nothing_and_joins_the_resumed_session(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = hibernating(sidecar_factory, upstream)
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        assert await raw.call_text("echo", {"text": "x"}) == "x"
        await wait_state(sidecar, session_id, "dormant")
        requests_before = len(upstream.requests())

        async with open_stream(raw) as stream:
            assert stream.status == 200
            # The sidecar answered the GET itself: nothing reached the upstream for it.
            assert len(upstream.requests()) == requests_before
            assert (await state_of(sidecar, session_id))["state"] == "dormant"

            # A call resumes the session; the server's notification on its new GET stream
            # reaches the client's held stream.
            assert await raw.call_text("notify_me") == "sent"
            message = await eventually_message(stream.messages)
            assert message["method"] == "notifications/resources/list_changed"
        assert (await state_of(sidecar, session_id))["state"] == "live"


async def eventually_message(queue: Any, within: float = 10.0) -> dict[str, Any]:
    import asyncio

    async with asyncio.timeout(within):
        message: dict[str, Any] = await queue.get()
        return message


async def test_recover_lost_recreates_a_session_the_upstream_lost_in_a_restart(
    upstream_factory: Callable[..., UpstreamHandle],
    sidecar_factory: SidecarFactory,
) -> None:
    upstream = upstream_factory()
    sidecar = sidecar_factory(upstream.url, upstream={"recover_lost": True})
    async with sdk_session(sidecar.url) as (session, get_id):
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"
        session_id = get_id()
        upstream.stop()
        restarted = upstream_factory(port=upstream.port)
        assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
        assert get_id() == session_id
        shown = await state_of(sidecar, session_id)
        assert (shown["state"], shown["resumes"]) == ("live", 1)
    # The restarted server answered the old id 404 (the call, and perhaps the client's GET
    # stream reconnecting), then served one new session behind the client's id.
    assert {r["status"] for r in restarted.requests_for(session_id)} == {404}
    created = new_upstream_sessions(restarted, {session_id})
    assert len(created) == 1


async def test_without_recover_lost_a_lost_session_still_gets_404(
    upstream_factory: Callable[..., UpstreamHandle],
    sidecar_factory: SidecarFactory,
) -> None:
    upstream = upstream_factory()
    sidecar = sidecar_factory(upstream.url)
    async with sdk_session(sidecar.url) as (session, _):
        await session.call_tool("echo", {"text": "before"})
        upstream.stop()
        upstream_factory(port=upstream.port)
        with pytest.raises(McpError):
            await session.call_tool("echo", {"text": "after"})
    assert (await admin_get(sidecar, "/metrics")).text.count(
        'mcp_sidecar_sessions_resumed_total{cause="upstream_lost"} 0.0'
    ) == 1


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_dormant_ids_survive_a_sidecar_restart_and_resume_after_it(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory, stop: str
) -> None:
    sidecar = hibernating(sidecar_factory, upstream)
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        await wait_state(sidecar, session_id, "dormant")
        if stop == "sigterm":
            sidecar.terminate()
        else:
            sidecar.send_signal(signal.SIGKILL)
            sidecar.proc.popen.wait(10)
        row = session_row(sidecar.db_path, session_id)
        assert row is not None
        assert row["state"] == "dormant"
        sidecar.restart()
        assert (await state_of(sidecar, session_id))["state"] == "dormant"
        assert await raw.call_text("echo", {"text": "back"}) == "back"
        assert (await state_of(sidecar, session_id))["state"] == "live"


@pytest.mark.parametrize("ender", ["client_delete", "admin"])
async def test_delete_or_admin_close_ends_a_dormant_id_for_good_without_waking_it(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory, ender: str
) -> None:
    sidecar = hibernating(sidecar_factory, upstream)
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        await wait_state(sidecar, session_id, "dormant")
        requests_before = len(upstream.requests())
        if ender == "client_delete":
            response = await http.delete(sidecar.url, headers=raw.headers())
        else:
            response = await http.delete(f"{sidecar.admin_url}/sessions/{session_id}")
        assert response.status_code == 200, response.text
        answer = await raw.call("echo", {"text": "x"})
        assert answer.status_code == 404
        assert len(upstream.requests()) == requests_before  # nothing woke upstream
        shown = await state_of(sidecar, session_id)
        assert (shown["state"], shown["close_reason"]) == ("closed", ender)


async def test_dormant_ids_are_listed_from_the_store_and_one_whose_row_is_gone_gets_404(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    # Dormant sessions are held compact in memory and read back from the store when used:
    # a row lost meanwhile is answered as before (nothing to resume from: 404), and the
    # others still wake behind their ids.
    sidecar = hibernating(sidecar_factory, upstream)
    async with raw_client() as http:
        kept, lost = RawSession(http, sidecar.url), RawSession(http, sidecar.url)
        for raw in (kept, lost):
            assert (await raw.initialize()).status_code == 200
            assert raw.session_id is not None
            await wait_state(sidecar, raw.session_id, "dormant")
        listed = (await admin_get(sidecar, "/sessions?state=dormant")).json()
        assert {s["id"] for s in listed["sessions"]} == {kept.session_id, lost.session_id}
        assert all(s["dormant_since"] and s["requests"] >= 1 for s in listed["sessions"])

        with contextlib.closing(sqlite3.connect(sidecar.db_path)) as db, db:
            db.execute("DELETE FROM sessions WHERE id=?", (lost.session_id,))
        answer = await lost.call("echo", {"text": "x"})
        assert answer.status_code == 404, answer.text
        metrics = (await admin_get(sidecar, "/metrics")).text
        assert 'mcp_sidecar_resume_failures_total{reason="refused"} 1.0' in metrics
        assert await kept.call_text("echo", {"text": "awake"}) == "awake"
        assert (await state_of(sidecar, kept.session_id or ""))["state"] == "live"


async def test_resume_with_upstream_down_is_502_and_the_session_stays_dormant(
    upstream_factory: Callable[..., UpstreamHandle], sidecar_factory: SidecarFactory
) -> None:
    upstream = upstream_factory()
    sidecar = hibernating(sidecar_factory, upstream)
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        await wait_state(sidecar, session_id, "dormant")
        await eventually(lambda: session_id in upstream.deletes(), within=10, what="DELETE")
        upstream.stop()
        response = await raw.call("echo", {"text": "x"})
        assert response.status_code == 502, response.text
        assert (await state_of(sidecar, session_id))["state"] == "dormant"
        upstream_factory(port=upstream.port)
        assert await raw.call_text("echo", {"text": "up"}) == "up"


# ---- concurrent wake-ups (SPEC 2.5, 2.7) -------------------------------------------------

RACE_SESSIONS = 4
RACE_WAKERS = 12
RACE_SPACING = 0.003  # wakers spread over ~35 ms, past a resume's commit


async def wake_together(raws: list[RawSession]) -> None:
    """`RACE_WAKERS` calls on every session at once, started `RACE_SPACING` apart: some
    arrive before a resume starts, some while it runs or commits, some after. Each gets
    its answer."""

    async def call(raw: RawSession, delay: float) -> None:
        await asyncio.sleep(delay)
        assert await raw.call_text("echo", {"text": "awake"}) == "awake"

    await asyncio.gather(*(call(raw, i * RACE_SPACING) for raw in raws for i in range(RACE_WAKERS)))


async def upstream_matches_sidecar(sidecar: SidecarHandle, raw: RawSession) -> None:
    """The upstream's own count of its sessions (its transport's table) comes to the
    sidecar's count of live ones: it holds no session the sidecar does not know."""

    async def same() -> tuple[int, int] | None:
        upstream_live = int(await raw.call_text("live_sessions"))
        listed = (await admin_get(sidecar, "/sessions?state=live")).json()["sessions"]
        return None if upstream_live != len(listed) else (upstream_live, len(listed))

    await eventually(same, within=8, what="upstream sessions == sidecar live sessions")


async def test_concurrent_wakes_of_idle_sessions_resume_each_once_and_orphan_nothing(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    # The sweeper is far off: the first request after the idle timeout hibernates the session
    # itself and the others race it, while it is hibernated, resumed, committed, then live.
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": IDLE, "sweep_interval": 60, "idle_action": "hibernate"},
        upstream={"recover_lost": True},
        store={"flush_interval": 0.2},
    )
    async with raw_client() as http:
        raws = [RawSession(http, sidecar.url) for _ in range(RACE_SESSIONS)]
        for raw in raws:
            assert (await raw.initialize()).status_code == 200
        for round_ in range(1, 4):
            await asyncio.sleep(IDLE + 0.2)  # idle past the timeout: the requests decide
            known = {r["response_session_id"] for r in upstream.requests()}
            await wake_together(raws)
            for raw in raws:
                assert (await state_of(sidecar, raw.session_id or ""))["resumes"] == round_
            assert len(new_upstream_sessions(upstream, known)) == RACE_SESSIONS
            await upstream_matches_sidecar(sidecar, raws[0])


async def test_concurrent_requests_on_a_lost_session_recreate_it_once_and_orphan_nothing(
    upstream_factory: Callable[..., UpstreamHandle], sidecar_factory: SidecarFactory
) -> None:
    # recover_lost: every request sent on the lost upstream session sees its 404, some after
    # another one re-created it; the session is re-created once.
    upstream = upstream_factory()
    sidecar = sidecar_factory(upstream.url, upstream={"recover_lost": True})
    async with raw_client() as http:
        raws = [RawSession(http, sidecar.url) for _ in range(RACE_SESSIONS)]
        for raw in raws:
            assert (await raw.initialize()).status_code == 200
        for round_ in range(1, 4):
            upstream.stop()
            upstream = upstream_factory(port=upstream.port)  # it lost every session
            await wake_together(raws)
            for raw in raws:
                assert (await state_of(sidecar, raw.session_id or ""))["resumes"] == round_
            assert len(new_upstream_sessions(upstream, set())) == RACE_SESSIONS
            await upstream_matches_sidecar(sidecar, raws[0])


# ---- what a session was negotiated with (SPEC 2.7) ---------------------------------------

OTHER_VERSION = "2024-11-05"  # one the upstream also accepts in the header


@pytest.mark.parametrize("fast_path", [True, False])
async def test_only_the_initialize_handshake_sets_the_version_a_resume_must_negotiate(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory, fast_path: bool
) -> None:
    sidecar = sidecar_factory(
        upstream.url,
        server={"fast_path": fast_path},
        sessions={"idle_timeout": IDLE, "sweep_interval": SWEEP, "idle_action": "hibernate"},
        store={"flush_interval": 0.2},
    )
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        # A version the upstream does not speak: it negotiates its own, which the client
        # then sends, from its `notifications/initialized` on (the end of the handshake).
        initialize = initialize_message("version-test")
        initialize["params"]["protocolVersion"] = "2099-01-01"
        answer = await raw.post(initialize)
        assert answer.status_code == 200, answer.text
        (result,) = [m["result"] for m in rpc_messages(answer) if "result" in m]
        assert result["protocolVersion"] == PROTOCOL_VERSION
        raw.session_id = answer.headers["mcp-session-id"]
        await raw.notify_initialized()
        session_id = raw.session_id

        # Requests the upstream accepts with another version header, live and waking it,
        # are served, and change nothing about what the session was negotiated with.
        other = {"MCP-Protocol-Version": OTHER_VERSION}
        assert (await raw.call("echo", {"text": "live"}, **other)).status_code == 200
        await wait_state(sidecar, session_id, "dormant")
        assert (await raw.call("echo", {"text": "wake"}, **other)).status_code == 200
        assert (await state_of(sidecar, session_id))["protocol_version"] == PROTOCOL_VERSION

        # ...so the next wake negotiates the same version again and resumes.
        await wait_state(sidecar, session_id, "dormant")
        assert await raw.call_text("echo", {"text": "again"}) == "again"
        shown = await state_of(sidecar, session_id)
        assert (shown["state"], shown["resumes"]) == ("live", 2)
