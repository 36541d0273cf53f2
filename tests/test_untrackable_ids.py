"""An upstream session id the sidecar cannot track never reaches the client as a session.

A raw upstream (no HTTP library could write these ids) answers with the id the request's
`X-Test-Sid-Hex` names, and records every request head as bytes: the sidecar, with
`server.fast_path` on and off, must answer 502 with a JSON-RPC error carrying the request's
id, close the session upstream with a DELETE whose `Mcp-Session-Id` holds exactly the bytes
the upstream sent, track nothing, count and log it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.peers.processes import HOST, SidecarFactory, free_ports
from tests.test_fast_path import exchange


class RawUpstream:
    """Answers every POST 200 with `Mcp-Session-Id: <the bytes of X-Test-Sid-Hex>`, every
    DELETE 200, and keeps each request's head as it came."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        # When set: every request naming a session is answered 404 (the upstream lost it),
        # and every initialize gets this id, whatever the request asked for.
        self.lost_then: bytes | None = None
        self.port = free_ports(1)[0]
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/mcp"

    def deletes(self) -> list[bytes]:
        return [head for head in self.heads if head.startswith(b"DELETE ")]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.heads.append(head)
                fields = dict(_fields(head))
                body = await reader.readexactly(int(fields.get(b"content-length", b"0")))
                writer.write(self._answer(head, fields, body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes, fields: dict[bytes, bytes], body: bytes) -> bytes:
        if self.lost_then is None or head.startswith(b"DELETE "):
            return _answer(head, fields, body)
        if b"mcp-session-id" in fields:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        return _answer(head, {**fields, b"x-test-sid-hex": self.lost_then.hex().encode()}, body)


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(n.strip().lower(), v.strip()) for n, _, v in (x.partition(b":") for x in lines if x)]


def _answer(head: bytes, fields: dict[bytes, bytes], body: bytes) -> bytes:
    if head.startswith(b"DELETE "):
        return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    message = json.loads(body)
    # An initialize is answered with the version it asked for, as a server speaking it would.
    version = message.get("params", {}).get("protocolVersion")
    outcome = {} if version is None else {"protocolVersion": version}
    result = json.dumps({"jsonrpc": "2.0", "id": message.get("id"), "result": outcome}).encode()
    sid = bytes.fromhex(fields[b"x-test-sid-hex"].decode())
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (sid, len(result), result)
    )


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


UNTRACKABLE = {
    "non-ascii": b"ab\xe9cd",
    "utf-8": "ab\u00e9cd".encode(),
    "too-long": b"a" * 257,
    "space": b"ab cd",
    "tab": b"ab\tcd",
    "control": b"ab\x01cd",
}


def _post(path: str, message: dict[str, Any], sid: bytes) -> bytes:
    body = json.dumps(message).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: example.test\r\nContent-Type: application/json\r\n"
        f"Accept: application/json, text/event-stream\r\nAuthorization: Bearer who\r\n"
        f"X-Test-Sid-Hex: {sid.hex()}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": "init-7",
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}},
}
# A request the parser does not read as `initialize`, on a path no endpoint claims: the
# backstop sees the upstream's new id.
TOOLS = {"jsonrpc": "2.0", "id": 41, "method": "tools/list"}


@pytest.mark.parametrize("fast_path", [False, True], ids=["full-path", "fast-path"])
@pytest.mark.parametrize("kind", sorted(UNTRACKABLE))
async def test_an_untrackable_upstream_id_is_closed_upstream_and_answered_502(
    kind: str,
    fast_path: bool,
    raw_upstream: RawUpstream,
    sidecar_factory: SidecarFactory,
) -> None:
    sid = UNTRACKABLE[kind]
    sidecar = sidecar_factory(raw_upstream.url, server={"fast_path": fast_path})
    requests = [_post("/mcp", INITIALIZE, sid), _post("/elsewhere", TOOLS, sid)]
    answers = await exchange(sidecar.listen_port, requests)
    for (status, _, body), request_id in zip(answers, ("init-7", 41), strict=True):
        assert status == 502, body
        error = json.loads(body)
        assert error["id"] == request_id
        assert "cannot track" in error["error"]["message"]
    deletes = raw_upstream.deletes()
    assert len(deletes) == 2
    for head in deletes:
        assert b"\r\nMcp-Session-Id: " + sid + b"\r\n" in head
        assert b"\r\nAuthorization: Bearer who\r\n" in head
    sessions = await _admin_json(sidecar.admin_url, "/sessions?state=live")
    assert sessions["total"] == 0
    metrics = (await _admin_get(sidecar.admin_url, "/metrics")).decode()
    assert 'rejected_total{reason="untrackable_session"} 2.0' in metrics
    assert "cannot track" in sidecar.output()


async def _admin_get(admin_url: str, path: str) -> bytes:
    port = int(admin_url.rsplit(":", 1)[1])
    head = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    ((status, _, body),) = await exchange(port, [head])
    assert status == 200
    return body


async def _admin_json(admin_url: str, path: str) -> Any:
    return json.loads(await _admin_get(admin_url, path))


@pytest.mark.parametrize("fast_path", [False, True], ids=["full-path", "fast-path"])
async def test_a_resume_given_an_untrackable_id_closes_it_upstream_and_the_session(
    fast_path: bool, raw_upstream: RawUpstream, sidecar_factory: SidecarFactory
) -> None:
    """A lost session re-created (`recover_lost`) behind an id the sidecar cannot track: the
    new upstream session is closed with its exact bytes, the resume fails (the client's id
    gets the spec's 404, as any failed resume), and nothing is bound to that id."""
    sidecar = sidecar_factory(
        raw_upstream.url, server={"fast_path": fast_path}, upstream={"recover_lost": True}
    )
    ((status, headers, body),) = await exchange(
        sidecar.listen_port, [_post("/mcp", INITIALIZE, b"good-id-1")]
    )
    assert status == 200, body
    session_id = {name.lower(): value for name, value in headers}[b"mcp-session-id"]
    bad = UNTRACKABLE["non-ascii"]
    raw_upstream.lost_then = bad
    call = _post("/mcp", TOOLS, b"unused").replace(
        b"\r\nContent-Length", b"\r\nMcp-Session-Id: " + session_id + b"\r\nContent-Length"
    )
    ((status, _, body),) = await exchange(sidecar.listen_port, [call])
    assert status == 404, body
    assert json.loads(body)["error"]["code"] == -32001
    deletes = [head for head in raw_upstream.deletes() if b"\r\nMcp-Session-Id: " + bad in head]
    assert len(deletes) == 1
    view = await _admin_json(sidecar.admin_url, f"/sessions/{session_id.decode()}")
    assert view["state"] == "closed"
    metrics = (await _admin_get(sidecar.admin_url, "/metrics")).decode()
    assert 'resume_failures_total{reason="untrackable"} 1.0' in metrics
    assert "cannot track" in sidecar.output()
