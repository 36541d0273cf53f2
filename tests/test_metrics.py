"""The Prometheus metrics (SPEC 3.3) move with what really happens to sessions and requests.

Each test scrapes a real sidecar's /metrics before and after real MCP traffic and reads the
page with prometheus_client's own parser, so a name, a label or the text format going wrong
fails here the way it would fail in a Prometheus server.
"""

from __future__ import annotations

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

from tests.peers.mcp_clients import eventually
from tests.peers.ops import (
    Admin,
    Scrape,
    assert_session_not_found,
    http_client,
    mcp_session,
    raw_post,
    text_of,
)
from tests.peers.processes import SidecarFactory, UpstreamHandle

P = "mcp_sidecar_"
DOCUMENTED = [
    "sessions",
    "sessions_created",
    "sessions_closed",
    "requests",
    "rejected",
    "request_duration_seconds",
    "upstream_close",
    "sweep_duration_seconds",
    "store_flush_duration_seconds",
    "stateless_requests",
    "sessions_hibernated",
    "sessions_resumed",
    "resume_failures",
]


async def test_every_documented_metric_is_exported(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    scrape = await Admin(sidecar.admin_url).scrape()
    missing = [name for name in DOCUMENTED if P + name not in scrape.families]
    assert missing == [], scrape.text
    assert scrape.families[P + "sessions"].type == "gauge"
    for histogram in ("request_duration_seconds", "sweep_duration_seconds"):
        assert scrape.families[P + histogram].type == "histogram"
    # Rejection reasons exist at zero from the start, so rate() works before the first one.
    for reason in ("expired", "unknown", "binding", "limit", "origin", "too_large"):
        assert scrape.has(P + "rejected_total", reason=reason)


async def test_session_lifecycle_moves_the_metrics(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"idle_timeout": 1.5})
    admin = Admin(sidecar.admin_url)
    before = await admin.scrape()
    assert before.value(P + "sessions", state="live") == 0
    assert before.value(P + "sessions_created_total") == 0
    assert before.value(P + "sessions_closed_total", reason="idle_timeout") == 0

    async def all_counted() -> Scrape | None:
        # The SDK has the tool's answer once the last SSE event arrives, a moment before the
        # sidecar ends that request and counts it: poll rather than read once.
        scrape = await admin.scrape()
        counted = scrape.value(P + "requests_total", method="POST", outcome="forwarded")
        timed = scrape.value(P + "request_duration_seconds_count")
        return scrape if counted >= 3 and timed >= counted else None

    async with mcp_session(sidecar.url, terminate_on_close=False) as client:
        assert await client.echo("metrics") == "metrics"
        during = await eventually(all_counted, what="the three POSTs being counted and timed")
        session_id = client.session_id
    assert during.value(P + "sessions", state="live") == 1
    assert during.value(P + "sessions_created_total") == 1
    # initialize, notifications/initialized, tools/call: all POSTs, all forwarded.
    forwarded = during.value(P + "requests_total", method="POST", outcome="forwarded")
    assert forwarded >= 3
    assert during.value(P + "request_duration_seconds_count") >= forwarded
    assert during.value(P + "request_duration_seconds_sum") > 0

    async def flushed() -> bool:
        return (await admin.scrape()).value(P + "store_flush_duration_seconds_count") > 0

    await eventually(flushed, what="an activity flush being measured")

    async def expired() -> bool:
        return (await admin.scrape()).value(P + "sessions", state="live") == 0

    await eventually(expired, what="the idle session expiring")
    after = await admin.scrape()
    assert after.value(P + "sessions_closed_total", reason="idle_timeout") == 1
    assert after.value(P + "sessions", state="closed") == 1
    assert after.value(P + "sessions_created_total") == 1
    assert after.value(P + "sweep_duration_seconds_count") > 0

    async def closed_upstream() -> bool:
        scrape = await admin.scrape()
        return scrape.value(P + "upstream_close_total", result="ok") == 1

    await eventually(closed_upstream, what="the upstream DELETE being counted")
    assert session_id in upstream.deletes()

    rejected = after.value(P + "rejected_total", reason="expired")
    assert_session_not_found(await raw_post(sidecar.url, session_id))
    last = await admin.scrape()
    assert last.value(P + "rejected_total", reason="expired") == rejected + 1
    assert last.value(P + "requests_total", method="POST", outcome="rejected") >= 1
    assert last.value(P + "sessions_closed_total", reason="idle_timeout") == 1


async def test_admin_and_client_closes_are_counted_by_reason(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    admin = Admin(sidecar.admin_url)
    async with mcp_session(sidecar.url) as client:
        await client.echo()
    async with mcp_session(sidecar.url, terminate_on_close=False) as closed_by_admin:
        await closed_by_admin.echo()
    assert (await admin.request("DELETE", f"/sessions/{closed_by_admin.session_id}")).is_success
    async with mcp_session(sidecar.url) as other:
        assert (await admin.request("DELETE", f"/sessions/{other.session_id}")).is_success
        with pytest.raises(McpError, match="Session terminated"):
            await other.echo()

    async def counted() -> bool:
        scrape = await admin.scrape()
        return scrape.value(P + "upstream_close_total", result="ok") == 2

    await eventually(counted, what="two upstream closes")
    scrape = await admin.scrape()
    assert scrape.value(P + "sessions_closed_total", reason="client_delete") == 1
    assert scrape.value(P + "sessions_closed_total", reason="admin") == 2
    assert scrape.value(P + "sessions", state="live") == 0
    assert scrape.value(P + "sessions", state="closed") == 3
    assert scrape.value(P + "sessions_created_total") == 3
    assert scrape.value(P + "requests_total", method="DELETE", outcome="forwarded") == 1


async def test_stateless_upstream_traffic_is_counted_and_not_tracked(
    upstream_factory: object, sidecar_factory: SidecarFactory
) -> None:
    assert callable(upstream_factory)
    stateless: UpstreamHandle = upstream_factory(stateless=True)
    sidecar = sidecar_factory(stateless.url)
    admin = Admin(sidecar.admin_url)
    async with (
        http_client() as http,
        streamable_http_client(sidecar.url, http_client=http) as (read, write, get_session_id),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert get_session_id() is None
        assert text_of(await session.call_tool("add", {"a": 2, "b": 5})) == "7"
        assert text_of(await session.call_tool("echo", {"text": "x"})) == "x"
    scrape: Scrape = await admin.scrape()
    # initialize, notifications/initialized and two calls, each passed through untracked.
    assert scrape.value(P + "stateless_requests_total") >= 4
    assert scrape.value(P + "sessions_created_total") == 0
    assert scrape.value(P + "sessions", state="live") == 0
    assert (await admin.json("/sessions"))["total"] == 0
