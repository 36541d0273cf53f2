"""Clients for the integration tests: the real SDK client, and a raw one for exact HTTP control.

The SDK client (`sdk_session`) is what a real MCP client does through the sidecar. The raw
client (`RawSession`) sends hand-built requests with explicit headers, for what the SDK
hides: the exact status and body of a rejection, a GET stream held open on purpose, an
answer to a server ping sent at a chosen moment, a foreign `Authorization` header.

Every wait here is bounded: `eventually` polls with a deadline, and the HTTP clients carry
timeouts, so a broken sidecar fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

ACCEPT_BOTH = "application/json, text/event-stream"
PROTOCOL_VERSION = "2025-11-25"
CALL_TIMEOUT = timedelta(seconds=20)
HTTP_TIMEOUT = httpx.Timeout(10.0, read=30.0)
SESSION_NOT_FOUND_CODE = -32001

GetSessionId = Callable[[], str | None]


def not_found_body(request_id: int | str | None) -> dict[str, Any]:
    """The exact 404 body SPEC 2.1 prescribes for expired, closed and unknown ids."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": SESSION_NOT_FOUND_CODE, "message": "Session not found"},
    }


def text_of(result: CallToolResult) -> str:
    assert not result.isError, result
    first = result.content[0]
    assert isinstance(first, TextContent)
    return first.text


async def eventually(
    check: Callable[[], Any],
    *,
    within: float = 8.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll `check` (sync or async) until it returns something truthy, and return that."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        value = check()
        last = await value if inspect.isawaitable(value) else value
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {within}s (last value: {last!r})")
        await asyncio.sleep(interval)


async def sleep_until(moment: float) -> None:
    """Sleep until `time.monotonic()` reaches `moment` (no-op if it has passed)."""
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


# ---- the SDK client -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sdk_session(
    url: str,
    *,
    terminate_on_close: bool = True,
    headers: Mapping[str, str] | None = None,
    initialize: bool = True,
) -> AsyncIterator[tuple[ClientSession, GetSessionId]]:
    """An initialized `mcp.ClientSession` over Streamable HTTP to `url`."""
    async with (
        httpx.AsyncClient(timeout=HTTP_TIMEOUT, headers=dict(headers or {})) as http,
        streamable_http_client(url, http_client=http, terminate_on_close=terminate_on_close) as (
            read,
            write,
            get_session_id,
        ),
        ClientSession(read, write, read_timeout_seconds=CALL_TIMEOUT) as session,
    ):
        if initialize:
            await session.initialize()
        yield session, get_session_id


async def live_sessions(session: ClientSession) -> int:
    """How many sessions the upstream holds, from its own transport table."""
    return int(text_of(await session.call_tool("live_sessions")))


def initialize_message(client_name: str, request_id: int = 1) -> dict[str, Any]:
    """An `initialize` request as the SDK clients send it."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": client_name, "version": "1.0"},
        },
    }


# ---- the raw client -----------------------------------------------------------------------


def rpc_messages(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a response, whether sent as JSON or as SSE events."""
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        data = response.json()
        return data if isinstance(data, list) else [data]
    return [json.loads(e["data"]) for e in parse_sse(response.text) if e.get("data")]


def parse_sse(text: str) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue  # comment (keepalive)
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = f"{fields[name]}\n{value}" if name in fields else value
        if fields:
            events.append(fields)
    return events


@dataclass
class RawSession:
    """Hand-built Streamable HTTP requests over one httpx client; one session id at a time."""

    http: httpx.AsyncClient
    url: str
    session_id: str | None = None
    authorization: str | None = None
    next_id: int = 1

    def headers(self, *, accept: str = ACCEPT_BOTH, **extra: str) -> dict[str, str]:
        headers = {"Accept": accept, "Content-Type": "application/json"}
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = PROTOCOL_VERSION
        if self.authorization is not None:
            headers["Authorization"] = self.authorization
        headers.update(extra)
        return headers

    def request_id(self) -> int:
        self.next_id += 1
        return self.next_id

    async def post(
        self, message: dict[str, Any] | list[dict[str, Any]], **extra: str
    ) -> httpx.Response:
        return await self.http.post(
            self.url, content=json.dumps(message), headers=self.headers(**extra)
        )

    async def initialize(
        self, client_name: str = "lifecycle-test", *, notify: bool = True
    ) -> httpx.Response:
        """initialize (+ notifications/initialized); keeps the session id from the answer."""
        response = await self.post(initialize_message(client_name))
        if response.status_code != 200:
            return response
        self.session_id = response.headers["mcp-session-id"]
        if notify:
            await self.notify_initialized()
        return response

    async def notify_initialized(self) -> None:
        initialized = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert initialized.status_code == 202, initialized.text

    def call_message(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        request_id: int | str | None = None,
    ) -> dict[str, Any]:
        return {
            "jsonrpc": "2.0",
            "id": self.request_id() if request_id is None else request_id,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments or {}},
        }

    async def call(
        self, tool: str, arguments: dict[str, Any] | None = None, **extra: str
    ) -> httpx.Response:
        return await self.post(self.call_message(tool, arguments), **extra)

    async def call_text(self, tool: str, arguments: dict[str, Any] | None = None) -> str:
        """Call a tool and return its text; fails the test on anything but a result."""
        response = await self.call(tool, arguments)
        assert response.status_code == 200, (response.status_code, response.text)
        answers = [m for m in rpc_messages(response) if "result" in m or "error" in m]
        assert len(answers) == 1, answers
        assert "result" in answers[0], answers
        content = answers[0]["result"]["content"]
        return str(content[0]["text"])


@dataclass
class OpenStream:
    """A GET stream held open by a raw client: what arrives, and whether (and how) it ended."""

    messages: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    status: int | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    task: asyncio.Task[None] | None = None

    async def _run(self, raw: RawSession) -> None:
        buffer = ""
        try:
            headers = raw.headers(accept="text/event-stream")
            del headers["Content-Type"]
            async with raw.http.stream("GET", raw.url, headers=headers) as response:
                self.status = response.status_code
                self.opened.set()
                async for text in response.aiter_text():
                    buffer += text.replace("\r\n", "\n")
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        for event in parse_sse(block):
                            if event.get("data"):
                                self.messages.put_nowait(json.loads(event["data"]))
        except Exception as exc:
            self.error = exc
        finally:
            self.opened.set()
            self.ended.set()

    async def wait_ended(self, within: float) -> None:
        async with asyncio.timeout(within):
            await self.ended.wait()

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@contextlib.asynccontextmanager
async def open_stream(raw: RawSession, within: float = 10.0) -> AsyncIterator[OpenStream]:
    """Open the session's GET stream and wait for its response headers."""
    stream = OpenStream()
    stream.task = asyncio.create_task(stream._run(raw))
    try:
        async with asyncio.timeout(within):
            await stream.opened.wait()
        yield stream
    finally:
        await stream.close()


@contextlib.asynccontextmanager
async def raw_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        yield http


# ---- the sidecar's store, read from outside ----------------------------------------------


def session_rows(db_path: Path) -> dict[str, dict[str, Any]]:
    """Every row of the `sessions` table, by id, read without writing (WAL readers never block)."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in db.execute("SELECT * FROM sessions")}


def session_row(db_path: Path, session_id: str) -> dict[str, Any] | None:
    return session_rows(db_path).get(session_id)
