"""A minimal, fast Streamable HTTP "MCP server" for measuring the sidecar's own overhead.

FastMCP spends most of a request in pydantic validation and its task machinery, which hides
what the sidecar adds. This server does the least a session-based MCP server can:

* `POST` `initialize` answers with a fresh `Mcp-Session-Id`;
* every other `POST` with a known session answers a tiny JSON-RPC result
  (notifications and responses get `202 Accepted`);
* `DELETE` forgets the session; unknown session ids get `404`;
* `GET` with a known session streams `X-Bench-Events` SSE notifications (0: until the client
  goes) of `X-Bench-Event-Bytes` bytes each, as fast as the connection takes them, and
  `GET /stats` says how many bytes the streams wrote (the relay benchmark's back-pressure
  check).

The answer format is chosen per session at `initialize` by the request header
`X-Bench-Response: json|sse` (default json): `json` answers `application/json` with a
Content-Length (the sidecar's buffered path), `sse` answers one `text/event-stream` event the
way FastMCP does (the sidecar's event-by-event relay path).

Run it alone with `python bench/fast_upstream.py --port 8000`; the benchmarks start it as a
subprocess so it has its own process (and event loop), like a real upstream.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Sequence
from typing import Any

import uvloop
from aiohttp import web

SESSION_HEADER = "Mcp-Session-Id"
MODE_HEADER = "X-Bench-Response"
PROTOCOL_VERSION = "2025-06-18"

EVENTS_HEADER = "X-Bench-Events"
EVENT_BYTES_HEADER = "X-Bench-Event-Bytes"

SESSIONS: web.AppKey[dict[str, str]] = web.AppKey("sessions", dict)
STATS: web.AppKey[dict[str, int]] = web.AppKey("stats", dict)


def _result_for(message: dict[str, Any]) -> dict[str, Any]:
    method = message.get("method")
    if method == "initialize":
        return {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "bench-fast-upstream", "version": "1"},
        }
    if method == "tools/call":
        args = (message.get("params") or {}).get("arguments") or {}
        return {"content": [{"type": "text", "text": str(args.get("text", ""))}], "isError": False}
    return {}


def _answer(result: dict[str, Any], request_id: Any, mode: str, session_id: str) -> web.Response:
    payload = json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result})
    headers = {SESSION_HEADER: session_id}
    if mode == "sse":
        return web.Response(
            body=f"event: message\ndata: {payload}\n\n".encode(),
            content_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache"},
        )
    return web.Response(body=payload.encode(), content_type="application/json", headers=headers)


async def handle(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    session_id = request.headers.get(SESSION_HEADER)
    if request.method == "DELETE":
        found = session_id is not None and sessions.pop(session_id, None) is not None
        return web.Response(status=200 if found else 404)
    if request.method == "GET":
        return await _stream(request, session_id, sessions)
    if request.method != "POST":
        return web.Response(status=405, headers={"Allow": "GET, POST, DELETE"})
    try:
        message = json.loads(await request.read())
    except ValueError:
        message = None
    if not isinstance(message, dict):
        # Malformed JSON (batches are not needed by the benchmarks either).
        error = {"code": -32700, "message": "Parse error"}
        return web.json_response({"jsonrpc": "2.0", "id": None, "error": error}, status=400)
    return _post(message, request.headers.get(MODE_HEADER, "json"), session_id, sessions)


async def stats(request: web.Request) -> web.Response:
    """What the streams wrote so far (the SSE benchmark's back-pressure check)."""
    return web.json_response(request.app[STATS])


def _post(
    message: dict[str, Any], mode: str, session_id: str | None, sessions: dict[str, str]
) -> web.Response:
    if message.get("method") == "initialize":
        mode = "sse" if mode.lower() == "sse" else "json"
        session_id = f"{mode}-{uuid.uuid4().hex}"
        sessions[session_id] = mode
        return _answer(_result_for(message), message.get("id"), mode, session_id)
    session_mode = sessions.get(session_id) if session_id is not None else None
    if session_id is None or session_mode is None:
        error = {"code": -32001, "message": "Session not found"}
        return web.json_response(
            {"jsonrpc": "2.0", "id": message.get("id"), "error": error}, status=404
        )
    if "id" not in message or "method" not in message:
        return web.Response(status=202)  # a notification or a response
    return _answer(_result_for(message), message["id"], session_mode, session_id)


async def _stream(
    request: web.Request, session_id: str | None, sessions: dict[str, str]
) -> web.StreamResponse:
    """A GET stream of `X-Bench-Events` events (0: until the client goes) of about
    `X-Bench-Event-Bytes` bytes each, written as fast as the connection takes them."""
    if session_id is None or session_id not in sessions:
        return web.Response(status=404)
    count = int(request.headers.get(EVENTS_HEADER, "1000"))
    size = max(40, int(request.headers.get(EVENT_BYTES_HEADER, "200")))
    notification = '{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"%s"}}'
    filler = "x" * (size - len(notification) - 20)
    event = f"event: message\ndata: {notification % filler}\n\n".encode()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    stats = request.app[STATS]
    sent = 0
    # Batches of events per write: what a busy server does, and what makes the relay the
    # bottleneck rather than this loop. `write` awaits the drain: back-pressure reaches here.
    batch = event * 16
    while count == 0 or sent < count:
        chunk = batch if count == 0 or count - sent >= 16 else event * (count - sent)
        await response.write(chunk)
        sent += len(chunk) // len(event)
        stats["bytes_written"] += len(chunk)
    await response.write_eof()
    return response


def build_app() -> web.Application:
    app = web.Application()
    app[SESSIONS] = {}
    app[STATS] = {"bytes_written": 0}
    app.router.add_route("*", "/mcp", handle)
    app.router.add_get("/stats", stats)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(
        build_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
