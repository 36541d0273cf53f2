"""Slow, oversized and malformed client traffic against the real sidecar process (SPEC 2.5).

Raw sockets, because an HTTP client library would neither trickle a request head nor send a
header line over 8 KiB. Each test waits for an event the sidecar causes (an answer, EOF on
the socket), bounded by a timeout that is the failure, never a sleep that is the proof.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from tests.peers.mcp_clients import eventually
from tests.peers.ops import mcp_session
from tests.peers.processes import SidecarFactory, SidecarHandle, UpstreamHandle


async def _connect(sidecar: SidecarHandle) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(sidecar.url)
    assert url.hostname is not None
    assert url.port is not None
    return await asyncio.open_connection(url.hostname, url.port)


async def _until_closed(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """Everything the sidecar sends until it closes the connection."""
    async with asyncio.timeout(within):
        return await reader.read()


def _json_body(answer: bytes) -> dict[str, object]:
    body = answer.partition(b"\r\n\r\n")[2]
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    return parsed


async def test_declared_oversized_body_is_refused_before_it_is_sent(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, server={"max_body_bytes": 1024})
    async with mcp_session(sidecar.url, terminate_on_close=False) as client:
        reader, writer = await _connect(sidecar)
        writer.write(
            (
                "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Accept: application/json, text/event-stream\r\n"
                f"Mcp-Session-Id: {client.session_id}\r\nContent-Length: {1 << 30}\r\n\r\n{{"
            ).encode()
        )
        await writer.drain()
        # One byte of the gigabyte sent: the answer and the close come without the rest.
        answer = await _until_closed(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        assert "larger than 1024 bytes" in json.dumps(_json_body(answer))
        assert await client.echo("still fine") == "still fine"


async def test_a_trickled_request_head_is_cut_at_header_timeout(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, server={"header_timeout": 1})
    reader, writer = await _connect(sidecar)
    writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    await writer.drain()
    assert await _until_closed(reader) == b""
    writer.close()
    await eventually(lambda: "server.header_timeout" in sidecar.output(), what="log line")


async def test_a_trickled_body_gets_408_at_body_timeout(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, server={"body_timeout": 1})
    reader, writer = await _connect(sidecar)
    writer.write(
        b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"jsonrpc"'
    )
    await writer.drain()
    answer = await _until_closed(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert "server.body_timeout" in json.dumps(_json_body(answer))


async def test_malformed_http_gets_json_400_and_one_throttled_line_without_traceback(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    bad_requests = [
        b"GET /mcp HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
        b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /mcp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] * 5
    for raw in bad_requests:
        reader, writer = await _connect(sidecar)
        writer.write(raw)
        await writer.drain()
        answer = await _until_closed(reader)
        writer.close()
        assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:100]
        assert b"application/json" in answer.partition(b"\r\n\r\n")[0]
        assert "Malformed HTTP request" in json.dumps(_json_body(answer))
    output = sidecar.output()
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "rejected malformed HTTP" in line]
    assert 1 <= len(lines) < len(bad_requests)  # throttled: a flood leaves few lines
