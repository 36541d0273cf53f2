"""Sessions across sidecar restarts and crashes (SPEC 2.6, 3.4), with the real processes.

A graceful stop (SIGTERM) flushes and exits 0; a crash (SIGKILL) flushes nothing. Either
way the next start restores the live sessions from SQLite, keeps answering 404 for closed
ones, and closes upstream what expired while nobody was watching.
"""

from __future__ import annotations

import asyncio
import signal
import time

from tests.peers.mcp_clients import (
    RawSession,
    eventually,
    live_sessions,
    not_found_body,
    raw_client,
    sdk_session,
    session_row,
    sleep_until,
    text_of,
)
from tests.peers.processes import SidecarFactory, UpstreamHandle

SWEEP = 0.5
FLUSH = 0.2


async def test_live_session_keeps_its_id_across_graceful_restart_and_closed_stays_404(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    idle = 4.0  # long enough for a stop and a start, short enough to watch one expire
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": idle, "sweep_interval": SWEEP},
        store={"flush_interval": FLUSH},
    )
    async with raw_client() as http:
        expired = RawSession(http, sidecar.url)
        assert (await expired.initialize()).status_code == 200
        assert expired.session_id is not None
        await eventually(lambda: expired.session_id in upstream.deletes(), within=idle + 5)

        async with sdk_session(sidecar.url) as (session, get_id):
            session_id = get_id()
            assert session_id is not None
            assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"

            code = await asyncio.to_thread(sidecar.terminate)
            assert code == 0, sidecar.output()
            await asyncio.to_thread(sidecar.start)

            assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
            assert get_id() == session_id
            assert await live_sessions(session) == 1
            row = session_row(sidecar.db_path, session_id)
            assert row is not None
            assert row["state"] == "live"

            response = await expired.post(expired.call_message("echo", request_id=8))
            assert response.status_code == 404
            assert response.json() == not_found_body(8)
            assert upstream.deletes() == [expired.session_id]  # not closed a second time


async def test_session_that_expired_while_sidecar_was_down_is_closed_upstream_at_start(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    idle = 2.0
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": idle, "sweep_interval": SWEEP},
        store={"flush_interval": FLUSH},
    )
    async with sdk_session(upstream.url) as (observer, _), raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        last_used = time.monotonic()
        assert await live_sessions(observer) == 2

        code = await asyncio.to_thread(sidecar.terminate)
        assert code == 0, sidecar.output()
        await sleep_until(last_used + idle + 0.5)
        assert session_id not in upstream.deletes()  # nobody closed it while down

        await asyncio.to_thread(sidecar.start)
        await eventually(lambda: session_id in upstream.deletes(), what="DELETE at start")

        async def upstream_freed_it() -> bool:
            return await live_sessions(observer) == 1

        await eventually(upstream_freed_it, what="upstream session count back to 1")
        response = await raw.post(raw.call_message("echo", request_id=4))
        assert response.status_code == 404
        assert response.json() == not_found_body(4)

    row = session_row(sidecar.db_path, session_id)
    assert row is not None
    assert (row["state"], row["close_reason"]) == ("closed", "idle_timeout")
    assert "restored 0 live and 0 dormant sessions (1 expired while stopped" in sidecar.output()


async def test_session_survives_sigkill_once_its_initialize_was_answered(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    # A flusher that never runs before the crash: only the commit at creation can save it.
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": 30, "sweep_interval": SWEEP},
        store={"flush_interval": 60},
    )
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        # The crash comes the moment the initialize answer has been read, nothing after it.
        assert (await raw.initialize(notify=False)).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        code = await asyncio.to_thread(sidecar.kill)
        assert code == -signal.SIGKILL

        await asyncio.to_thread(sidecar.start)
        await raw.notify_initialized()
        assert await raw.call_text("add", {"a": 20, "b": 22}) == "42"
        assert raw.session_id == session_id

    row = session_row(sidecar.db_path, session_id)
    assert row is not None
    assert row["state"] == "live"
    assert upstream.deletes() == []
    assert [r["status"] for r in posts_for(upstream, session_id)] == [202, 200]


async def test_sdk_client_carries_on_after_sidecar_crash_and_restart(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": 30, "sweep_interval": SWEEP},
        store={"flush_interval": FLUSH},
    )
    async with sdk_session(sidecar.url) as (session, get_id):
        session_id = get_id()
        assert session_id is not None
        # A full round trip first, so no POST of the SDK's is in flight at the crash (the SDK
        # client gives up for good on a POST that fails mid-way).
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"

        assert await asyncio.to_thread(sidecar.kill) == -signal.SIGKILL
        await asyncio.to_thread(sidecar.start)

        assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
        assert get_id() == session_id
    assert upstream.deletes() == [session_id]  # the client's own DELETE on exit, forwarded


def posts_for(upstream: UpstreamHandle, session_id: str) -> list[dict[str, object]]:
    return [r for r in upstream.requests_for(session_id) if r["method"] == "POST"]
