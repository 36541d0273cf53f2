"""The fast path (`server.fast_path`) gives the answers and side effects of the full path.

Two real sidecars, one with the fast path and one without, in front of one recording
upstream: the same raw HTTP requests through each must give the same status, headers (but
Date and Server) and body, and the upstream must see the same requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.peers.mcp_clients import eventually
from tests.peers.ops import Admin
from tests.peers.processes import HOST, SidecarHandle, free_ports, start_sidecar

PATH = "/mcp"
METRIC = "mcp_sidecar_"
IGNORED = {b"date", b"server"}
# Headers the upstream sees that differ by construction between the two sidecars.
PER_SIDECAR = {"x-forwarded-for", "x-forwarded-host"}


class Recorder:
    """A Streamable HTTP upstream that logs every request and answers as told by headers."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()  # a held request reached the upstream
        self.release = asyncio.Event()  # held requests may answer (held streams may end)
        self.cut = asyncio.Event()  # the sidecar dropped the connection of a held stream
        self.runner: web.AppRunner | None = None
        self.port = free_ports(1)[0]

    async def record(self, request: web.Request) -> bytes:
        """Log the request as the comparisons see it; its body."""
        body = await request.read()
        self.log.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": sorted(
                    (k.lower(), v)
                    for k, v in request.headers.items()
                    if k.lower() not in PER_SIDECAR
                ),
                "body": body,
            }
        )
        return body

    async def handle(self, request: web.Request) -> web.StreamResponse:  # noqa: PLR0911 - one branch per answer kind, read as a table
        body = await self.record(request)
        session = request.headers.get("X-Test-Sid", "")
        message = json.loads(body) if body else {}
        if message.get("method") == "initialize":
            return web.json_response(
                {"jsonrpc": "2.0", "id": message["id"], "result": {}},
                headers={"Mcp-Session-Id": session},
            )
        if request.method == "DELETE":
            return web.Response(status=200)
        answer = json.dumps({"jsonrpc": "2.0", "id": message.get("id"), "result": {"ok": 1}})
        mode = request.headers.get("X-Test-Answer", "json")
        if mode == "sse":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(f"event: message\ndata: {answer}\n\n".encode())
            await response.write_eof()
            return response
        if mode == "hold":
            self.arrived.set()
            await self.release.wait()
        if mode == "stream":  # one event, then open until released or cut
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(f"event: message\ndata: {answer}\n\n".encode())
            self.arrived.set()
            await self.released_or_cut(request)
            with contextlib.suppress(ConnectionError):  # cut: nothing more can be written
                await response.write_eof()
            return response
        if mode == "close":  # the upstream ends its keep-alive connection after this answer
            response = web.Response(body=answer.encode(), content_type="application/json")
            response.force_close()
            return response
        if mode == "gone":
            return web.json_response({"error": "no session"}, status=404)
        if mode == "empty":
            return web.Response(status=202, headers={"X-Extra": "a"})
        return web.Response(
            body=answer.encode(),
            content_type="application/json",
            headers={"Mcp-Session-Id": request.headers.get("Mcp-Session-Id", ""), "X-Up": "1"},
        )

    async def released_or_cut(self, request: web.Request) -> None:
        """Until `release`, or until the sidecar drops the connection (`cut` is set then):
        aiohttp tells a handler nothing of that, its transport is gone."""
        while not self.release.is_set():
            if request.transport is None or request.transport.is_closing():
                self.cut.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), 0.02)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    upstream = Recorder()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def pair(tmp_path: Path, recorder: Recorder) -> Iterator[tuple[SidecarHandle, SidecarHandle]]:
    fast = start_sidecar(tmp_path / "fast", recorder.url, server={"fast_path": True})
    slow = start_sidecar(tmp_path / "slow", recorder.url, server={"fast_path": False})
    try:
        yield fast, slow
    finally:
        fast.stop()
        slow.stop()


async def exchange(port: int, requests: list[bytes]) -> list[tuple[int, list[Any], bytes]]:
    """Send the raw requests on one connection, one at a time; the answers as seen."""
    reader, writer = await asyncio.open_connection(HOST, port)
    answers = []
    try:
        for request in requests:
            writer.write(request)
            await writer.drain()
            answers.append(await read_answer(reader))
    finally:
        writer.close()
    return answers


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, list[Any], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:] if line]
    names = {name.lower(): value for name, value in headers}
    if b"content-length" in names:
        body = await reader.readexactly(int(names[b"content-length"]))
    elif names.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    else:
        body = b""
    shown = sorted((n.lower(), v) for n, v in headers if n.lower() not in IGNORED)
    return status, shown, body


def post(body: dict[str, Any] | bytes, *extra: str, session: str = "s-1") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = [
        f"POST {PATH} HTTP/1.1",
        "Host: example.test",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"Content-Length: {len(data)}",
    ]
    if session:
        head.append(f"Mcp-Session-Id: {session}")
    return ("\r\n".join([*head, *extra]) + "\r\n\r\n").encode() + data


def initialize(session: str) -> bytes:
    message = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
    return post(message, f"X-Test-Sid: {session}", session="")


def call(n: int, *extra: str) -> bytes:
    return post({"jsonrpc": "2.0", "id": n, "method": "tools/list"}, *extra)


SEQUENCE = [
    initialize("s-1"),
    call(1),
    call(2, "X-Test-Answer: sse"),
    call(3, "X-Forwarded-For: 10.0.0.1", "Connection: keep-alive", "Keep-Alive: 5"),
    post({"jsonrpc": "2.0", "method": "notifications/initialized"}, "X-Test-Answer: empty"),
    post(b"not json"),
    call(4, "Origin: http://example.test"),
    call(5, "MCP-Protocol-Version: 2025-06-18", "Authorization: Bearer x"),
    post({"jsonrpc": "2.0", "id": 6, "method": "ping"}, session="unknown-id"),
    call(8, "X-Test-Answer: gone"),
    call(9),
    call(10, "Transfer-Encoding: identity"),  # malformed: aiohttp answers 400 and closes
]


async def same_with_and_without(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: Recorder, sequence: list[bytes]
) -> list[tuple[int, list[Any], bytes]]:
    """`sequence` through the sidecar with the fast path and the one without: the same
    answers, and the same requests reached the upstream. Returns the answers."""
    fast, slow = pair
    fast_answers = await exchange(fast.listen_port, sequence)
    fast_log, recorder.log = recorder.log, []
    slow_answers = await exchange(slow.listen_port, sequence)
    assert fast_answers == slow_answers
    assert fast_log == recorder.log
    return fast_answers


async def test_same_answers_and_upstream_requests_with_and_without_fast_path(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: Recorder
) -> None:
    fast_answers = await same_with_and_without(pair, recorder, SEQUENCE)
    assert [status for status, _, _ in fast_answers][:3] == [200, 200, 200]


async def test_head_and_body_in_two_writes_and_a_pipelined_pair(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: Recorder
) -> None:
    results = []
    for sidecar in pair:
        await exchange(sidecar.listen_port, [initialize("s-1")])
        reader, writer = await asyncio.open_connection(HOST, sidecar.listen_port)
        request = call(1)
        split = request.index(b"\r\n\r\n") + 4
        writer.write(request[:split])
        await writer.drain()
        writer.write(request[split:])
        first = await read_answer(reader)
        writer.write(call(2) + call(3))  # pipelined: aiohttp answers both, in order
        second, third = await read_answer(reader), await read_answer(reader)
        writer.close()
        results.append([first, second, third])
    assert results[0] == results[1]
    assert [status for status, _, _ in results[0]] == [200, 200, 200]


async def session_view(sidecar: SidecarHandle, session: str) -> dict[str, Any]:
    url = f"{sidecar.admin_url}/sessions/{session}"
    async with aiohttp.ClientSession() as client, client.get(url) as answer:
        return dict(await answer.json())


# A first fast request opens the upstream connection (in a task); later ones find it kept alive
# and are served from its callbacks: both ways must keep the rules.
WARM = pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "kept-alive"])


@WARM
async def test_a_client_that_leaves_mid_request_leaves_no_call_in_flight(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: Recorder, warm: bool
) -> None:
    fast = pair[0]
    await exchange(fast.listen_port, [initialize("s-1"), *([call(0)] if warm else [])])
    _, writer = await asyncio.open_connection(HOST, fast.listen_port)
    writer.write(call(1, "X-Test-Answer: hold"))
    await recorder.arrived.wait()
    assert (await session_view(fast, "s-1"))["in_flight"] == 1
    writer.close()

    async def settled() -> bool:
        return (await session_view(fast, "s-1"))["in_flight"] == 0

    await eventually(settled, what="in_flight back to 0")
    recorder.release.set()
    # The connection still serves the session afterwards.
    assert (await exchange(fast.listen_port, [call(2)]))[0][0] == 200


async def test_a_client_that_leaves_a_streamed_answer_is_no_longer_in_flight_at_once(
    tmp_path: Path,
) -> None:
    """Whichever path: the call ends and the stream's upstream connection is dropped when
    the client leaves, not when the upstream next writes (it writes nothing more here)."""
    for fast_path in (True, False):
        recorder = Recorder()
        await recorder.start()
        sidecar = start_sidecar(
            tmp_path / str(fast_path), recorder.url, server={"fast_path": fast_path}
        )
        try:
            await exchange(sidecar.listen_port, [initialize("s-1"), call(0)])
            reader, writer = await asyncio.open_connection(HOST, sidecar.listen_port)
            writer.write(call(1, "X-Test-Answer: stream"))
            await reader.readuntil(b'"ok": 1')  # the first event came through
            assert (await session_view(sidecar, "s-1"))["in_flight"] == 1
            writer.close()

            async def settled(sidecar: SidecarHandle = sidecar) -> bool:
                return (await session_view(sidecar, "s-1"))["in_flight"] == 0

            await eventually(settled, what=f"in_flight back to 0 (fast_path={fast_path})")
            await asyncio.wait_for(recorder.cut.wait(), 5)  # its upstream connection dropped
            # The session is served on afterwards, on another upstream connection.
            assert (await exchange(sidecar.listen_port, [call(2)]))[0][0] == 200
        finally:
            sidecar.stop()
            await recorder.stop()


async def test_closing_the_session_cuts_a_fast_event_stream(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: Recorder
) -> None:
    fast = pair[0]
    await exchange(fast.listen_port, [initialize("s-1")])
    reader, writer = await asyncio.open_connection(HOST, fast.listen_port)
    writer.write(call(1, "X-Test-Answer: stream"))
    await recorder.arrived.wait()
    url = f"{fast.admin_url}/sessions/s-1"
    async with aiohttp.ClientSession() as client, client.delete(url) as answer:
        assert answer.status == 200
    status, headers, body = await read_answer(reader)  # ends: the close cut the stream
    writer.close()
    assert status == 200
    assert (b"transfer-encoding", b"chunked") in headers
    assert b'"ok": 1' in body
    recorder.release.set()


async def test_a_slow_body_is_handed_to_aiohttp_and_gets_its_408(
    tmp_path: Path, recorder: Recorder
) -> None:
    sidecar = start_sidecar(tmp_path, recorder.url, server={"body_timeout": "1s"})
    try:
        await exchange(sidecar.listen_port, [initialize("s-1")])
        reader, writer = await asyncio.open_connection(HOST, sidecar.listen_port)
        request = call(1)
        writer.write(request[:-3])  # the body never completes
        status, _, body = await read_answer(reader)
        writer.close()
        assert status == 408
        assert b"body_timeout" in body
        assert all(entry["body"] != request[-20:] for entry in recorder.log[1:])
        assert len(recorder.log) == 1  # only the initialize reached the upstream
    finally:
        sidecar.stop()


@WARM
async def test_an_answer_head_later_than_read_timeout_is_a_504_and_its_connection_not_reused(
    tmp_path: Path, recorder: Recorder, warm: bool
) -> None:
    """The upstream's late answer must never reach the next request on that connection."""
    sidecars = [
        start_sidecar(
            tmp_path / name, recorder.url, server={"fast_path": on}, upstream={"read_timeout": "1s"}
        )
        for name, on in (("fast", True), ("slow", False))
    ]
    try:
        timed_out = []
        for sidecar in sidecars:
            await exchange(sidecar.listen_port, [initialize("s-1"), *([call(0)] if warm else [])])
            timed_out.append(await exchange(sidecar.listen_port, [call(1, "X-Test-Answer: hold")]))
        recorder.release.set()  # the held answers now come, to connections given up on
        after = [await exchange(s.listen_port, [call(2), call(3)]) for s in sidecars]
    finally:
        for sidecar in sidecars:
            sidecar.stop()
    assert timed_out[0] == timed_out[1]
    status, _, body = timed_out[0][0]
    assert status == 504
    assert json.loads(body)["id"] == 1
    assert after[0] == after[1]
    assert [json.loads(answer[2])["id"] for answer in after[0]] == [2, 3]


async def test_an_upstream_that_ends_its_connection_after_an_answer(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: Recorder
) -> None:
    """The next request gets its answer on a new connection, on both paths, the same."""
    sequence = [initialize("s-1"), call(1), call(2, "X-Test-Answer: close"), call(3), call(4)]
    answers = [await exchange(sidecar.listen_port, sequence) for sidecar in pair]
    assert answers[0] == answers[1]
    assert [json.loads(body)["id"] for _, _, body in answers[0][1:]] == [1, 2, 3, 4]


async def test_a_request_body_in_a_content_coding_is_refused_415_on_both_paths(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: Recorder
) -> None:
    """The sidecar reads every body it forwards as JSON-RPC (initialize, calls, activity):
    one in a coding it cannot read gets 415, never a 500, and nothing reaches the upstream."""
    message = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    init = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}})
    refused = [
        post(gzip.compress(message), "Content-Encoding: gzip"),
        post(b"\x1f\x8b not gzip at all", "Content-Encoding: gzip"),  # bogus
        post(message, "Content-Encoding: identity, br"),
        post(gzip.compress(init.encode()), "Content-Encoding: GZIP", "X-Test-Sid: s-2", session=""),
    ]
    await same_with_and_without(pair, recorder, [initialize("s-1")])
    recorder.log = []
    for request in refused:  # a 415 closes its connection: the rest of the body is unread
        (answer,) = await same_with_and_without(pair, recorder, [request])
        status, headers, body = answer
        assert status == 415, answer
        assert (b"accept-encoding", b"identity") in headers
        assert "not supported" in json.loads(body)["error"]["message"]
    assert recorder.log == []
    # Identity is no coding: served as usual.
    (plain,) = await same_with_and_without(
        pair, recorder, [post(message, "Content-Encoding: identity")]
    )
    assert plain[0] == 200
    for sidecar in pair:
        scrape = await Admin(sidecar.admin_url).scrape()
        assert scrape.value(METRIC + "rejected_total", reason="content_encoding") == len(refused)
        assert (await Admin(sidecar.admin_url).health())["live"] == 1  # no session from s-2
