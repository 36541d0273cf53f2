"""A raw HTTP/1.1 upstream that answers with scripted bytes, for the upstream side's edges.

aiohttp's server always writes well-formed answers; the cases where the two proxy paths could
part ways are in the bytes an odd or broken upstream writes: an interim `103` before the
final answer, chunked trailers, bytes after a complete answer, a connection closed right after
an answer, an obs-folded header, bare LF line ends, a non-ASCII reason. `ScriptedUpstream`
reads each request (head, then a Content-Length body), logs it as `tests/test_fast_path.py`'s
`Recorder` does, and writes the bytes `answer` makes for it: the kind is the request's
`X-Test-Answer` header, the JSON-RPC id and the session id are echoed as a real server would.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from tests.peers.processes import HOST, free_ports

PATH = "/mcp"
# Headers the upstream sees that differ by construction between two sidecars.
PER_SIDECAR = {"x-forwarded-for", "x-forwarded-host"}


def _head(status: str, *headers: str, end: str = "\r\n") -> bytes:
    return (end.join([f"HTTP/1.1 {status}", *headers]) + end + end).encode("utf-8")


def _json(status: str, body: bytes, *headers: str, end: str = "\r\n") -> bytes:
    head = ["Content-Type: application/json", f"Content-Length: {len(body)}", *headers]
    return _head(status, *head, end=end) + body


def answer(kind: str, body: bytes, session: str) -> tuple[bytes, bytes, bool]:  # noqa: PLR0911 - one branch per scripted kind, read as a table
    """The bytes an upstream writes for a request of `kind`: what comes before the final
    answer (written at once), the final answer, and whether it then closes."""
    sid = f"Mcp-Session-Id: {session}"
    plain = _json("200 OK", body, sid)
    if kind == "early-hints":  # RFC 8297: interim answers, then the final one
        hints = _head("103 Early Hints", "Link: </style.css>; rel=preload")
        return hints + _head("100 Continue"), plain, False
    if kind == "trailers":
        chunks = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\nX-Trailer: t\r\n\r\n"
        head = _head("200 OK", "Content-Type: application/json", sid, "Transfer-Encoding: chunked")
        return b"", head + chunks, False
    if kind == "extra":  # a second, unasked-for answer right behind the first
        stray = json.dumps({"jsonrpc": "2.0", "id": 999, "result": {"stray": 1}}).encode()
        return b"", plain + _json("200 OK", stray, "Mcp-Session-Id: stray"), False
    if kind == "close":  # the upstream drops its keep-alive connection, saying nothing
        return b"", plain, True
    if kind == "obs-fold":
        return b"", _json("200 OK", body, sid, "X-Folded: a", " b"), False
    if kind == "bare-lf":
        return b"", _json("200 OK", body, sid, end="\n"), False
    if kind == "reason":
        return b"", _json("200 Très bien", body, sid), False
    if kind == "reason-latin-1":
        return b"", _json("200 Très bien", body, sid).replace("è".encode(), b"\xe8"), False
    if kind == "blank-sid":  # RFC 9110 §5.5: the blanks around a value are not part of it
        return b"", _json("200 OK", body, f"Mcp-Session-Id:  {session} \t"), False
    if kind == "nul":  # aiohttp's client refuses it, though llhttp's lenient mode does not
        return b"", _json("200 OK", body, sid, "X-Bad: a\x00b"), False
    if kind == "long-field":  # one byte past aiohttp's 8190 for a header's value
        return b"", _json("200 OK", body, sid, "X-Long: " + "a" * 8191), False
    if kind == "many-headers":  # one past aiohttp's 128
        extra = [f"X-{n}: a" for n in range(129 - 3)]
        return b"", _json("200 OK", body, sid, *extra), False
    return b"", plain, False


def _write_and_close(writer: asyncio.StreamWriter, data: bytes) -> None:
    """The answer and the end of the connection in one TCP segment (corked, the FIN rides on
    the data): the sidecar reads both from one arrival, as it does from an upstream that
    closes right behind an answer, never the answer with the FIN still in flight."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    writer.write(data)  # the socket is writable: sent at once, held by the cork
    sock.shutdown(socket.SHUT_WR)


class ScriptedUpstream:
    """A Streamable HTTP upstream writing `answer`'s bytes; `log` holds every request.

    A request with `X-Test-Hold` gets what comes before its final answer at once; the final
    answer waits for `release` (`arrived` is set when such a request came)."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.port = free_ports(1)[0]
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while (request := await self._read(reader)) is not None:
                first, final, close = self._answer(request)
                if any(name == "x-test-hold" for name, _ in request["headers"]):
                    writer.write(first)
                    await writer.drain()
                    self.arrived.set()
                    await self.release.wait()
                    first = b""
                if close:
                    _write_and_close(writer, first + final)
                    break
                writer.write(first + final)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        first, *lines = head.decode("utf-8", "surrogateescape").split("\r\n")
        method, path, _ = first.split(" ", 2)
        headers = [tuple(line.split(":", 1)) for line in lines if line]
        named = {name.strip().lower(): value.strip() for name, value in headers}
        body = await reader.readexactly(int(named.get("content-length", "0")))
        request = {
            "method": method,
            "path": path,
            "headers": sorted((n, v) for n, v in named.items() if n not in PER_SIDECAR),
            "body": body,
        }
        self.log.append(request)
        return request

    def _answer(self, request: dict[str, Any]) -> tuple[bytes, bytes, bool]:
        headers = dict(request["headers"])
        if request["method"] == "DELETE":
            return b"", _head("200 OK", "Content-Length: 0"), False
        message = json.loads(request["body"]) if request["body"] else {}
        if message.get("method") == "initialize":
            session = headers.get("x-test-sid", "")
            result: dict[str, Any] = {"protocolVersion": "2025-06-18"}
        else:
            session = headers.get("mcp-session-id", "")
            result = {"ok": 1}
        body = json.dumps({"jsonrpc": "2.0", "id": message.get("id"), "result": result})
        return answer(headers.get("x-test-answer", "json"), body.encode(), session)
