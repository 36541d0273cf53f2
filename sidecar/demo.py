"""`mcp-sidecar demo`: the whole lifecycle in half a minute, with real parts.

It starts a real MCP server (the Python SDK's FastMCP, stateful Streamable HTTP, its own
idle reaper switched off so only the sidecar expires sessions), the sidecar in front of it
with a few seconds of idle timeout, and the SDK's own client. The client creates a session,
calls a tool, goes quiet, gets the 404 that tells it the session expired, and starts a new
one, while the demo shows what the server itself holds at each step. Then the same with
`idle_action = "hibernate"`: the quiet client's session is freed on the server, and the same
client, never re-initialized, calls a tool again behind its unchanged id. Needs the `demo` extra
(`pip install 'mcp-sidecar[demo]'`), which brings the MCP SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .config import load_settings
from .errors import SidecarError
from .server import Server
from .sessions import short

STEP_PAUSE = 0.3


def run_demo(idle_timeout: float = 3.0) -> int:
    try:
        import mcp  # noqa: F401
    except ImportError:
        raise SidecarError(
            "the demo needs the MCP Python SDK: pip install 'mcp-sidecar[demo]'"
        ) from None
    # The sidecar's own log lines (session created / closed) are part of the show; the SDK's
    # are not: its server logs a harmless traceback when a session's GET stream is cut.
    logging.basicConfig(level=logging.WARNING, format="   [%(name)s] %(message)s")
    logging.getLogger("mcp").setLevel(logging.CRITICAL)
    return asyncio.run(_demo(idle_timeout))


def say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _demo(idle_timeout: float) -> int:
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-demo-") as workdir:
        async with _upstream() as (upstream_url, live_upstream_sessions):
            say(f"1. MCP server (FastMCP, Streamable HTTP) at {upstream_url}")
            async with _sidecar(upstream_url, idle_timeout, Path(workdir) / "a.db") as url:
                say(f"2. mcp-sidecar in front of it at {url} (idle_timeout={idle_timeout:g}s)")
                await _client_story(url, idle_timeout, live_upstream_sessions)
            async with _sidecar(
                upstream_url, idle_timeout, Path(workdir) / "b.db", idle_action="hibernate"
            ) as url:
                say(f'10. now a sidecar with idle_action="hibernate" at {url}')
                await _hibernate_story(url, idle_timeout, live_upstream_sessions)
    return 0


async def _client_story(url: str, idle_timeout: float, live: Any) -> None:
    from mcp.shared.exceptions import McpError

    async with _client(url) as (client, session_id):
        say(
            f"3. client initialized session {short(session_id())} through the sidecar; "
            f"the server now holds {live()} session(s)"
        )
        result = await client.call_tool("shout", {"text": "hello"})
        say(f"4. tools/call shout('hello') -> {_text(result)}")
        wait = idle_timeout + 2
        say(f"5. the client goes quiet for {wait:g}s (idle_timeout is {idle_timeout:g}s)...")
        await asyncio.sleep(wait)
        say(
            f"6. the sidecar expired the session and closed it upstream with DELETE: "
            f"the server now holds {live()} session(s)"
        )
        try:
            await client.call_tool("shout", {"text": "anyone there?"})
            say("   unexpected: the expired session still answered")
        except McpError as exc:
            say(
                f"7. the client's next request got HTTP 404 from the sidecar ({exc}); "
                "a spec-compliant client now re-initializes"
            )
    async with _client(url) as (client, session_id):
        result = await client.call_tool("shout", {"text": "new session"})
        say(
            f"8. new session {short(session_id())} -> {_text(result)}; "
            f"the server holds {live()} session(s)"
        )
    await asyncio.sleep(STEP_PAUSE)
    say("9. one session expired, closed upstream, and re-created by the client")


async def _hibernate_story(url: str, idle_timeout: float, live: Any) -> None:
    """A client that never re-initializes (as many IDEs): hibernated, then resumed."""
    async with _client(url) as (client, session_id):
        first_id = session_id()
        result = await client.call_tool("shout", {"text": "hello"})
        say(
            f"11. client session {short(first_id)}: shout('hello') -> {_text(result)}; "
            f"the server holds {live()} session(s)"
        )
        wait = idle_timeout + 2
        say(f"12. the client goes quiet for {wait:g}s...")
        await asyncio.sleep(wait)
        say(
            f"13. the sidecar hibernated the session: closed upstream with DELETE, the server "
            f"holds {live()} session(s), the client's id {short(first_id)} is kept dormant"
        )
        result = await client.call_tool("shout", {"text": "still there?"})
        same = "unchanged" if session_id() == first_id else "CHANGED"
        say(
            f"14. the same client, without re-initializing: shout('still there?') -> "
            f"{_text(result)}; its session id is {same}; the server holds {live()} session(s)"
        )
    await asyncio.sleep(STEP_PAUSE)
    say("15. done: the server's memory was freed while the client idled, and it never noticed")


def _text(result: Any) -> str:
    return " ".join(getattr(block, "text", "?") for block in result.content)


@contextlib.asynccontextmanager
async def _client(url: str) -> AsyncIterator[Any]:
    import httpx
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with (
        httpx.AsyncClient(timeout=10) as http,
        streamable_http_client(url, http_client=http) as (read, write, get_id),
        ClientSession(read, write) as client,
    ):
        await client.initialize()
        yield client, lambda: get_id() or ""


@contextlib.asynccontextmanager
async def _upstream() -> AsyncIterator[tuple[str, Any]]:
    import uvicorn
    from mcp.server.fastmcp import FastMCP

    server = FastMCP("demo-server", session_idle_timeout=None, log_level="WARNING")

    @server.tool()
    def shout(text: str) -> str:
        """Return the text in capitals."""
        return text.upper() + "!"

    app = server.streamable_http_app()
    port = _free_port()
    uv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)

    def live() -> int:
        # The SDK keeps one transport per live session; counting them shows from the
        # server's side that the sidecar's DELETE really freed the session.
        return len(server.session_manager._server_instances)

    try:
        yield f"http://127.0.0.1:{port}/mcp", live
    finally:
        uv.should_exit = True
        await task


@contextlib.asynccontextmanager
async def _sidecar(
    upstream_url: str, idle_timeout: float, db: Path, idle_action: str = "close"
) -> AsyncIterator[str]:
    port = _free_port()
    settings = load_settings(
        None,
        environ={},
        overrides={
            "server": {"listen": f"127.0.0.1:{port}"},
            "upstream": {"url": upstream_url},
            "sessions": {
                "idle_timeout": idle_timeout,
                "sweep_interval": 0.5,
                "idle_action": idle_action,
            },
            "store": {"path": str(db), "flush_interval": 0.5},
            "admin": {"listen": f"127.0.0.1:{_free_port()}"},
        },
    )
    server = Server(settings)
    logging.getLogger("sidecar").setLevel(logging.WARNING)
    for name in ("sidecar.sessions", "sidecar.closer", "sidecar.resume"):
        logging.getLogger(name).setLevel(logging.INFO)
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        await server.stop()
