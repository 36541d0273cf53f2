"""Upstream faults not covered elsewhere, with the real FastMCP server (SPEC 2.5).

Down (502) and restarted-with-sessions-lost (404, `upstream_gone`) are in
`test_lifecycle.py`; a slow answer (504) and a body that stalls are in `test_proxy_unit.py`.
Here: a quiet stream outlives `read_timeout`, and connections reset (TCP RST) in the middle
of a POST's SSE answer and of a GET stream, through a relay in front of FastMCP.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.peers.mcp_clients import (
    RawSession,
    eventually,
    open_stream,
    parse_sse,
    raw_client,
    sleep_until,
)
from tests.peers.processes import HOST, SidecarFactory, SidecarHandle, UpstreamHandle
from tests.peers.resetting_relay import ResettingRelay

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


@pytest.fixture
async def relay(upstream: UpstreamHandle) -> AsyncIterator[ResettingRelay]:
    async with ResettingRelay(HOST, upstream.port) as started:
        yield started


async def _sse_messages(response: httpx.Response) -> AsyncIterator[dict[str, object]]:
    buffer = ""
    async for text in response.aiter_text():
        buffer += text.replace("\r\n", "\n")
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            for event in parse_sse(block):
                if event.get("data"):
                    yield json.loads(event["data"])


async def _still_usable(raw: RawSession, sidecar: SidecarHandle) -> None:
    """The session survived the reset: served again, still tracked live, and the cut call
    no longer counts as in flight (or the session would never expire)."""
    assert await raw.call_text("echo", {"text": "after the reset"}) == "after the reset"
    answer = await raw.http.get(f"{sidecar.admin_url}/sessions/{raw.session_id}")
    assert answer.status_code == 200
    assert answer.json()["state"] == "live", answer.json()
    assert answer.json()["in_flight"] == 0, answer.json()
    assert "Traceback" not in sidecar.output()


async def test_a_reset_in_the_middle_of_an_sse_answer_ends_the_clients_stream_cleanly(
    relay: ResettingRelay, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(relay.base + "/mcp")
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        call = raw.call_message("slow", {"seconds": 30})
        call["params"]["_meta"] = {"progressToken": "reset"}  # progress every 0.5 s
        got: list[dict[str, object]] = []
        async with http.stream(
            "POST", raw.url, content=json.dumps(call), headers=raw.headers()
        ) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            # Reading to the end raises if the sidecar aborted the client's connection
            # instead of ending the response: that is the "cleanly" asserted here.
            async for message in _sse_messages(answer):
                got.append(message)
                if len(got) == 1:  # a progress notification: the answer is mid-stream
                    assert relay.reset() >= 1
        assert got[0]["method"] == "notifications/progress", got
        assert not any("result" in m for m in got), got  # the call was cut, not answered
        await _still_usable(raw, sidecar)


async def test_a_reset_of_a_get_stream_ends_it_cleanly_and_the_session_stays(
    relay: ResettingRelay, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(relay.base + "/mcp")
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        async with open_stream(raw) as stream:
            assert stream.status == 200
            assert relay.reset() >= 1
            await stream.wait_ended(10)
            assert stream.error is None, repr(stream.error)
        await _still_usable(raw, sidecar)
        # A new stream opens and carries the server's messages again.
        async with open_stream(raw) as stream:
            assert stream.status == 200
            assert await raw.call_text("notify_me") == "sent"
            async with asyncio.timeout(10):
                note = await stream.messages.get()
            assert note["method"] == "notifications/resources/list_changed"
        await eventually(lambda: relay.connections() > 0, what="traffic through the relay")
