"""The admin API (SPEC 3.3) of a real sidecar in front of a real FastMCP server.

Sessions are made by the MCP Python SDK client through the sidecar's proxy port; the admin
API is asked over HTTP; what reached the upstream is read from the upstream's own request
log, never from the sidecar's account of it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
from mcp.shared.exceptions import McpError
from mcp.types import Implementation

from tests.peers.mcp_clients import eventually
from tests.peers.ops import (
    Admin,
    Connected,
    assert_session_not_found,
    mcp_session,
    raw_post,
    text_of,
)
from tests.peers.processes import SidecarFactory, SidecarHandle, UpstreamHandle
from tests.test_fast_path import exchange

VIEW_KEYS = {
    "id",
    "created_at",
    "last_activity_at",
    "idle_seconds",
    "expires_at",
    "persistent",
    "transport",
    "protocol_version",
    "client",
    "requests",
    "state",
    "close_reason",
}


def admin_of(sidecar: SidecarHandle, token: str = "") -> Admin:
    return Admin(sidecar.admin_url, token)


async def upstream_deleted(upstream: UpstreamHandle, session_id: str) -> None:
    async def check() -> bool:
        return session_id in upstream.deletes()

    await eventually(check, what=f"upstream DELETE of {session_id[:8]}")


async def test_healthz_counts_live_active_idle_persistent_and_clients(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    admin = admin_of(sidecar)
    assert await admin.health() == {
        "live": 0,
        "active": 0,
        "idle": 0,
        "persistent": 0,
        "dormant": 0,
        "by_client": {},
    }
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(mcp_session(sidecar.url))
        await stack.enter_async_context(mcp_session(sidecar.url))
        authed = await stack.enter_async_context(
            mcp_session(sidecar.url, headers={"Authorization": "Bearer alice"})
        )
        pinned = await admin.request(
            "PUT", f"/sessions/{authed.session_id}/persistent", json={"persistent": True}
        )
        assert pinned.status_code == 200, pinned.text
        health = await admin.health()
        assert health["live"] == 3
        assert health["active"] == 3
        assert health["idle"] == 0
        assert health["persistent"] == 1
        clients = health["by_client"]
        assert clients.pop("ip:127.0.0.1") == 2
        (identity, count), *_ = clients.items()
        assert len(clients) == 1
        assert count == 1
        assert identity.startswith("auth:")
        assert "alice" not in identity
        ready = await admin.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})

    # Leaving the SDK sessions sent their DELETEs, the pinned one's too (SPEC 2.4).
    assert await admin.health() == {
        "live": 0,
        "active": 0,
        "idle": 0,
        "persistent": 0,
        "dormant": 0,
        "by_client": {},
    }


async def test_healthz_idle_counts_sessions_quiet_for_a_minute(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    admin = admin_of(sidecar)
    async with (
        mcp_session(sidecar.url, terminate_on_close=False) as quiet,
        mcp_session(sidecar.url, terminate_on_close=False) as busy,
    ):
        await busy.echo()
    assert await asyncio.to_thread(sidecar.terminate) == 0
    with sqlite3.connect(sidecar.db_path) as db:
        db.execute(
            "UPDATE sessions SET last_activity_at=? WHERE id=?",
            (time.time() - 120, quiet.session_id),
        )
    db.close()
    await asyncio.to_thread(sidecar.restart)

    health = await admin.health()
    assert health == {
        "live": 2,
        "active": 1,
        "idle": 1,
        "persistent": 0,
        "dormant": 0,
        "by_client": {"ip:127.0.0.1": 2},
    }
    assert (await admin.session(quiet.session_id))["idle_seconds"] >= 119


async def test_sessions_list_filters_pages_and_counts_total(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    admin = admin_of(sidecar)
    async with AsyncExitStack() as stack:
        sessions: list[Connected] = []
        for name in ("alpha", "beta", "gamma"):
            sessions.append(
                await stack.enter_async_context(
                    mcp_session(
                        sidecar.url,
                        client_info=Implementation(name=f"{name}-ide", version="1.0"),
                        terminate_on_close=False,
                    )
                )
            )
        ids = [s.session_id for s in sessions]

        listing = await admin.json("/sessions")
        assert listing["total"] == 3
        assert [s["id"] for s in listing["sessions"]] == ids  # oldest first
        for view in listing["sessions"]:
            assert view.keys() >= VIEW_KEYS
            assert view["state"] == "live"
            assert view["transport"] == "streamable_http"
            assert view["protocol_version"] == "2025-11-25"
            assert view["client"] == "ip:127.0.0.1"
            assert view["persistent"] is False
            assert view["close_reason"] is None
            assert view["requests"] >= 1

        page = await admin.json("/sessions?limit=2")
        assert (page["total"], [s["id"] for s in page["sessions"]]) == (3, ids[:2])
        page = await admin.json("/sessions?limit=2&offset=2")
        assert (page["total"], [s["id"] for s in page["sessions"]]) == (3, ids[2:])
        page = await admin.json("/sessions?offset=5")
        assert (page["total"], page["sessions"]) == (3, [])

        beta = await admin.json("/sessions?client=beta-ide")
        assert (beta["total"], [s["id"] for s in beta["sessions"]]) == (1, ids[1:2])
        by_identity = await admin.json("/sessions?client=ip:127.0.0.1")
        assert by_identity["total"] == 3
        assert (await admin.json("/sessions?client=nobody"))["total"] == 0

        assert (await admin.request("DELETE", f"/sessions/{ids[0]}")).status_code == 200
        closed = await admin.json("/sessions?state=closed")
        assert closed["total"] == 1
        assert closed["sessions"][0]["id"] == ids[0]
        assert closed["sessions"][0]["close_reason"] == "admin"
        assert (await admin.json("/sessions?state=live"))["total"] == 2
        assert (await admin.json("/sessions?state=closed&client=beta"))["total"] == 0


BAD_FILTERS = [
    ("state=open", "state"),
    ("limit=0", "limit"),
    ("limit=abc", "limit"),
    ("limit=100000", "limit"),
    ("offset=-1", "offset"),
    ("offset=1.5", "offset"),
]


async def test_sessions_list_rejects_bad_filters_with_json_400(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    for query, named in BAD_FILTERS:
        response = await admin_of(sidecar).get(f"/sessions?{query}")
        assert response.status_code == 400, query
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert named in error, (query, error)
        assert "allowed" in error, (query, error)


async def test_show_session_and_unknown_id_is_404(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"idle_timeout": 600})
    admin = admin_of(sidecar)
    async with mcp_session(sidecar.url, terminate_on_close=False) as client:
        await client.echo()
        view = await admin.session(client.session_id)
    assert view.keys() >= VIEW_KEYS
    assert view["id"] == client.session_id
    assert view["state"] == "live"
    assert view["client_label"] == "ops-test/1.0 (ops-client 2.3)"
    assert 0 <= view["idle_seconds"] < 30
    assert view["expires_at"] is not None
    assert view["requests"] >= 3  # initialize, initialized, tools/call

    missing = await admin.get("/sessions/not-a-session")
    assert missing.status_code == 404
    assert missing.json() == {"error": "no such session"}


async def test_admin_close_deletes_upstream_and_the_client_then_gets_404(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"idle_timeout": 600})
    admin = admin_of(sidecar)
    async with (
        mcp_session(sidecar.url) as doomed,
        mcp_session(sidecar.url) as witness,
    ):
        assert text_of(await witness.session.call_tool("live_sessions")) == "2"

        response = await admin.request("DELETE", f"/sessions/{doomed.session_id}")
        assert response.status_code == 200, response.text
        closed = response.json()
        assert (closed["state"], closed["close_reason"]) == ("closed", "admin")

        # Closed exactly as a sweep closes: the upstream gets the DELETE and frees it.
        await upstream_deleted(upstream, doomed.session_id)
        assert text_of(await witness.session.call_tool("live_sessions")) == "1"
        calls_before = len(upstream.requests_for(doomed.session_id))

        with pytest.raises(McpError, match="Session terminated"):
            await doomed.echo()
        assert_session_not_found(await raw_post(sidecar.url, doomed.session_id))
        # ... answered by the sidecar: the upstream saw neither request.
        late = upstream.requests_for(doomed.session_id)[calls_before:]
        assert [r for r in late if r["method"] == "POST"] == []

        again = await admin.request("DELETE", f"/sessions/{doomed.session_id}")
        assert again.status_code == 409
        assert "already closed" in again.json()["error"]
        unknown = await admin.request("DELETE", "/sessions/never-seen")
        assert unknown.status_code == 404
        assert unknown.json() == {"error": "no such session"}
        assert (await admin.session(doomed.session_id))["close_reason"] == "admin"


async def test_pinned_session_outlives_idle_timeout_and_expires_once_unpinned(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"idle_timeout": 1.5})
    admin = admin_of(sidecar)
    async with (
        mcp_session(sidecar.url, terminate_on_close=False) as pinned,
        mcp_session(sidecar.url, terminate_on_close=False) as plain,
    ):
        response = await admin.request(
            "PUT", f"/sessions/{pinned.session_id}/persistent", json={"persistent": True}
        )
        assert response.status_code == 200, response.text
        assert response.json()["persistent"] is True
        assert response.json()["expires_at"] is None

        async def plain_expired() -> bool:
            return bool((await admin.session(plain.session_id))["state"] == "closed")

        await eventually(plain_expired, what="the unpinned session expiring")
        await asyncio.sleep(1.0)  # well past idle_timeout for the pinned one as well
        view = await admin.session(pinned.session_id)
        assert (view["state"], view["persistent"]) == ("live", True)
        assert view["idle_seconds"] > 1.5

        response = await admin.request(
            "PUT", f"/sessions/{pinned.session_id}/persistent", json={"persistent": False}
        )
        assert response.status_code == 200, response.text
        assert response.json()["persistent"] is False

        async def pinned_expired() -> bool:
            view = await admin.session(pinned.session_id)
            return bool(view["state"] == "closed" and view["close_reason"] == "idle_timeout")

        # Already idle for longer than the timeout: the next sweep (1 s) closes it.
        await eventually(pinned_expired, within=3.0, what="the unpinned session expiring")
        await upstream_deleted(upstream, pinned.session_id)
        with pytest.raises(McpError, match="Session terminated"):
            await pinned.echo()


BAD_BODIES = [b"yes", b'{"persistent": "true"}', b'{"persistent": 1}', b"{}", b"[true]", b"\xff"]


async def test_set_persistent_rejects_a_bad_body_with_400(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    admin = admin_of(sidecar)
    async with mcp_session(sidecar.url, terminate_on_close=False) as client:
        for body in BAD_BODIES:
            response = await admin.request(
                "PUT",
                f"/sessions/{client.session_id}/persistent",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code == 400, body
            assert "persistent" in response.json()["error"]
        assert (await admin.session(client.session_id))["persistent"] is False
    unknown = await admin.request(
        "PUT", "/sessions/never-seen/persistent", json={"persistent": True}
    )
    assert unknown.status_code == 404
    assert "error" in unknown.json()


async def test_admin_token_guards_everything_but_the_probes(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    token = "s3cret-admin-token"
    sidecar = sidecar_factory(upstream.url, admin={"token": token})
    anonymous, wrong, right = admin_of(sidecar), admin_of(sidecar, "nope"), admin_of(sidecar, token)
    async with mcp_session(sidecar.url, terminate_on_close=False) as client:
        guarded = [
            ("GET", "/sessions"),
            ("GET", f"/sessions/{client.session_id}"),
            ("GET", "/metrics"),
            ("GET", "/clients/stuck"),
            ("PUT", f"/sessions/{client.session_id}/persistent"),
            ("DELETE", f"/sessions/{client.session_id}"),
        ]
        for admin in (anonymous, wrong):
            for method, path in guarded:
                response = await admin.request(method, path, json={"persistent": True})
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["content-type"].startswith("application/json")
                assert "admin.token" in response.json()["error"]
                assert response.headers["www-authenticate"].startswith("Bearer")
        basic = await anonymous.get("/sessions", headers={"Authorization": f"Basic {token}"})
        assert basic.status_code == 401
        # Nothing above reached a handler: the session is neither pinned nor closed.
        view = await right.session(client.session_id)
        assert (view["state"], view["persistent"]) == ("live", False)

        for path in ("/sessions", "/metrics", "/clients/stuck", "/readyz"):
            assert (await right.get(path)).status_code == 200, path
        assert (await right.health())["live"] == 1

        for admin in (anonymous, wrong):
            health = await admin.get("/healthz")
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
            ready = await admin.get("/readyz")
            assert ready.status_code == 200


async def test_clients_stuck_names_clients_that_keep_using_closed_ids(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"idle_timeout": 600})
    admin = admin_of(sidecar)
    assert await admin.json("/clients/stuck") == {"clients": []}
    stubborn = Implementation(name="stubborn-agent", version="0.9")
    closed_ids = []
    for _ in range(2):
        async with mcp_session(
            sidecar.url,
            headers={"User-Agent": "stuck-ua/4.2"},
            client_info=stubborn,
            terminate_on_close=False,
        ) as client:
            await client.echo()
        closed_ids.append(client.session_id)
        assert (await admin.request("DELETE", f"/sessions/{client.session_id}")).status_code == 200
    async with mcp_session(sidecar.url, terminate_on_close=False) as healthy:
        await healthy.echo()

    for session_id, times in zip(closed_ids, (3, 2), strict=True):
        for _ in range(times):
            assert_session_not_found(await raw_post(sidecar.url, session_id))

    clients = (await admin.json("/clients/stuck"))["clients"]
    assert len(clients) == 1, clients
    (stuck,) = clients
    assert stuck["client"] == "stuck-ua/4.2 (stubborn-agent 0.9)"
    assert (stuck["requests"], stuck["sessions"]) == (5, 2)
    assert stuck["first_seen"] <= stuck["last_seen"]


async def test_admin_without_a_token_answers_only_loopback_host_names(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    """SPEC 2.5: a page whose DNS name was rebound to 127.0.0.1 sends its own name as Host;
    without a token the admin API must refuse it, on every path, before any handler runs."""
    sidecar = sidecar_factory(upstream.url)
    admin = admin_of(sidecar)
    port = sidecar.admin_url.rsplit(":", 1)[1]
    async with mcp_session(sidecar.url, terminate_on_close=False) as client:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "10.1.2.3"):
            for method, path in (
                ("GET", "/sessions"),
                ("GET", "/healthz"),
                ("DELETE", f"/sessions/{client.session_id}"),
            ):
                response = await admin.request(method, path, headers={"Host": host})
                assert response.status_code == 403, (host, method, path)
                assert "Host not allowed" in response.json()["error"]
        # Nothing reached a handler: the session is still live.
        assert (await admin.session(client.session_id))["state"] == "live"
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "LocalHost"):
            response = await admin.get("/sessions", headers={"Host": host})
            assert response.status_code == 200, host


def _head(host_lines: list[str], target: str = "/sessions", version: str = "1.1") -> bytes:
    head = f"GET {target} HTTP/{version}\r\n" + "".join(f"Host: {h}\r\n" for h in host_lines)
    return head.encode("latin-1") + b"\r\n"


async def test_admin_host_check_takes_only_host_and_port_naming_loopback(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    """SPEC 2.5: without a token, `Host` must be exactly `host[:port]` naming loopback or the
    listener (IPv6 in brackets), once; an absolute-form target's authority must name it too.
    Raw heads, as a browser never sends them but a crafted client can."""
    sidecar = sidecar_factory(upstream.url)
    port = int(sidecar.admin_url.rsplit(":", 1)[1])
    refused = [
        _head(["localhost:80@evil.com"]),
        _head([f"localhost:{port}@evil.com"]),
        _head(["user@localhost"]),
        _head(["localhost:0"]),
        _head(["localhost:65536"]),
        _head(["localhost:99999"]),
        _head(["localhost:"]),
        _head(["local host"]),
        _head(["localhost evil.com"]),
        _head(["localhost.."]),
        _head([""]),
        _head(["::1"]),
        _head(["[::1"]),
        _head(["[fe80::1%25lo]"]),
        _head(["[::ffff:127.0.0.1]"]),
        _head(["evil.com"], target="http://localhost/sessions"),
        _head(["localhost"], target="http://evil.com/sessions"),
        _head(["localhost"], target="http://localhost:80@evil.com/sessions"),
    ]
    answers = await exchange_each(port, refused)
    for request, (status, _, body) in zip(refused, answers, strict=True):
        assert status == 403, (request, status, body)
        assert "Host not allowed" in json.loads(body)["error"], request
    # Two `Host` headers are malformed HTTP to aiohttp's parser, before any handler: 400 in
    # JSON, counted, as on the proxy port.
    twice = [_head(["localhost", "evil.com"]), _head(["evil.com", "localhost"])]
    for request, (status, _, body) in zip(twice, await exchange_each(port, twice), strict=True):
        assert status == 400, (request, status, body)
        assert "error" in json.loads(body), request
    allowed = [
        _head(["localhost"]),
        _head([f"localhost:{port}"]),
        _head([f"127.0.0.1:{port}"]),
        _head(["LocalHost."]),
        _head(["[::1]"]),
        _head([f"[::1]:{port}"]),
        _head(["[0:0:0:0:0:0:0:1]"]),
        _head([f"localhost:{port}"], target=f"http://localhost:{port}/sessions"),
        _head([], version="1.0"),
    ]
    for request, (status, _, body) in zip(allowed, await exchange_each(port, allowed), strict=True):
        assert status == 200, (request, status, body)
    metrics = (await admin_of(sidecar).get("/metrics")).text
    assert f'rejected_total{{reason="admin_host"}} {float(len(refused))}' in metrics
    assert 'rejected_total{reason="malformed_http"} 2.0' in metrics


async def exchange_each(port: int, requests: list[bytes]) -> list[tuple[int, list[Any], bytes]]:
    """Each raw request on a connection of its own (a refused one may close it)."""
    return [(await exchange(port, [request]))[0] for request in requests]
