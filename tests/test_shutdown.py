"""Graceful shutdown (SPEC 3.4, STYLE 5): SIGTERM lets in-flight calls finish, exits 0, keeps
sessions for the next start, and leaves no asyncio task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from sidecar.config import load_settings
from sidecar.server import Server
from tests.peers.mcp_clients import eventually
from tests.peers.ops import Admin, mcp_session, text_of
from tests.peers.processes import HOST, SidecarFactory, UpstreamHandle, free_ports, port_open


async def test_sigterm_lets_a_slow_call_finish_exits_0_and_keeps_the_session(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    admin = Admin(sidecar.admin_url)
    async with mcp_session(sidecar.url) as client:
        # The SDK fetches tools/list after a call whose tool it has not seen, to validate the
        # result: do it now, or that request would hit the stopped sidecar.
        await client.session.list_tools()
        call = asyncio.create_task(client.session.call_tool("slow", {"seconds": 2}))

        async def in_flight() -> bool:
            return bool((await admin.session(client.session_id))["in_flight"] == 1)

        await eventually(in_flight, what="the slow call reaching the sidecar")
        started = time.monotonic()
        # Blocking until the process exits: off the loop, which must keep reading the call.
        stopping = asyncio.create_task(asyncio.to_thread(sidecar.terminate))

        async def draining() -> bool:
            return (await admin.get("/readyz")).status_code == 503

        # While it drains, the admin API still answers, and says it is not ready (SPEC 3.3).
        await eventually(draining, within=1.5, what="/readyz answering 503 while draining")
        assert not call.done()
        assert not port_open(HOST, sidecar.listen_port)  # no new clients while draining
        exit_code = await stopping
        stopped_after = time.monotonic() - started

        assert text_of(await asyncio.wait_for(call, 5)) == "done"
        assert exit_code == 0, sidecar.output()
        assert 0.5 < stopped_after < 8, stopped_after  # waited for the call, not the timeout
        assert "Traceback" not in sidecar.output()

        await asyncio.to_thread(sidecar.restart)
        view = await admin.session(client.session_id)
        assert (view["state"], view["close_reason"]) == ("live", None)
        assert await client.echo("after restart") == "after restart"
    assert "restored 1 live and 0 dormant sessions" in sidecar.output()


async def test_drain_is_bounded_by_drain_timeout(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, server={"drain_timeout": 1})
    admin = Admin(sidecar.admin_url)
    async with mcp_session(sidecar.url, terminate_on_close=False) as client:
        await client.session.list_tools()
        call = asyncio.create_task(client.session.call_tool("slow", {"seconds": 8}))

        async def in_flight() -> bool:
            return bool((await admin.session(client.session_id))["in_flight"] == 1)

        await eventually(in_flight, what="the slow call reaching the sidecar")
        started = time.monotonic()
        exit_code = await asyncio.to_thread(sidecar.terminate)
        stopped_after = time.monotonic() - started
        call.cancel()  # cut off by the bounded drain; the SDK may wait on it forever
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await call
    assert exit_code == 0, sidecar.output()
    assert stopped_after < 4, stopped_after  # 1 s drain, not the 8 s call
    await asyncio.to_thread(sidecar.start)
    assert (await admin.session(client.session_id))["state"] == "live"


async def test_no_task_is_left_pending_after_stop(
    upstream: UpstreamHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    listen, admin_port = free_ports(2)
    settings = load_settings(
        overrides={
            "server": {"listen": f"{HOST}:{listen}"},
            "upstream": {"url": upstream.url},
            "sessions": {"idle_timeout": 1},
            "store": {"path": str(tmp_path / "sessions.db"), "flush_interval": 0.1},
            "admin": {"listen": f"{HOST}:{admin_port}"},
        },
        environ={},
    )
    baseline = asyncio.all_tasks()
    server = Server(settings)
    await server.start()
    try:
        admin = Admin(f"http://{HOST}:{admin_port}")
        url = f"http://{HOST}:{listen}/mcp"
        # Give every part work to do: a session that is used, one closed by the admin API
        # (an upstream DELETE through the closer), and one left open with its GET stream.
        async with mcp_session(url, terminate_on_close=False) as used:
            await used.echo()
        async with mcp_session(url, terminate_on_close=False) as closed:
            response = await admin.request("DELETE", f"/sessions/{closed.session_id}")
            assert response.status_code == 200

        async def deleted_upstream() -> bool:
            return closed.session_id in upstream.deletes()

        await eventually(deleted_upstream, what="the closer's DELETE")
        async with mcp_session(url, terminate_on_close=False) as open_stream:
            await open_stream.echo()
            await server.stop()
    finally:
        if server.service.tasks:
            await server.stop()

    await asyncio.sleep(0)  # let done-callbacks run
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() - baseline if t is not current and not t.done()]
    assert left == [], left
