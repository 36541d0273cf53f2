"""Unit tests for the proxy: the real app (`Service` + `build_proxy_app`) before a fake upstream.

The fake upstream is a small aiohttp app that records every request it receives and answers
`initialize` with an `Mcp-Session-Id`; each test scripts anything else it needs. The sidecar's
clock is a mutable float, so activity and expiry are asserted exactly, and its background
loops are slowed to an hour so nothing happens behind a test's back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy

import sidecar
from sidecar.app import Service, build_proxy_app
from sidecar.config import load_settings
from sidecar.errors import UpstreamUnreachableError
from sidecar.sessions import CloseReason, State
from sidecar.upstream import Upstream
from sidecar.upstream.client import may_retry
from tests.fakes import T0, Clock

IDLE = 600.0
SID = "Mcp-Session-Id"
JSON_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
Respond = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


def _rpc(method: str, request_id: int | str | None = 1, **params: Any) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if request_id is not None:
        message["id"] = request_id
    if params:
        message["params"] = params
    return json.dumps(message).encode()


INITIALIZE = _rpc(
    "initialize",
    0,
    protocolVersion="2025-06-18",
    capabilities={},
    clientInfo={"name": "unit-client", "version": "1.0"},
)


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class FakeUpstream:
    """Records requests; `respond` (if set) answers everything but `initialize`."""

    seen: list[Seen] = field(default_factory=list)
    respond: Respond | None = None
    init_status: int = 200
    issued: int = 0
    version: str | None = None  # the protocol version it negotiates; None: the client's
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # released at teardown

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, request.headers.copy(), body))
        message = _json(body)
        if isinstance(message, dict) and message.get("method") == "initialize":
            self.issued += 1
            params = message.get("params") or {}
            result = {
                "capabilities": {},
                "protocolVersion": self.version or params.get("protocolVersion"),
            }
            return web.json_response(
                {"jsonrpc": "2.0", "id": message.get("id"), "result": result},
                status=self.init_status,
                headers={SID: f"upstream-session-{self.issued:04d}"},
            )
        if self.respond is not None:
            return await self.respond(request, body)
        if (
            request.method == "POST"
            and isinstance(message, dict)
            and {"method", "id"} <= set(message)
        ):
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {}})
        return web.Response(status=202 if request.method == "POST" else 200)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def forwarded(self, method: str | None = None) -> list[Seen]:
        return [s for s in self.seen if method is None or s.method == method]


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


@dataclass
class Proxy:
    client: TestClient[web.Request, web.Application]
    service: Service
    fake: FakeUpstream
    clock: Clock

    async def initialize(self, **headers: str) -> str:
        response = await self.client.post(
            "/mcp", data=INITIALIZE, headers={**JSON_HEADERS, **headers}
        )
        assert response.status == 200, await response.text()
        await response.read()
        return response.headers[SID]

    async def post(
        self, session_id: str | None, body: bytes, **headers: str
    ) -> tuple[int, bytes, Any]:
        all_headers = {**JSON_HEADERS, **headers}
        if session_id is not None:
            all_headers[SID] = session_id
        async with self.client.post("/mcp", data=body, headers=all_headers) as response:
            data = await response.read()
            return response.status, data, response.headers

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.service.metrics.registry.get_sample_value(name, labels or {})
        return value or 0.0

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.service.settings.store.path) as db:
            result = list(db.execute(sql))
        db.close()
        return result

    async def closer_idle(self) -> None:
        """Wait until the closer has nothing queued or running (it works in its own task)."""
        async with asyncio.timeout(5):
            while True:
                if not self.service.closer.backlog:
                    return
                await asyncio.sleep(0.005)


Make = Callable[..., Awaitable[Proxy]]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {key: dict(value) for key, value in base.items()}
    for section, values in extra.items():
        merged.setdefault(section, {}).update(values)
    return merged


@pytest.fixture
async def make(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> AsyncIterator[Make]:
    fakes: list[FakeUpstream] = []

    async def build(upstream_url: str | None = None, **sections: dict[str, Any]) -> Proxy:
        fake = FakeUpstream()
        fakes.append(fake)
        if upstream_url is None:
            server = await aiohttp_server(fake.app())
            upstream_url = str(server.make_url("/mcp"))
        overrides = _merge(
            {
                "upstream": {"url": upstream_url, "connect_timeout": 2, "read_timeout": 5},
                "sessions": {"idle_timeout": IDLE, "sweep_interval": "1h"},
                "store": {"path": str(tmp_path / "sessions.db"), "flush_interval": "1h"},
            },
            sections,
        )
        settings = load_settings(None, environ={}, overrides=overrides)
        clock = Clock()
        service = Service(settings, clock=clock)
        client = await aiohttp_client(build_proxy_app(service))
        # The start's restore runs behind the open port and ends with a sweep at the manager's
        # clock: a test that moves the clock before that sweep would see it close sessions
        # in the background, racing the request-time expiry the test is about.
        if (restoring := service.restoring) is not None:
            await restoring
        return Proxy(client, service, fake, clock)

    yield build
    for fake in fakes:
        fake.gate.set()


# ---- headers -------------------------------------------------------------------------------------


async def test_hop_by_hop_headers_are_dropped_and_host_rewritten(make: Make) -> None:
    p = await make()
    response = await p.client.post(
        "/mcp",
        data=INITIALIZE,
        headers={
            **JSON_HEADERS,
            "Connection": "keep-alive, X-Hop-Custom",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "X-Hop-Custom": "named in Connection",
            "X-End-To-End": "kept",
            "X-Forwarded-For": "203.0.113.7",
            "Host": "sidecar.example:8443",
        },
    )
    assert response.status == 200
    (seen,) = p.fake.seen
    headers = seen.headers
    for name in ("Keep-Alive", "TE", "Upgrade", "Proxy-Authorization", "X-Hop-Custom"):
        assert name not in headers, name
    assert "x-hop-custom" not in headers.get("Connection", "").lower()
    assert headers["X-End-To-End"] == "kept"
    assert headers["Host"] == p.service.upstream.authority
    assert headers["Host"].startswith("127.0.0.1:")
    assert headers["X-Forwarded-Host"] == "sidecar.example:8443"
    assert headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert seen.body == INITIALIZE


async def test_hop_by_hop_response_headers_are_dropped(make: Make) -> None:
    p = await make()

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(
            status=200,
            body=b"{}",
            content_type="application/json",
            headers={
                "Connection": "keep-alive, X-Resp-Hop",
                "X-Resp-Hop": "named in Connection",
                "Proxy-Authenticate": "Basic",
                "Trailer": "X-Checksum",
                "X-Upstream": "kept",
            },
        )

    p.fake.respond = answer
    async with p.client.get("/anything") as response:
        assert response.status == 200
        assert response.headers["X-Upstream"] == "kept"
        for name in ("X-Resp-Hop", "Proxy-Authenticate", "Trailer"):
            assert name not in response.headers, name
        assert "x-resp-hop" not in response.headers.get("Connection", "").lower()


async def test_protocol_headers_pass_exactly_as_sent(make: Make) -> None:
    p = await make()
    session_id = await p.initialize()
    sent = {
        "Accept": "text/event-stream, application/json;q=0.9",
        "Content-Type": "application/json; charset=utf-8",
        "MCP-Protocol-Version": "2025-06-18",
        "Last-Event-ID": "stream-1/evt-41",
        "Origin": "https://app.example",
        "User-Agent": "unit-client/1.0",
        SID: session_id,
    }
    body = _rpc("tools/list", 3)
    async with p.client.post("/mcp?x=1", data=body, headers=sent) as response:
        assert response.status == 200
        assert json.loads(await response.read()) == {"jsonrpc": "2.0", "id": 3, "result": {}}
    seen = p.fake.seen[-1]
    assert seen.path_qs == "/mcp?x=1"
    assert seen.body == body
    for name, value in sent.items():
        assert seen.headers.getall(name) == [value], name


async def test_no_accept_header_is_invented_for_the_upstream(make: Make) -> None:
    # The SDK servers answer 406 to `*/*`; the client's choice (even none) must reach them.
    p = await make()
    session_id = await p.initialize()
    async with p.client.post(
        "/mcp",
        data=_rpc("tools/list", 3),
        headers={"Content-Type": "application/json", SID: session_id},
        skip_auto_headers=["Accept"],
    ) as response:
        assert response.status == 200
    assert "Accept" not in p.fake.seen[-1].headers


async def test_other_paths_pass_through(make: Make) -> None:
    p = await make()
    async with p.client.get("/.well-known/oauth-protected-resource?a=b") as response:
        assert response.status == 200
    (seen,) = p.fake.seen
    assert (seen.method, seen.path_qs) == ("GET", "/.well-known/oauth-protected-resource?a=b")


async def test_request_target_is_forwarded_with_its_encoding_intact(make: Make) -> None:
    p = await make()
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(
            b"GET /files/a%2Fb?next=%2Fhome&q=%26x HTTP/1.1\r\n"
            b"Host: sidecar.example\r\nConnection: close\r\n\r\n"
        )
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 200 ")
    (seen,) = p.fake.seen
    assert seen.path_qs == "/files/a%2Fb?next=%2Fhome&q=%26x"


# ---- streaming -----------------------------------------------------------------------------------


async def test_sse_answer_is_relayed_event_by_event(make: Make) -> None:
    p = await make()
    session_id = await p.initialize()
    second_may_go = asyncio.Event()
    first = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
    second = b'id: 2\ndata: {"jsonrpc":"2.0","id":5,"result":{"content":[]}}\n\n'

    async def sse(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        await second_may_go.wait()
        await response.write(second)
        await response.write_eof()
        return response

    p.fake.respond = sse
    session = p.service.manager.live[session_id]
    headers = {**JSON_HEADERS, SID: session_id}
    async with p.client.post("/mcp", data=_rpc("tools/call", 5), headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["X-Accel-Buffering"] == "no"
        async with asyncio.timeout(5):
            assert await response.content.readuntil(b"\n\n") == first
        assert session.in_flight == 1  # the call is still streaming: it keeps the session alive
        p.clock.now = T0 + 3 * IDLE
        assert session.expiry_reason(p.service.manager.policy, p.clock()) is None
        second_may_go.set()
        async with asyncio.timeout(5):
            assert await response.content.read() == second
    assert session.in_flight == 0
    assert session.last_activity_at == T0 + 3 * IDLE  # the call's end is activity


async def test_answers_to_relayed_server_pings_are_not_activity(make: Make) -> None:
    p = await make()
    session_id = await p.initialize()

    async def ping_stream(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"jsonrpc":"2.0","id":"srv-ping-1","method":"ping"}\n\n')
        await response.write_eof()
        return response

    p.fake.respond = ping_stream
    async with p.client.get("/mcp", headers={"Accept": "text/event-stream", SID: session_id}) as r:
        assert r.status == 200
        await r.read()
    session = p.service.manager.live[session_id]
    assert "srv-ping-1" in session.server_pings
    p.fake.respond = None
    p.clock.now = T0 + 100
    status, _, _ = await p.post(session_id, b'{"jsonrpc":"2.0","id":"srv-ping-1","result":{}}')
    assert status == 202
    assert session.last_activity_at == T0
    p.clock.now = T0 + 200
    await p.post(session_id, b'{"jsonrpc":"2.0","id":"srv-sampling-1","result":{}}')
    assert session.last_activity_at == T0 + 200


# ---- rejections ----------------------------------------------------------------------------------


async def test_body_over_max_body_bytes_gets_413_and_is_not_forwarded(make: Make) -> None:
    p = await make(server={"max_body_bytes": 1024})
    session_id = await p.initialize()
    big = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"x":"' + b"a" * 2000 + b'"}}'
    status, body, headers = await p.post(session_id, big)
    assert status == 413
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "Request body larger than 1024 bytes"},
    }
    assert p.sample("mcp_sidecar_rejected_total", {"reason": "too_large"}) == 1

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * 400

    headers = {**JSON_HEADERS, SID: session_id}
    async with p.client.post("/mcp", data=chunks(), headers=headers) as response:
        assert response.status == 413
    assert p.sample("mcp_sidecar_rejected_total", {"reason": "too_large"}) == 2
    assert [s.method for s in p.fake.seen] == ["POST"]  # only the initialize


async def test_disallowed_origin_gets_403_and_is_not_forwarded(make: Make) -> None:
    p = await make(server={"allowed_origins": ["https://good.example"]})
    async with p.client.post(
        "/mcp", data=INITIALIZE, headers={**JSON_HEADERS, "Origin": "https://evil.example"}
    ) as response:
        assert response.status == 403
        assert json.loads(await response.read()) == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": -32000, "message": "Origin not allowed"},
        }
    assert p.fake.seen == []
    assert p.sample("mcp_sidecar_rejected_total", {"reason": "origin"}) == 1
    await p.initialize(Origin="https://good.example")
    await p.initialize()  # no Origin at all: not a browser, not checked
    assert len(p.fake.seen) == 2


@pytest.mark.parametrize("bad_id", ["has space", "x" * 257])
async def test_malformed_session_id_gets_400_and_is_not_forwarded(make: Make, bad_id: str) -> None:
    p = await make()
    status, body, _ = await p.post(bad_id, _rpc("tools/list", 9))
    assert status == 400
    assert json.loads(body) == {
        "jsonrpc": "2.0",
        "id": 9,
        "error": {
            "code": -32600,
            "message": "Invalid Mcp-Session-Id header: expected 1-256 visible ASCII characters",
        },
    }
    assert p.fake.seen == []
    assert p.sample("mcp_sidecar_rejected_total", {"reason": "bad_session_id"}) == 1


async def test_unknown_session_id_gets_the_spec_404(make: Make) -> None:
    p = await make()
    status, body, _ = await p.post("never-issued", _rpc("tools/list", "q-1"))
    assert status == 404
    assert body == (
        b'{"jsonrpc": "2.0", "id": "q-1", '
        b'"error": {"code": -32001, "message": "Session not found"}}'
    )
    assert p.fake.seen == []
    assert p.sample("mcp_sidecar_rejected_total", {"reason": "unknown"}) == 1


async def test_expired_session_gets_404_without_reaching_upstream_and_is_closed_there(
    make: Make,
) -> None:
    p = await make()
    session_id = await p.initialize(Authorization="Bearer client-token")
    p.clock.now = T0 + IDLE + 0.001
    status, body, _ = await p.post(
        session_id, _rpc("tools/list", 4), Authorization="Bearer client-token"
    )
    assert status == 404
    assert json.loads(body)["error"] == {"code": -32001, "message": "Session not found"}
    await p.closer_idle()
    # The POST never went upstream; the sidecar's own DELETE did, with the client's credentials.
    assert [s.method for s in p.fake.seen] == ["POST", "DELETE"]
    delete = p.fake.seen[1]
    assert delete.headers[SID] == session_id
    assert delete.headers["MCP-Protocol-Version"] == "2025-06-18"
    assert delete.headers["Authorization"] == "Bearer client-token"
    assert p.rows("SELECT state, close_reason FROM sessions") == [("closed", "idle_timeout")]
    assert p.sample("mcp_sidecar_rejected_total", {"reason": "expired"}) == 1


async def test_other_identity_gets_404_on_a_bound_session(make: Make) -> None:
    p = await make()
    session_id = await p.initialize(Authorization="Bearer alice")
    status, _, _ = await p.post(session_id, _rpc("tools/list"), Authorization="Bearer mallory")
    assert status == 404
    assert p.sample("mcp_sidecar_rejected_total", {"reason": "binding"}) == 1
    assert len(p.fake.seen) == 1
    assert p.service.manager.live[session_id].live


# ---- activity ------------------------------------------------------------------------------------


async def test_malformed_json_is_forwarded_untouched_but_is_not_activity(make: Make) -> None:
    p = await make()
    session_id = await p.initialize()
    session = p.service.manager.live[session_id]
    p.clock.now = T0 + 10
    garbage = b'{"jsonrpc": "2.0", "id": 1, "method": '
    p.fake.respond = _status(400, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700}}')
    status, body, _ = await p.post(session_id, garbage)
    assert status == 400
    assert body == b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700}}'
    assert p.fake.seen[-1].body == garbage
    assert session.last_activity_at == T0
    assert session.in_flight == 0
    p.fake.respond = None
    await p.post(session_id, _rpc("tools/list", 2))
    assert session.last_activity_at == T0 + 10


async def test_ignored_methods_are_forwarded_but_not_activity(make: Make) -> None:
    p = await make(sessions={"ignore_methods": ["ping"]})
    session_id = await p.initialize()
    p.clock.now = T0 + 10
    status, _, _ = await p.post(session_id, _rpc("ping", 2))
    assert status == 200
    assert p.service.manager.live[session_id].last_activity_at == T0


# ---- session creation ----------------------------------------------------------------------------


async def test_initialize_creates_a_committed_session(make: Make) -> None:
    p = await make()
    session_id = await p.initialize(**{"User-Agent": "unit-client/1.0"})
    assert session_id == "upstream-session-0001"
    session = p.service.manager.live[session_id]
    assert (session.protocol_version, session.client_info) == ("2025-06-18", "unit-client 1.0")
    assert p.rows("SELECT id, state, protocol_version, client_info FROM sessions") == [
        (session_id, "live", "2025-06-18", "unit-client 1.0")
    ]
    assert p.sample("mcp_sidecar_sessions_created_total") == 1


async def test_initialize_error_with_a_throwaway_session_id_is_not_tracked(make: Make) -> None:
    p = await make()
    p.fake.init_status = 400
    async with p.client.post("/mcp", data=INITIALIZE, headers=JSON_HEADERS) as response:
        assert response.status == 400
        throwaway = response.headers[SID]  # relayed unchanged
        await response.read()
    assert p.service.manager.live == {}
    assert p.rows("SELECT * FROM sessions") == []
    assert p.sample("mcp_sidecar_sessions_created_total") == 0
    status, _, _ = await p.post(throwaway, _rpc("tools/list"))
    assert status == 404
    assert len(p.fake.seen) == 1


async def test_stateless_upstream_is_plain_pass_through(make: Make) -> None:
    p = await make()

    async def stateless(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    p.fake.respond = stateless
    status, _, _ = await p.post(None, _rpc("tools/list", 1))
    assert status == 200
    assert p.service.manager.live == {}
    assert p.sample("mcp_sidecar_stateless_requests_total") == 1


# ---- upstream answers about sessions -------------------------------------------------------------


def _status(status: int, body: bytes = b"") -> Respond:
    async def respond(request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type="application/json")

    return respond


async def test_upstream_404_on_a_live_session_closes_it_and_is_relayed(make: Make) -> None:
    p = await make()
    session_id = await p.initialize()
    upstream_body = b'{"jsonrpc":"2.0","id":"server-error","error":{"code":-32600}}'
    p.fake.respond = _status(404, upstream_body)
    status, body, _ = await p.post(session_id, _rpc("tools/list"))
    assert (status, body) == (404, upstream_body)
    assert session_id not in p.service.manager.live
    assert p.rows("SELECT state, close_reason FROM sessions") == [("closed", "upstream_gone")]
    assert p.rows("SELECT * FROM pending_closes") == []
    await p.closer_idle()
    assert [s.method for s in p.fake.seen] == ["POST", "POST"]  # no DELETE for a gone session
    assert p.sample("mcp_sidecar_sessions_closed_total", {"reason": "upstream_gone"}) == 1


async def test_non_compliant_session_gone_answer_becomes_the_spec_404(make: Make) -> None:
    p = await make()
    session_id = await p.initialize()
    p.fake.respond = _status(
        400,
        b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid '
        b'session ID provided"},"id":null}',
    )
    status, body, _ = await p.post(session_id, _rpc("tools/list", 8))
    assert status == 404
    assert json.loads(body) == {
        "jsonrpc": "2.0",
        "id": 8,
        "error": {"code": -32001, "message": "Session not found"},
    }
    assert p.rows("SELECT close_reason FROM sessions") == [("upstream_gone",)]


@pytest.mark.parametrize("upstream_status", [200, 204, 404, 405])
async def test_client_delete_closes_the_session_whatever_the_upstream_answers(
    make: Make, upstream_status: int
) -> None:
    p = await make()
    session_id = await p.initialize()
    p.fake.respond = _status(upstream_status)
    async with p.client.delete("/mcp", headers={SID: session_id}) as response:
        assert 200 <= response.status < 300
    deletes = p.fake.forwarded("DELETE")
    assert len(deletes) == 1
    assert deletes[0].headers[SID] == session_id
    assert session_id not in p.service.manager.live
    assert p.rows("SELECT state, close_reason FROM sessions") == [("closed", "client_delete")]
    await p.closer_idle()
    # The upstream heard the client's DELETE: the sidecar owes it no second one.
    assert len(p.fake.forwarded("DELETE")) == 1
    assert p.rows("SELECT * FROM pending_closes") == []
    status, _, _ = await p.post(session_id, _rpc("tools/list"))
    assert status == 404


@pytest.mark.parametrize("path", ["/other", "/mcp/sub"])
async def test_a_2xx_to_a_delete_off_the_endpoint_closed_nothing_upstream(
    make: Make, path: str
) -> None:
    """A DELETE naming a session on another path gets the session rules, but an upstream's
    catch-all page answering it 200 did not close the session: the sidecar's own DELETE is
    owed (only a 2xx on a spelling of the endpoint's path, like Express's `/MCP`, counts)."""
    from tests.peers.mcp_clients import eventually

    p = await make()
    session_id = await p.initialize()
    async with p.client.delete(path, headers={SID: session_id}) as response:
        assert 200 <= response.status < 300
    assert session_id not in p.service.manager.live
    # The client's DELETE on `path`, then the closer's own on the endpoint.
    await eventually(lambda: len(p.fake.forwarded("DELETE")) >= 2, within=5, interval=0.005)
    first, second = p.fake.forwarded("DELETE")[:2]
    assert first.path_qs == path
    assert (second.path_qs, second.headers[SID]) == ("/mcp", session_id)


@pytest.mark.parametrize("upstream_status", [500, 502, 503])
async def test_client_delete_the_upstream_failed_is_retried_by_the_closer(
    make: Make, upstream_status: int
) -> None:
    """SPEC 2.4: a 5xx did not close the session upstream, so a DELETE stays owed."""
    p = await make()
    session_id = await p.initialize()
    p.fake.respond = _status(upstream_status)
    async with p.client.delete("/mcp", headers={SID: session_id}) as response:
        assert 200 <= response.status < 300
    assert p.rows("SELECT state, close_reason FROM sessions") == [("closed", "client_delete")]
    from tests.peers.mcp_clients import eventually

    # The client's DELETE, then the closer's own.
    await eventually(lambda: len(p.fake.forwarded("DELETE")) >= 2, within=5, interval=0.005)
    assert all(d.headers[SID] == session_id for d in p.fake.forwarded("DELETE"))
    await eventually(lambda: p.rows("SELECT session_id FROM pending_closes"), within=5)
    assert p.rows("SELECT session_id FROM pending_closes") == [(session_id,)]


# ---- store faults --------------------------------------------------------------------------------


def _lock_store(p: Proxy) -> sqlite3.Connection:
    """Another process's write lock on the sidecar's database (SPEC 2.5 store faults)."""
    db = sqlite3.connect(p.service.settings.store.path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    return db


async def test_initialize_while_the_store_is_locked_gets_503_and_leaves_no_upstream_session(
    make: Make,
) -> None:
    p = await make()
    live = await p.initialize()
    lock = _lock_store(p)
    try:
        response = await p.client.post("/mcp", data=INITIALIZE, headers=JSON_HEADERS)
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        error = json.loads(await response.read())["error"]
        assert "store" in error["message"]
        assert SID not in response.headers  # the client never holds the id
        # The session the upstream made for it was closed again at once.
        deletes = p.fake.forwarded("DELETE")
        assert len(deletes) == 1
        assert deletes[0].headers[SID] != live
        assert deletes[0].headers[SID] not in p.service.manager.live
        # Live sessions are still served from memory.
        status, _, _ = await p.post(live, _rpc("tools/list"))
        assert status == 200
        assert p.sample("mcp_sidecar_store_errors_total", {"operation": "insert"}) == 1
        assert p.sample("mcp_sidecar_rejected_total", {"reason": "store_unavailable"}) == 1
    finally:
        lock.rollback()
        lock.close()
    # Recovery needs no restart.
    again = await p.initialize()
    assert p.rows(f"SELECT state FROM sessions WHERE id='{again}'") == [("live",)]


async def test_closes_the_store_refused_are_owed_and_written_once_it_works_again(
    make: Make,
) -> None:
    p = await make()
    first, second = await p.initialize(), await p.initialize()
    manager = p.service.manager
    sessions = [manager.live[first], manager.live[second]]
    lock = _lock_store(p)
    try:
        await manager.close_many(sessions, CloseReason.ADMIN)  # must not raise
        assert first not in manager.live
        assert second not in manager.live
        status, _, _ = await p.post(first, _rpc("tools/list"))
        assert status == 404
        await manager.flush()  # still locked: the closes stay queued
    finally:
        lock.rollback()
        lock.close()
    assert p.sample("mcp_sidecar_store_errors_total", {"operation": "close"}) >= 1
    # The DELETEs owed went out although the disk had not recorded the closes.
    await p.closer_idle()
    assert {d.headers[SID] for d in p.fake.forwarded("DELETE")} == {first, second}
    assert p.rows("SELECT state FROM sessions ORDER BY id") == [("live",), ("live",)]
    await manager.flush()
    assert p.rows("SELECT state, close_reason FROM sessions ORDER BY id") == [
        ("closed", "admin"),
        ("closed", "admin"),
    ]


# ---- upstream failures ---------------------------------------------------------------------------


async def test_call_dropped_before_the_upstreams_headers_is_no_longer_in_flight(
    make: Make,
) -> None:
    """SPEC 2.5: a call counts until the upstream answers or the client goes, whichever is
    first; an upstream that sends its headers only at the end must not pin the session."""
    from tests.peers.mcp_clients import eventually

    p = await make()
    session_id = await p.initialize()
    session = p.service.manager.live[session_id]
    fake = p.fake
    arrived = asyncio.Event()

    async def hang(request: web.Request, body: bytes) -> web.StreamResponse:
        arrived.set()
        await fake.gate.wait()
        return web.Response()

    fake.respond = hang
    call = asyncio.ensure_future(p.post(session_id, _rpc("tools/call", 7)))
    await arrived.wait()
    assert session.in_flight == 1
    call.cancel()  # the client gives up: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: session.in_flight == 0, within=5, interval=0.005)
    fake.gate.set()


async def test_upstream_slower_than_read_timeout_gets_504_and_changes_nothing(make: Make) -> None:
    p = await make(upstream={"read_timeout": 0.2})
    session_id = await p.initialize()
    session = p.service.manager.live[session_id]
    fake = p.fake

    async def hang(request: web.Request, body: bytes) -> web.StreamResponse:
        await fake.gate.wait()
        return web.Response()

    fake.respond = hang
    p.clock.now = T0 + 10
    async with asyncio.timeout(5):
        status, body, _ = await p.post(session_id, _rpc("tools/call", 7))
    assert status == 504
    assert json.loads(body) == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32000, "message": "Upstream MCP server timed out"},
    }
    assert session.live
    assert session.in_flight == 0
    assert session.last_activity_at == T0
    assert p.sample("mcp_sidecar_requests_total", {"method": "POST", "outcome": "upstream_error"})


async def test_upstream_body_that_stalls_after_its_headers_gets_504(make: Make) -> None:
    p = await make(upstream={"read_timeout": 0.2})
    session_id = await p.initialize()
    fake = p.fake

    async def stall(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"jsonrpc"')  # and the other 90 bytes never come
        await fake.gate.wait()
        return response

    fake.respond = stall
    async with asyncio.timeout(5):
        status, body, _ = await p.post(session_id, _rpc("tools/call", 8))
    assert status == 504
    assert json.loads(body)["error"]["message"] == "Upstream MCP server timed out"
    assert p.service.manager.live[session_id].in_flight == 0
    fake.gate.set()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_upstream_gets_502(make: Make) -> None:
    p = await make(upstream_url=f"http://127.0.0.1:{_free_port()}/mcp")
    async with p.client.post("/mcp", data=INITIALIZE, headers=JSON_HEADERS) as response:
        assert response.status == 502
        assert json.loads(await response.read()) == {
            "jsonrpc": "2.0",
            "id": 0,
            "error": {"code": -32000, "message": "Upstream MCP server unreachable"},
        }
    assert p.service.manager.live == {}


# ---- metrics and lifecycle -----------------------------------------------------------------------


async def test_each_request_is_timed_and_counted(make: Make) -> None:
    p = await make()
    count = "mcp_sidecar_request_duration_seconds_count"
    assert p.sample(count) == 0
    session_id = await p.initialize()
    assert p.sample(count) == 1
    await p.post(session_id, _rpc("tools/list"))
    await p.post("unknown-id", _rpc("tools/list"))
    assert p.sample(count) == 3
    forwarded = {"method": "POST", "outcome": "forwarded"}
    assert p.sample("mcp_sidecar_requests_total", forwarded) == 2
    assert p.sample("mcp_sidecar_requests_total", {"method": "POST", "outcome": "rejected"}) == 1


async def test_streaming_time_is_not_counted_as_the_sidecars_own_time(make: Make) -> None:
    """A stream open for half a second costs the sidecar microseconds, and the histogram
    must say so: it measures overhead, not how long the upstream kept the stream open."""
    p = await make()
    session_id = await p.initialize()

    async def slow_stream(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(5):
            await response.write(f"data: {n}\n\n".encode())
            await asyncio.sleep(0.1)
        await response.write_eof()
        return response

    p.fake.respond = slow_stream
    total = "mcp_sidecar_request_duration_seconds_sum"
    before = p.sample(total)
    async with p.client.get("/mcp", headers={"Accept": "text/event-stream", SID: session_id}) as r:
        assert r.status == 200
        await r.read()
    assert p.sample(total) - before < 0.25


SIDECAR_SOURCE = Path(sidecar.__file__).parent


def _sidecar_tasks() -> list[asyncio.Task[Any]]:
    """Tasks the sidecar started: named `sidecar-*`, or running a coroutine of its code."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        from_sidecar = code is not None and Path(code.co_filename).is_relative_to(SIDECAR_SOURCE)
        if task.get_name().startswith("sidecar-") or from_sidecar:
            found.append(task)
    return found


async def test_no_task_is_left_pending_after_shutdown(make: Make) -> None:
    p = await make()
    session_id = await p.initialize()
    fake = p.fake

    async def open_stream(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method == "DELETE":
            return web.Response(status=503)  # keeps a close owed and retried
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": keepalive\n\n")
        await fake.gate.wait()
        return response

    fake.respond = open_stream
    stream = await p.client.get("/mcp", headers={"Accept": "text/event-stream", SID: session_id})
    async with asyncio.timeout(5):
        assert await stream.content.readuntil(b"\n\n") == b": keepalive\n\n"
    other = await p.initialize()
    await p.service.manager.close(p.service.manager.live[other], CloseReason.ADMIN)
    # closer, sweeper, flusher, purger, monitor; the health checker runs only with several
    # replicas
    assert len(p.service.tasks) == 5
    assert _sidecar_tasks()
    stream.close()
    await p.client.close()
    assert p.service.tasks == ()
    assert _sidecar_tasks() == []
    assert p.service.manager.live[session_id].state is State.LIVE  # stays live across restarts


# ---- the upstream client: retry on a stale pooled connection -------------------------------------


@dataclass
class RawUpstream:
    """A bare HTTP/1.1 server that can drop a connection when a given request arrives on it."""

    drop: set[tuple[int, int]]  # (connection number, request number on it), both from 1
    requests: list[tuple[int, int, bytes]] = field(default_factory=list)
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        try:
            for number in range(1, 100):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                self.requests.append((connection, number, body))
                if (connection, number) in self.drop:
                    return  # closed without an answer, after reading the whole request
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\n\r\n{}"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[set[tuple[int, int]]], Awaitable[Any]]]:
    cleanup: list[Callable[[], Awaitable[None]]] = []

    async def start(drop: set[tuple[int, int]]) -> tuple[RawUpstream, Upstream]:
        raw = RawUpstream(drop)
        server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream(f"http://127.0.0.1:{port}/mcp", 2.0, 5.0)
        await upstream.start()

        async def stop() -> None:
            await upstream.close()
            server.close()
            await server.wait_closed()

        cleanup.append(stop)
        return raw, upstream

    yield start
    for stop in cleanup:
        await stop()


async def _post(upstream: Upstream, body: bytes) -> int:
    response = await upstream.request(
        "POST", upstream.url, {"Content-Type": "application/json"}, body
    )
    async with response:
        await response.read()
        return response.status


async def test_post_the_upstream_read_on_a_reused_connection_is_never_sent_twice(
    raw_upstream: Callable[[set[tuple[int, int]]], Awaitable[Any]],
) -> None:
    # The upstream read the whole POST before the connection dropped: it may have run the
    # call, so a retry could run it twice. Only a request never written may be retried.
    raw, upstream = await raw_upstream({(1, 2)})
    assert await _post(upstream, b'{"n":1}') == 200
    with pytest.raises(UpstreamUnreachableError, match=r"upstream\.url"):
        await _post(upstream, b'{"n":2}')
    assert raw.requests == [(1, 1, b'{"n":1}'), (1, 2, b'{"n":2}')]


async def _get(upstream: Upstream) -> int:
    response = await upstream.request("GET", upstream.url, {}, None)
    async with response:
        await response.read()
        return response.status


async def test_idempotent_request_is_retried_once_when_a_pooled_connection_drops_it(
    raw_upstream: Callable[[set[tuple[int, int]]], Awaitable[Any]],
) -> None:
    raw, upstream = await raw_upstream({(1, 2)})
    assert await _get(upstream) == 200
    assert await _get(upstream) == 200
    assert raw.connections == 2
    assert [(c, n) for c, n, _ in raw.requests] == [(1, 1), (1, 2), (2, 1)]


async def test_failure_on_a_fresh_connection_is_not_retried(
    raw_upstream: Callable[[set[tuple[int, int]]], Awaitable[Any]],
) -> None:
    # A server that dies mid-request on a new connection may have run the call: never twice.
    raw, upstream = await raw_upstream({(1, 1)})
    with pytest.raises(UpstreamUnreachableError, match=r"upstream\.url"):
        await _post(upstream, b'{"n":1}')
    assert raw.requests == [(1, 1, b'{"n":1}')]


def test_only_a_request_aiohttp_refused_to_write_is_retried() -> None:
    refused = aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    wrapped = aiohttp.ClientOSError(None, "Can not write request body")
    wrapped.__cause__ = refused
    lost = aiohttp.ClientOSError(None, "Can not write request body")
    lost.__cause__ = aiohttp.ClientConnectionResetError("Connection lost")  # maybe all sent
    assert may_retry("POST", refused)
    assert may_retry("POST", wrapped)
    assert not may_retry("POST", lost)
    assert not may_retry("POST", aiohttp.ServerDisconnectedError())
    assert not may_retry("POST", ConnectionResetError())
    assert not may_retry("GET", wrapped)  # aiohttp retries idempotent methods itself


async def test_retry_happens_only_once(
    raw_upstream: Callable[[set[tuple[int, int]]], Awaitable[Any]],
) -> None:
    raw, upstream = await raw_upstream({(1, 2), (2, 1)})
    assert await _get(upstream) == 200
    with pytest.raises(UpstreamUnreachableError):
        await _get(upstream)
    assert [(c, n) for c, n, _ in raw.requests] == [(1, 1), (1, 2), (2, 1)]


# ---- hibernation and resume (SPEC 2.7), against a fake upstream for the fault cases ---------


async def _dormant(p: Proxy) -> str:
    """A session created, used, then idle past the timeout and hibernated by the sweeper."""
    session_id = await p.initialize()
    status, _, _ = await p.post(session_id, _rpc("tools/list", 1))
    assert status == 200
    p.clock.now += IDLE + 1
    await p.service.manager.sweep()
    assert session_id in {s.id for s in p.service.manager.dormant}
    return session_id


async def test_resumed_session_speaks_the_new_upstream_id_up_and_the_client_id_down(
    make: Make,
) -> None:
    p = await make(sessions={"idle_action": "hibernate"})
    session_id = await _dormant(p)
    await p.closer_idle()
    assert [s.headers[SID] for s in p.fake.forwarded("DELETE")] == [session_id]

    async def answer_with_id(request: web.Request, body: bytes) -> web.StreamResponse:
        message = json.loads(body)
        if "id" not in message:
            return web.Response(status=202)
        return web.json_response(
            {"jsonrpc": "2.0", "id": message["id"], "result": {}},
            headers={SID: request.headers[SID]},
        )

    p.fake.respond = answer_with_id
    status, _, headers = await p.post(session_id, _rpc("tools/list", 7))
    assert status == 200
    assert headers[SID] == session_id  # the client sees its own id
    new_id = "upstream-session-0002"
    last = p.fake.forwarded("POST")[-1]
    assert (last.headers[SID], json.loads(last.body)["method"]) == (new_id, "tools/list")
    shown = p.service.manager.live[session_id]
    assert shown.binding is not None
    assert shown.binding.session_id == new_id
    assert p.rows("SELECT state, upstream_session_id FROM sessions") == [("live", new_id)]


async def test_resume_answered_with_another_protocol_version_closes_with_404(
    make: Make,
) -> None:
    p = await make(sessions={"idle_action": "hibernate"})
    session_id = await _dormant(p)
    p.fake.version = "2099-01-01"
    status, body, _ = await p.post(session_id, _rpc("tools/list", 5))
    assert status == 404
    assert json.loads(body)["error"]["code"] == -32001
    await p.closer_idle()
    # The upstream session the failed resume created is closed again at once.
    assert "upstream-session-0002" in [s.headers[SID] for s in p.fake.forwarded("DELETE")]
    assert p.rows("SELECT state, close_reason FROM sessions") == [("closed", "resume_failed")]
    assert p.sample("mcp_sidecar_resume_failures_total", {"reason": "protocol_version"}) == 1


async def test_resume_whose_initialize_is_refused_closes_with_404(make: Make) -> None:
    p = await make(sessions={"idle_action": "hibernate"})
    session_id = await _dormant(p)
    p.fake.init_status = 400
    status, _, _ = await p.post(session_id, _rpc("tools/list", 5))
    assert status == 404
    assert p.rows("SELECT state, close_reason FROM sessions") == [("closed", "resume_failed")]
    assert p.sample("mcp_sidecar_resume_failures_total", {"reason": "refused"}) == 1


async def test_a_dormant_session_counts_in_no_limit_and_resuming_obeys_them(make: Make) -> None:
    p = await make(sessions={"idle_action": "hibernate", "max_sessions": 1})
    first = await _dormant(p)
    second = await p.initialize()  # the dormant one does not count
    assert second != first
    status, body, headers = await p.post(first, _rpc("tools/list", 3))
    assert status == 503, body
    assert headers["Retry-After"]
    assert first in {s.id for s in p.service.manager.dormant}


async def test_dormant_ttl_and_max_lifetime_end_a_dormant_session_for_good(make: Make) -> None:
    p = await make(sessions={"idle_action": "hibernate", "dormant_ttl": 60})
    session_id = await _dormant(p)
    p.clock.now += 61
    await p.service.manager.sweep()
    assert p.rows("SELECT state, close_reason FROM sessions") == [("closed", "dormant_ttl")]
    status, _, _ = await p.post(session_id, _rpc("tools/list", 2))
    assert status == 404
