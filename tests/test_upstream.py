"""The upstream client's error mapping: what an operator reads when the server misbehaves."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from sidecar.errors import UpstreamTimeoutError, UpstreamUnreachableError
from sidecar.upstream import Upstream

ServerFactory = Callable[..., Awaitable[TestServer]]
SECRET_ID = "0123456789abcdef0123456789abcdef"


async def test_a_timeout_names_the_setting_but_never_the_session_id_in_the_query(
    aiohttp_server: ServerFactory,
) -> None:
    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_post("/messages/", stall)
    server = await aiohttp_server(app)
    upstream = Upstream(str(server.make_url("/mcp")), connect_timeout=1, read_timeout=0.2)
    await upstream.start()
    try:
        url = URL(str(server.make_url("/messages/"))).with_query(session_id=SECRET_ID)
        with pytest.raises(UpstreamTimeoutError) as caught:
            await upstream.request("POST", url, {}, b"{}")
    finally:
        await upstream.close()
    message = str(caught.value)
    assert "upstream.read_timeout" in message
    assert "/messages/" in message
    assert SECRET_ID[:9] not in message


async def test_a_refused_connection_says_what_to_check(unused_tcp_port: int) -> None:
    upstream = Upstream(f"http://127.0.0.1:{unused_tcp_port}/mcp", 1, 1)
    await upstream.start()
    try:
        with pytest.raises(UpstreamUnreachableError) as caught:
            await upstream.request("POST", upstream.url, {}, b"{}")
    finally:
        await upstream.close()
    assert "upstream.url" in str(caught.value)
    assert isinstance(caught.value, ConnectionError)  # also the stdlib's kind, for callers


class ClosingAfterAnswer:
    """A raw upstream in a thread of its own: answers each request on a connection, and
    closes that connection when told, while the sidecar's loop is not running (the test
    blocks it), so the FIN waits unread in the kernel as it does between two callbacks."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.close_now = threading.Event()
        self.closed = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.connections += 1
                with conn:
                    reader = conn.makefile("rb")
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        head += reader.readline()
                    length = int(dict(_fields(head)).get(b"content-length", b"0"))
                    reader.read(length)
                    body = b'{"jsonrpc":"2.0","id":1,"result":{}}'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    self.close_now.wait(5)
                    self.close_now.clear()
                    reader.close()
                self.closed.set()

    def stop(self) -> None:
        self.close_now.set()
        self.listener.close()


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(n.strip().lower(), v.strip()) for n, _, v in (x.partition(b":") for x in lines if x)]


async def test_a_pooled_connection_the_upstream_closed_unseen_is_not_reused() -> None:
    """SPEC 2.5: a connection the upstream closed before the request was written takes no
    request; the full path's pool asks the socket before reuse, as the fast path does."""
    server = ClosingAfterAnswer()
    upstream = Upstream(f"http://127.0.0.1:{server.port}/mcp", connect_timeout=1, read_timeout=5)
    await upstream.start()
    try:
        first = await upstream.request("POST", upstream.url, {}, b"{}")
        await first.read()
        first.release()
        server.close_now.set()
        # Blocks the loop: the FIN reaches the kernel, never the loop's read callback.
        assert server.closed.wait(5)
        second = await upstream.request("POST", upstream.url, {}, b"{}")
        assert second.status == 200
        await second.read()
        second.release()
    finally:
        await upstream.close()
        server.stop()
    assert server.connections == 2
