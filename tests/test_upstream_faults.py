"""Upstream faults not covered elsewhere, with the real FastMCP server (SPEC 2.5).

Down (502) and restarted-with-sessions-lost (404, `upstream_gone`) are in
`test_lifecycle.py`; a slow answer (504) and a body that stalls are in `test_proxy_unit.py`.
"""

from __future__ import annotations

import asyncio
import time

from tests.peers.mcp_clients import RawSession, open_stream, raw_client, sleep_until
from tests.peers.processes import SidecarFactory, UpstreamHandle

READ_TIMEOUT = 1.0


async def test_a_quiet_sse_stream_outlives_read_timeout(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    """`upstream.read_timeout` bounds waiting for an answer, never a stream's quiet: a GET
    stream silent for longer still carries the server's next message."""
    sidecar = sidecar_factory(
        upstream.url, upstream={"read_timeout": READ_TIMEOUT}, sessions={"idle_timeout": 60}
    )
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        async with open_stream(raw) as stream:
            assert stream.status == 200
            await sleep_until(time.monotonic() + 2.5 * READ_TIMEOUT)  # the condition, not proof
            assert not stream.ended.is_set()
            # The proof: the server's next message still arrives on the same stream.
            pending = asyncio.create_task(raw.post(raw.call_message("ping_client", request_id=3)))
            async with asyncio.timeout(10):
                ping = await stream.messages.get()
            assert ping["method"] == "ping"
            assert (
                await raw.post({"jsonrpc": "2.0", "id": ping["id"], "result": {}})
            ).status_code == 202
            async with asyncio.timeout(10):
                answer = await pending
            assert answer.status_code == 200
