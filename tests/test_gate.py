"""No side doors (SPEC 2.5): every spelling of a path, every naming of a session, one gate.

The real sidecar in front of a real FastMCP server (whose own request log says what reached
it) and server-everything (Express, which routes `/MCP` and `/mcp/` as `/mcp`). A refused
request must be answered by the sidecar and never appear in the upstream's log; an
`initialize` the upstream accepts on any path must be visible in the sidecar's admin API.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.peers.mcp_clients import (
    ACCEPT_BOTH,
    PROTOCOL_VERSION,
    RawSession,
    initialize_message,
    raw_client,
)
from tests.peers.node_peers import node_available, start_server_everything
from tests.peers.processes import SidecarFactory, UpstreamHandle

MCP_SPELLINGS = ("/MCP", "/Mcp", "/mcp/", "//mcp", "/mcp//", "/%6Dcp")
MESSAGE_SPELLINGS = ("/messages/", "/messages", "/MESSAGES/", "/messages/x", "/messages//y")

INITIALIZE: dict[str, Any] = initialize_message("gate-test")
PING = {"jsonrpc": "2.0", "id": 9, "method": "ping"}


def _headers(session_id: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json"}
    if session_id is not None:
        headers["Mcp-Session-Id"] = session_id
        headers["MCP-Protocol-Version"] = PROTOCOL_VERSION
    return headers | extra


async def _tracked_ids(http: httpx.AsyncClient, admin_url: str) -> set[str]:
    answer = await http.get(admin_url + "/sessions", params={"state": "live"})
    return {s["id"] for s in answer.json()["sessions"]}


async def _closed_session(http: httpx.AsyncClient, url: str) -> str:
    raw = RawSession(http, url)
    assert (await raw.initialize()).status_code == 200
    assert raw.session_id is not None
    assert (await http.delete(url, headers=raw.headers())).status_code < 300
    return raw.session_id


async def _live_session(http: httpx.AsyncClient, url: str, authorization: str) -> str:
    raw = RawSession(http, url, authorization=authorization)
    assert (await raw.initialize()).status_code == 200
    assert raw.session_id is not None
    return raw.session_id


@pytest.mark.parametrize("path", [*MCP_SPELLINGS, "/other", "/mcp/extra"])
async def test_refused_ids_never_reach_upstream_on_any_path(
    path: str, upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    async with raw_client() as http:
        closed = await _closed_session(http, sidecar.url)
        foreign = await _live_session(http, sidecar.url, "Bearer owner")
        for session_id in (closed, foreign, "never-issued-id"):
            for method in ("POST", "GET", "DELETE"):
                answer = await http.request(
                    method,
                    sidecar.base + path,
                    content=json.dumps(PING) if method == "POST" else None,
                    headers=_headers(session_id, Authorization="Bearer intruder"),
                )
                assert answer.status_code == 404, (path, method, answer.text)
                assert answer.json()["error"]["code"] == -32001
        reached = [r for r in upstream.requests() if r["path"] != "/mcp"]
        assert reached == []
        assert [r["method"] for r in upstream.requests_for(closed)] == ["POST", "DELETE"]
        assert [r["method"] for r in upstream.requests_for(foreign)] == [
            "POST"
        ]  # notifications/initialized
        assert upstream.requests_for("never-issued-id") == []


async def test_two_session_headers_get_400_json(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    async with raw_client() as http:
        first = await _live_session(http, sidecar.url, "Bearer a")
        second = await _live_session(http, sidecar.url, "Bearer a")
        before = len(upstream.requests())
        for names in ((first, second), (first, first)):
            headers = [("Accept", ACCEPT_BOTH), ("Content-Type", "application/json")]
            headers += [("Authorization", "Bearer a")]
            headers += [
                ("mcp-session-id" if i else "Mcp-Session-Id", n) for i, n in enumerate(names)
            ]
            for path in ("/mcp", "/other"):
                answer = await http.post(
                    sidecar.base + path, content=json.dumps(PING), headers=headers
                )
                assert answer.status_code == 400, answer.text
                assert answer.json()["jsonrpc"] == "2.0"
        assert len(upstream.requests()) == before
        metrics = (await http.get(sidecar.admin_url + "/metrics")).text
        assert 'rejected_total{reason="ambiguous_session"} 4.0' in metrics


@pytest.mark.parametrize(
    "query",
    ["session_id=A&session_id=B", "sessionId=A&session_id=B", "session_id=A&session_id=A"],
)
async def test_message_post_naming_two_sessions_gets_400(
    query: str, sse_upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(sse_upstream.url)
    async with raw_client() as http:
        for path in (*MESSAGE_SPELLINGS, "/elsewhere"):
            answer = await http.post(
                f"{sidecar.base}{path}?{query}", content=json.dumps(PING), headers=_headers()
            )
            assert answer.status_code == 400, (path, answer.text)
            assert answer.json()["jsonrpc"] == "2.0"
    assert sse_upstream.requests() == []


@pytest.mark.parametrize("path", [*MESSAGE_SPELLINGS, "/elsewhere"])
async def test_unknown_legacy_id_never_reaches_upstream_on_any_path(
    path: str, sse_upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(sse_upstream.url)
    async with raw_client() as http:
        answer = await http.post(
            f"{sidecar.base}{path}?session_id=0123456789abcdef0123456789abcdef",
            content=json.dumps(PING),
            headers=_headers(),
        )
        assert answer.status_code == 404, answer.text
    assert sse_upstream.requests() == []


async def test_session_naming_requests_on_legacy_paths_get_the_session_rules(
    sse_upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(sse_upstream.url)
    unknown = "0123456789abcdef0123456789abcdef"
    async with raw_client() as http:
        for method, path, headers in (
            ("GET", f"/sse?session_id={unknown}", _headers()),
            ("GET", "/sse", _headers(unknown)),
            ("POST", "/messages/", _headers(unknown)),
        ):
            answer = await http.request(
                method, sidecar.base + path, content=json.dumps(PING), headers=headers
            )
            assert answer.status_code == 404, (method, path, answer.text)
    assert sse_upstream.requests() == []


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(INITIALIZE).replace('"id": 1', '"id": 1.0').encode(),
        b"\xef\xbb\xbf" + json.dumps(INITIALIZE).encode(),
        b" \n\t" + json.dumps(INITIALIZE).encode() + b"\n ",
        json.dumps([INITIALIZE]).encode(),
    ],
    ids=["id-1.0", "bom", "whitespace", "batch"],
)
async def test_initialize_spellings_the_upstream_accepts_are_tracked(
    body: bytes, upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    async with raw_client() as http:
        answer = await http.post(sidecar.url, content=body, headers=_headers())
        issued = answer.headers.get("mcp-session-id")
        tracked = await _tracked_ids(http, sidecar.admin_url)
    created = {
        r["response_session_id"]
        for r in upstream.requests()
        # The Python SDK's 400 carries a throw-away id that it frees at once.
        if r["response_session_id"] and 200 <= r["status"] < 300
    }
    assert created <= tracked
    if answer.status_code == 200:
        assert issued in tracked


_NODE_SKIP = node_available()


@pytest.mark.node
@pytest.mark.skipif(_NODE_SKIP is not None, reason=_NODE_SKIP or "")
@pytest.mark.parametrize("path", ["/mcp", "/MCP", "/mcp/", "/Mcp"])
async def test_initialize_on_a_spelling_express_accepts_is_tracked(
    path: str, tmp_path: Path, sidecar_factory: SidecarFactory
) -> None:
    # The TypeScript SDK takes `"id": 1.0` as an integer id (FastMCP refuses it, so only this
    # peer proves it); `/mcp` alone checks the id, the other spellings the routing too.
    body = json.dumps(INITIALIZE | {"id": 1.0}).encode()
    with start_server_everything(tmp_path, "streamable-http") as server:
        sidecar = sidecar_factory(server.url)
        async with raw_client() as http:
            answer = await http.post(sidecar.base + path, content=body, headers=_headers())
            assert answer.status_code == 200, answer.text
            issued = answer.headers["mcp-session-id"]
            assert issued in await _tracked_ids(http, sidecar.admin_url)


async def _open_legacy_stream(
    http: httpx.AsyncClient, sse_url: str, authorization: str
) -> tuple[str, httpx.Response, AsyncIterator[str]]:
    """A legacy session held open by its SSE stream: its id (from the endpoint event), the
    stream, and its line reader (kept: a reader collected by the garbage collector closes
    the stream, which ends the session)."""
    request = http.build_request(
        "GET", sse_url, headers={"Accept": "text/event-stream", "Authorization": authorization}
    )
    stream = await http.send(request, stream=True)
    assert stream.status_code == 200
    lines = stream.aiter_lines()
    while not (line := await anext(lines)).startswith("data: "):
        pass
    return line.rsplit("session_id=", 1)[1].strip(), stream, lines


@pytest.mark.parametrize("fast_path", [False, True], ids=["full-path", "fast-path"])
async def test_a_session_named_in_the_query_gets_the_session_rules_on_the_mcp_endpoint(
    fast_path: bool,
    upstream_factory: Callable[..., UpstreamHandle],
    sidecar_factory: SidecarFactory,
) -> None:
    """SPEC 2.5: the legacy query parameter names a session on the MCP endpoint too. Someone
    else's legacy id, or a Streamable HTTP id (it belongs in the header), is not a legacy
    session this client holds: 404 as unknown; two namings are 400; none reach the upstream."""
    upstream = upstream_factory("both")
    sidecar = sidecar_factory(upstream.url, server={"fast_path": fast_path})
    async with raw_client() as http:
        legacy_id, stream, _lines = await _open_legacy_stream(http, sidecar.sse_url, "Bearer owner")
        own = await _live_session(http, sidecar.url, "Bearer intruder")
        assert await _tracked_ids(http, sidecar.admin_url) == {legacy_id, own}
        before = len(upstream.requests())
        intruder = _headers(Authorization="Bearer intruder")
        for query, status in (
            (f"session_id={legacy_id}", 404),
            (f"sessionId={legacy_id}", 404),
            (f"session_id={own}", 404),
            (f"session_id={legacy_id}&sessionId={own}", 400),
        ):
            for body in (PING, INITIALIZE):
                answer = await http.post(
                    f"{sidecar.url}?{query}", content=json.dumps(body), headers=intruder
                )
                assert answer.status_code == status, (query, answer.text)
                assert answer.json()["jsonrpc"] == "2.0"
                if status == 404:
                    assert answer.json()["error"]["code"] == -32001
        # The same session in the header and the query is still two namings: which
        # transport's rules would apply is ambiguous, so the answer is the gate's 400.
        answer = await http.post(
            f"{sidecar.url}?session_id={own}",
            content=json.dumps(PING),
            headers=_headers(own, Authorization="Bearer intruder"),
        )
        assert answer.status_code == 400, answer.text
        assert len(upstream.requests()) == before, upstream.requests()[before:]
        assert await _tracked_ids(http, sidecar.admin_url) == {legacy_id, own}
        await stream.aclose()
