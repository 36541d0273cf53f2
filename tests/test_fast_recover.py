"""`upstream.recover_lost` on the fast path (SPEC 2.7): a session with resume state is served
there like any live session, and one the upstream lost is re-created behind the client's id
and its request sent again, once, as on the full path (`recovery.py` decides for both).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sidecar.clients import client_identity
from sidecar.manager import Limits, SessionManager
from sidecar.metrics import Metrics
from sidecar.sessions import Policy, ResumeState, Transport
from sidecar.store.memory import MemoryStore
from sidecar.transports.fast import FastPath
from sidecar.transports.forwarder import Forwarder, ProxyOptions
from sidecar.transports.lane import Lane
from sidecar.transports.resume import Resumer
from sidecar.upstream import UpstreamPool
from tests.peers.mcp_clients import RawSession, eventually, raw_client
from tests.peers.ops import Admin
from tests.peers.processes import HOST, SidecarFactory, UpstreamHandle, free_port
from tests.test_fast_init import _Connection, _NoCloser


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "full"])
async def test_a_session_the_upstream_lost_in_a_restart_is_recreated_and_the_call_succeeds(
    upstream_factory: Callable[..., UpstreamHandle],
    sidecar_factory: SidecarFactory,
    fast_path: bool,
) -> None:
    upstream = upstream_factory()
    sidecar = sidecar_factory(
        upstream.url, upstream={"recover_lost": True}, server={"fast_path": fast_path}
    )
    admin = Admin(sidecar.admin_url)
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        assert await raw.call_text("echo", {"text": "before"}) == "before"
        upstream.stop()
        restarted = upstream_factory(port=upstream.port)
        assert await raw.call_text("echo", {"text": "after"}) == "after"
        assert raw.session_id == session_id
    shown = await admin.session(session_id)
    assert (shown["state"], shown["resumes"], shown["in_flight"]) == ("live", 1, 0)
    scrape = await admin.scrape()
    assert scrape.value("mcp_sidecar_sessions_resumed_total", cause="upstream_lost") == 1

    # The restarted server answered the old id 404 for the call (and for the DELETE every
    # replaced binding is owed), then served the replayed handshake and the call again on
    # one new session.
    def on_the_old_id() -> list[tuple[str, int]]:
        return sorted((r["method"], r["status"]) for r in restarted.requests_for(session_id))

    await eventually(lambda: on_the_old_id() == [("DELETE", 404), ("POST", 404)], what="DELETE")
    created = {r["response_session_id"] for r in restarted.requests()} - {None, session_id}
    assert len(created) == 1


async def test_a_recover_lost_sessions_plain_post_takes_the_fast_path() -> None:
    """The rules take it (`FastPath.plan`): nothing is handed to aiohttp. The upstream
    refuses connections here, so the answer is the fast path's 502."""
    metrics = Metrics()
    manager = SessionManager(
        MemoryStore(),
        _NoCloser(),  # type: ignore[arg-type]
        metrics,
        policy=Policy(idle_timeout=600),
        limits=Limits(),
        tombstone_ttl=60,
    )
    pool = UpstreamPool(f"http://{HOST}:{free_port()}/mcp", 1.0, 5.0)
    options = ProxyOptions(fast_path=True, recover_lost=True)
    forwarder = Forwarder(manager, pool, metrics, options)
    path = FastPath(forwarder, Resumer(forwarder))
    await manager.create(
        "s-1",
        Transport.STREAMABLE_HTTP,
        client_identity(None, "127.0.0.1"),
        protocol_version="2025-06-18",
        resume=ResumeState(initialize={"capabilities": {}}),
    )
    conn = _Connection()
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
    try:
        Lane(conn, path, "127.0.0.1", "http").feed(  # type: ignore[arg-type]
            b"POST /mcp HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
            b"Mcp-Session-Id: s-1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert (conn.fast, conn.handed) == (1, [])
        await asyncio.wait_for(conn.ended.wait(), 10)
        assert bytes(conn.transport.written).startswith(b"HTTP/1.1 502 ")
    finally:
        path.close()
