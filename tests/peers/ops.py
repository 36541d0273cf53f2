"""What the operator-facing tests share: an SDK client session, the admin API, the metrics.

* ``mcp_session(url)`` opens a real MCP Python SDK session (``streamable_http_client`` with
  our own ``httpx.AsyncClient``, so the test sets the User-Agent and the ``clientInfo``).
* ``Admin`` talks to a sidecar's admin API with httpx, optionally with a bearer token.
* ``Scrape`` is one parsed ``/metrics`` page (``prometheus_client``'s own text parser), so an
  assertion reads ``scrape.value("mcp_sidecar_sessions", state="live")``.
* ``raw_post`` sends one JSON-RPC request on a session id, for asserting the sidecar's own
  404 (status and body) without an SDK in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, Implementation, TextContent
from prometheus_client.parser import text_string_to_metric_families

ACCEPT = "application/json, text/event-stream"
PROTOCOL_VERSION = "2025-11-25"
USER_AGENT = "ops-test/1.0"
CLIENT_INFO = Implementation(name="ops-client", version="2.3")


@dataclass
class Connected:
    """An initialized SDK session and the id the upstream gave it."""

    session: ClientSession
    session_id: str

    async def echo(self, text: str = "hi") -> str:
        return text_of(await self.session.call_tool("echo", {"text": text}))


def text_of(result: CallToolResult) -> str:
    assert not result.isError, result
    first = result.content[0]
    assert isinstance(first, TextContent)
    return first.text


def http_client(headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """The SDK's default timeouts (30 s, 300 s read for streams) with our own headers."""
    return httpx.AsyncClient(
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        timeout=httpx.Timeout(30.0, read=300.0),
    )


@asynccontextmanager
async def mcp_session(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    client_info: Implementation = CLIENT_INFO,
    terminate_on_close: bool = True,
) -> AsyncIterator[Connected]:
    try:
        async with (
            http_client(headers) as http,
            streamable_http_client(
                url, http_client=http, terminate_on_close=terminate_on_close
            ) as (read, write, get_session_id),
            ClientSession(read, write, client_info=client_info) as session,
        ):
            await session.initialize()
            session_id = get_session_id()
            assert session_id, "the upstream gave no Mcp-Session-Id"
            yield Connected(session, session_id)
    except BaseExceptionGroup as group:
        # The SDK's task groups wrap whatever the test body raised; hand the test (and
        # pytest.raises) the one exception itself.
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


async def raw_post(
    url: str, session_id: str, method: str = "tools/list", request_id: int = 7
) -> httpx.Response:
    """One JSON-RPC request on `session_id`, outside any SDK session."""
    async with http_client() as http:
        return await http.post(
            url,
            json={"jsonrpc": "2.0", "id": request_id, "method": method, "params": {}},
            headers={
                "Accept": ACCEPT,
                "Mcp-Session-Id": session_id,
                "MCP-Protocol-Version": PROTOCOL_VERSION,
            },
        )


def assert_session_not_found(response: httpx.Response, request_id: int | None = 7) -> None:
    """The sidecar's own 404 (SPEC 2.1)."""
    assert response.status_code == 404, response.text
    assert response.json() == {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": -32001, "message": "Session not found"},
    }


class Admin:
    """The admin API of one sidecar."""

    def __init__(self, base: str, token: str = "") -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def request(
        self, method: str, path: str, *, json: Any = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with httpx.AsyncClient(base_url=self.base, timeout=10.0) as http:
            return await http.request(method, path, json=json, headers=headers, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def json(self, path: str, **kwargs: Any) -> Any:
        response = await self.get(path, **kwargs)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
        return response.json()

    async def session(self, session_id: str) -> dict[str, Any]:
        found: dict[str, Any] = await self.json(f"/sessions/{session_id}")
        return found

    async def health(self) -> dict[str, Any]:
        counts: dict[str, Any] = (await self.json("/healthz"))["sessions"]
        return counts

    async def scrape(self) -> Scrape:
        response = await self.get("/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return Scrape(response.text)


class Scrape:
    """One /metrics page, parsed: samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in self.families.values()
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0.0 when the labelled child does not exist yet."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples
