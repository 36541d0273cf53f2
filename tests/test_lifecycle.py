"""The session lifecycle end to end: real FastMCP server, real sidecar process, real SDK client.

Each test starts its own upstream and sidecar (short idle timeouts, a fast sweeper and
flusher) and checks three views of the same event: what the client got, what reached the
upstream (its own request log and session table, not the sidecar's account), and what the
sidecar committed to SQLite. Restarts and crashes are in `test_restart.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import McpError

from tests.peers.mcp_clients import (
    RawSession,
    eventually,
    live_sessions,
    not_found_body,
    open_stream,
    raw_client,
    rpc_messages,
    sdk_session,
    session_row,
    session_rows,
    sleep_until,
    text_of,
)
from tests.peers.processes import SidecarFactory, SidecarHandle, UpstreamHandle

pytestmark = pytest.mark.usefixtures("fast_path")  # sidecars started directly, too

IDLE = 2.0
SWEEP = 0.5
FLUSH = 0.2


def start_sidecar(
    factory: SidecarFactory, upstream: UpstreamHandle, idle: float = IDLE, **sessions: Any
) -> SidecarHandle:
    """The sidecar under test, with timings short enough to watch sessions expire."""
    return factory(
        upstream.url,
        sessions={"idle_timeout": idle, "sweep_interval": SWEEP, **sessions},
        store={"flush_interval": FLUSH},
    )


def posts_for(upstream: UpstreamHandle, session_id: str) -> list[dict[str, Any]]:
    return [r for r in upstream.requests_for(session_id) if r["method"] == "POST"]


async def admin_session(sidecar: SidecarHandle, session_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"{sidecar.admin_url}/sessions/{session_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_not_found(response: httpx.Response, request_id: int | str | None) -> None:
    assert response.status_code == 404, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == not_found_body(request_id)


# ---- pass-through ---------------------------------------------------------------------------


async def test_session_through_sidecar_behaves_like_direct_and_is_stored_live(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream)
    async with sdk_session(upstream.url, initialize=False) as (direct, get_direct_id):
        direct_init = await direct.initialize()
        direct_id = get_direct_id()
        direct_tools = (await direct.list_tools()).tools
        direct_add = await direct.call_tool("add", {"a": 2, "b": 40})
        direct_echo = await direct.call_tool("echo", {"text": "héllo"})

        async with sdk_session(sidecar.url, initialize=False) as (via, get_id):
            assert (await via.initialize()).model_dump() == direct_init.model_dump()
            session_id = get_id()
            assert session_id
            assert [t.model_dump() for t in (await via.list_tools()).tools] == [
                t.model_dump() for t in direct_tools
            ]
            add = await via.call_tool("add", {"a": 2, "b": 40})
            echo = await via.call_tool("echo", {"text": "héllo"})
            assert add.model_dump() == direct_add.model_dump()
            assert echo.model_dump() == direct_echo.model_dump()
            assert text_of(add) == "42"
            assert await live_sessions(via) == 2

            # Committed before the initialize answer reached the client (SPEC 2.6).
            row = session_row(sidecar.db_path, session_id)
            assert row is not None, session_rows(sidecar.db_path)
            assert row["state"] == "live"
            assert row["close_reason"] is None
            assert row["transport"] == "streamable_http"
            assert row["protocol_version"] == "2025-11-25"
            assert "mcp" in row["client_info"]

    # The id the client holds is the upstream's own, not one the sidecar made up.
    created = [r for r in upstream.requests() if r["session_id"] is None]
    assert [r["response_session_id"] for r in created] == [direct_id, session_id]
    assert len(posts_for(upstream, session_id)) >= 4  # initialized, tools/list, 2 tools/call


# ---- idle expiry ----------------------------------------------------------------------------


async def test_idle_session_is_closed_upstream_and_its_stream_ended_then_gets_404(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream)
    async with (
        sdk_session(upstream.url) as (observer, _),
        raw_client() as http,
    ):
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        assert await live_sessions(observer) == 2
        async with open_stream(raw) as stream:
            assert stream.status == 200
            forwarded = len(posts_for(upstream, session_id))

            # Nobody uses the session: the sweeper closes it upstream and ends the stream.
            await eventually(
                lambda: session_id in upstream.deletes(), within=IDLE + 5, what="upstream DELETE"
            )
            await stream.wait_ended(within=5)
            assert stream.error is None, repr(stream.error)  # ended cleanly, not cut

        async def upstream_freed_it() -> bool:
            return await live_sessions(observer) == 1

        await eventually(upstream_freed_it, what="upstream session count back to 1")

        probe = raw.call_message("echo", {"text": "late"}, request_id=77)
        assert_not_found(await raw.post(probe), 77)

    assert len(posts_for(upstream, session_id)) == forwarded  # the probe never got there
    assert upstream.deletes().count(session_id) == 1
    row = session_row(sidecar.db_path, session_id)
    assert row is not None
    assert (row["state"], row["close_reason"]) == ("closed", "idle_timeout")


async def test_expired_session_gets_404_at_request_time_before_any_sweep(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    # A sweeper that would not run for a minute: only the request-time check can expire it.
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": IDLE, "sweep_interval": 60},
        store={"flush_interval": FLUSH},
    )
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        assert await raw.call_text("echo", {"text": "x"}) == "x"
        forwarded = len(posts_for(upstream, session_id))
        await asyncio.sleep(IDLE + 0.4)
        assert upstream.deletes() == []  # nothing has swept it

        batch = [
            raw.call_message("echo", {"text": "a"}, request_id="first"),
            raw.call_message("echo", {"text": "b"}, request_id="second"),
        ]
        assert_not_found(await raw.post(batch), "first")
        assert_not_found(await raw.post({"jsonrpc": "2.0", "method": "notifications/x"}), None)

        await eventually(lambda: session_id in upstream.deletes(), what="upstream DELETE")
    assert len(posts_for(upstream, session_id)) == forwarded
    row = session_row(sidecar.db_path, session_id)
    assert row is not None
    assert (row["state"], row["close_reason"]) == ("closed", "idle_timeout")


async def test_sdk_client_sees_session_terminated_after_idle_timeout(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream)
    async with sdk_session(sidecar.url, terminate_on_close=False) as (session, get_id):
        assert text_of(await session.call_tool("echo", {"text": "x"})) == "x"
        session_id = get_id()
        assert session_id is not None
        await eventually(lambda: session_id in upstream.deletes(), within=IDLE + 5)
        with pytest.raises(McpError, match="Session terminated"):
            await session.call_tool("echo", {"text": "y"})

    # A well-behaved client starts over, and the new session works.
    async with sdk_session(sidecar.url) as (session, get_id):
        assert get_id() not in (None, session_id)
        assert text_of(await session.call_tool("echo", {"text": "again"})) == "again"


# ---- what counts as activity ----------------------------------------------------------------


async def test_open_stream_and_answers_to_server_pings_do_not_keep_session_alive(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream)
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        async with open_stream(raw) as stream:
            # ping_client makes the server send a ping on the GET stream and wait for the answer.
            call = raw.call_message("ping_client", request_id=2)
            pending_call = asyncio.create_task(raw.post(call))
            async with asyncio.timeout(10):
                ping = await stream.messages.get()
            assert ping["method"] == "ping"

            # Cancel the call: its answer ends, and that end is the last activity there is.
            cancel = {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": 2, "reason": "test"},
            }
            assert (await raw.post(cancel)).status_code == 202
            async with asyncio.timeout(10):
                answer = await pending_call
            call_ended = time.monotonic()
            assert answer.status_code == 200
            assert [m.get("id") for m in rpc_messages(answer)] == [2]

            # Answer the ping well inside the idle window: relayed, but not activity.
            await sleep_until(call_ended + 0.6 * IDLE)
            pong = {"jsonrpc": "2.0", "id": ping["id"], "result": {}}
            assert (await raw.post(pong)).status_code == 202

            # Had the answer counted, the session would live until call_ended + 1.6 * IDLE.
            await sleep_until(call_ended + 1.3 * IDLE)
            probe = raw.call_message("echo", {"text": "still there?"}, request_id=9)
            assert_not_found(await raw.post(probe), 9)
            await stream.wait_ended(within=5)

    await eventually(lambda: session_id in upstream.deletes(), what="upstream DELETE")
    row = session_row(sidecar.db_path, session_id)
    assert row is not None
    assert (row["state"], row["close_reason"]) == ("closed", "idle_timeout")


async def test_client_posts_keep_session_alive_past_idle_timeout(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream)
    async with sdk_session(sidecar.url) as (session, get_id):
        session_id = get_id()
        assert session_id is not None
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 1.8 * IDLE:
            assert text_of(await session.call_tool("echo", {"text": str(sent)})) == str(sent)
            sent += 1
            await asyncio.sleep(0.5)
        assert sent >= 6
        assert await live_sessions(session) == 1
        assert session_id not in upstream.deletes()

        def recent_activity_flushed() -> bool:
            row = session_row(sidecar.db_path, session_id)
            return row is not None and time.time() - row["last_activity_at"] < 1.0

        await eventually(recent_activity_flushed, within=3, what="activity written behind")
        row = session_row(sidecar.db_path, session_id)
        assert row is not None
        assert row["state"] == "live"
        assert row["requests"] >= sent


# ---- closing, bad ids, upstream failures ----------------------------------------------------


async def test_client_delete_closes_session_once_and_later_requests_get_404(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream, idle=30)
    async with sdk_session(sidecar.url, terminate_on_close=True) as (session, get_id):
        assert text_of(await session.call_tool("echo", {"text": "bye"})) == "bye"
        session_id = get_id()
        assert session_id is not None

    # The client's own DELETE was forwarded; nothing more is owed upstream.
    assert upstream.deletes() == [session_id]
    row = session_row(sidecar.db_path, session_id)
    assert row is not None
    assert (row["state"], row["close_reason"]) == ("closed", "client_delete")
    forwarded = len(upstream.requests_for(session_id))

    async with raw_client() as http:
        raw = RawSession(http, sidecar.url, session_id=session_id)
        again = raw.call_message("echo", {"text": "again"}, request_id=21)
        assert_not_found(await raw.post(again), 21)
        delete = await http.delete(sidecar.url, headers=raw.headers())
        assert_not_found(delete, None)
    await asyncio.sleep(2 * FLUSH)
    assert len(upstream.requests_for(session_id)) == forwarded
    assert upstream.deletes() == [session_id]


async def test_unknown_session_id_gets_404_without_reaching_upstream(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream)
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url, session_id="f" * 32)
        assert_not_found(await raw.post(raw.call_message("echo", request_id="u-1")), "u-1")
        get = await http.get(sidecar.url, headers=raw.headers(accept="text/event-stream"))
        assert_not_found(get, None)
    assert upstream.requests() == []
    assert session_rows(sidecar.db_path) == {}


@pytest.mark.parametrize(
    "bad_id", ["has space", "x" * 257, "tab\there"], ids=["space", "too-long", "control-char"]
)
async def test_malformed_session_id_gets_400_json_without_reaching_upstream(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory, bad_id: str
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream)
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url, session_id=bad_id)
        response = await raw.post(raw.call_message("echo", {"text": "x"}, request_id=5))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["jsonrpc"] == "2.0"
    assert body["id"] == 5
    assert "Mcp-Session-Id" in body["error"]["message"]
    assert upstream.requests() == []


async def test_upstream_down_gives_502_and_changes_no_session(
    upstream: UpstreamHandle,
    upstream_factory: Callable[..., UpstreamHandle],
    sidecar_factory: SidecarFactory,
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream, idle=30)
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        assert await raw.call_text("echo", {"text": "up"}) == "up"
        await asyncio.sleep(3 * FLUSH)  # let the write-behind settle
        before = session_row(sidecar.db_path, session_id)

        upstream.stop()
        for request_id in (11, 12):
            response = await raw.post(raw.call_message("echo", {"text": "x"}, request_id))
            assert response.status_code == 502, response.text
            assert response.headers["content-type"].startswith("application/json")
            body = response.json()
            assert body["id"] == request_id
            assert body["error"]["code"] == -32000
        await asyncio.sleep(3 * FLUSH)
        assert session_row(sidecar.db_path, session_id) == before
        assert (await admin_session(sidecar, session_id))["state"] == "live"

        # Back on the same port (a fresh process that never heard of the session): the
        # sidecar still holds it live, so the next request is forwarded, not answered 404.
        restarted = upstream_factory(port=upstream.port)
        response = await raw.call("echo", {"text": "after"})
        assert response.status_code == 404
        assert [r["status"] for r in restarted.requests_for(session_id)] == [404]

    # The upstream said the session is gone: the sidecar stops tracking it.
    row = session_row(sidecar.db_path, session_id)
    assert row is not None
    assert (row["state"], row["close_reason"]) == ("closed", "upstream_gone")


# ---- long calls -----------------------------------------------------------------------------


async def test_call_longer_than_idle_timeout_completes_and_keeps_session_alive(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    idle = 1.5
    sidecar = start_sidecar(sidecar_factory, upstream, idle=idle)
    reported: list[float] = []

    arrivals: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append(progress)
        arrivals.append(time.monotonic())

    async with sdk_session(sidecar.url) as (session, get_id):
        session_id = get_id()
        assert session_id is not None
        seconds = 2.5 * idle
        result = await session.call_tool(
            "slow", {"seconds": seconds}, progress_callback=on_progress
        )
        ended = time.monotonic()
        assert text_of(result) == "done"
        assert len(reported) >= 6
        assert reported[-1] == seconds
        assert arrivals[0] < ended - idle  # relayed as they came, not buffered to the end

        # The end of the call is activity too: well into a second idle period, still live.
        await sleep_until(ended + 0.6 * idle)
        assert text_of(await session.call_tool("echo", {"text": "still"})) == "still"
        assert session_id not in upstream.deletes()
        row = session_row(sidecar.db_path, session_id)
        assert row is not None
        assert row["state"] == "live"


# ---- adopting sessions the upstream already has ---------------------------------------------


async def test_unknown_forward_adopts_session_created_directly_at_upstream(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream, unknown="forward")
    async with raw_client() as http:
        direct = RawSession(http, upstream.url)
        assert (await direct.initialize()).status_code == 200
        session_id = direct.session_id
        assert session_id is not None

        via = RawSession(http, sidecar.url, session_id=session_id)
        assert await via.call_text("echo", {"text": "adopted"}) == "adopted"
        row = session_row(sidecar.db_path, session_id)
        assert row is not None
        assert row["state"] == "live"
        assert (await admin_session(sidecar, session_id))["state"] == "live"

        # An id the upstream does not know is forwarded too, and not adopted.
        stranger = RawSession(http, sidecar.url, session_id="0" * 32)
        assert (await stranger.call("echo", {"text": "x"})).status_code == 404
        assert [r["status"] for r in upstream.requests_for("0" * 32)] == [404]
        assert "0" * 32 not in session_rows(sidecar.db_path)

        # Adopted means managed: left idle, it is closed upstream like any other.
        await eventually(lambda: session_id in upstream.deletes(), within=IDLE + 5)
        assert_not_found(await via.post(via.call_message("echo", request_id=3)), 3)


# ---- stateless upstreams --------------------------------------------------------------------


async def test_stateless_upstream_passes_through_and_nothing_is_tracked(
    upstream_factory: Callable[..., UpstreamHandle], sidecar_factory: SidecarFactory
) -> None:
    upstream = upstream_factory(stateless=True)
    sidecar = start_sidecar(sidecar_factory, upstream)
    async with sdk_session(sidecar.url) as (session, get_id):
        assert text_of(await session.call_tool("add", {"a": 1, "b": 2})) == "3"
        assert text_of(await session.call_tool("echo", {"text": "s"})) == "s"
        assert get_id() is None
    assert session_rows(sidecar.db_path) == {}
    async with httpx.AsyncClient(timeout=5) as http:
        health = (await http.get(f"{sidecar.admin_url}/healthz")).json()
    assert health["sessions"]["live"] == 0
    assert all(r["session_id"] is None for r in upstream.requests())
    assert all(r["response_session_id"] is None for r in upstream.requests())


# ---- limits ---------------------------------------------------------------------------------


async def test_session_limit_rejects_initialize_with_503_without_forwarding(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream, idle=30, max_sessions=1)
    async with raw_client() as http:
        first = RawSession(http, sidecar.url)
        assert (await first.initialize()).status_code == 200
        second = RawSession(http, sidecar.url)
        response = await second.initialize()
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) > 0
        body = response.json()
        assert body["jsonrpc"] == "2.0"
        assert body["id"] == 1
        assert body["error"]["code"] == -32000
        assert await first.call_text("echo", {"text": "unharmed"}) == "unharmed"

    initializes = [r for r in upstream.requests() if r["session_id"] is None]
    assert len(initializes) == 1
    assert list(session_rows(sidecar.db_path)) == [first.session_id]
    assert upstream.deletes() == []


async def test_session_limit_evict_idle_closes_older_session_upstream(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(
        sidecar_factory, upstream, idle=30, max_sessions=1, on_limit="evict_idle"
    )
    async with raw_client() as http:
        older = RawSession(http, sidecar.url)
        assert (await older.initialize()).status_code == 200
        newer = RawSession(http, sidecar.url)
        assert (await newer.initialize()).status_code == 200
        assert newer.session_id not in (None, older.session_id)
        assert older.session_id is not None

        row = session_row(sidecar.db_path, older.session_id)
        assert row is not None
        assert (row["state"], row["close_reason"]) == ("closed", "evicted")
        await eventually(lambda: older.session_id in upstream.deletes(), what="upstream DELETE")
        assert_not_found(await older.post(older.call_message("echo", request_id=4)), 4)
        assert await newer.call_text("echo", {"text": "new"}) == "new"


# ---- binding --------------------------------------------------------------------------------


async def test_session_used_with_another_authorization_gets_404_without_reaching_upstream(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = start_sidecar(sidecar_factory, upstream, idle=30)
    async with raw_client() as http:
        owner = RawSession(http, sidecar.url, authorization="Bearer alice-token")
        assert (await owner.initialize()).status_code == 200
        session_id = owner.session_id
        assert session_id is not None
        forwarded = len(upstream.requests_for(session_id))

        thief = RawSession(http, sidecar.url, session_id=session_id)
        thief.authorization = "Bearer mallory-token"
        assert_not_found(await thief.post(thief.call_message("echo", request_id=6)), 6)
        thief.authorization = None  # no credential: identity is the IP, also not the owner's
        assert_not_found(await thief.post(thief.call_message("echo", request_id=7)), 7)
        assert len(upstream.requests_for(session_id)) == forwarded

        # The owner is unaffected, and the session was not closed by the attempts.
        assert await owner.call_text("echo", {"text": "mine"}) == "mine"
    row = session_row(sidecar.db_path, session_id)
    assert row is not None
    assert row["state"] == "live"
