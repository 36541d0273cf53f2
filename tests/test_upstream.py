"""The upstream client's error mapping: what an operator reads when the server misbehaves."""

from __future__ import annotations

import asyncio
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
