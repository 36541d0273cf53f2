"""The fast lane frames a client's request heads as aiohttp does (SPEC 2.5, one proxy).

The same raw bytes go to a sidecar with `server.fast_path` on and one with it off, both in
front of one recording upstream behind a byte-keeping relay: the answers, the requests the
upstream saw and the very bytes it was sent must be the same. A head aiohttp refuses (an
over-long line, a duplicate singleton header, an obsolete WebSocket key) is refused on both
ways; a header value means the same without its surrounding blanks, identity included; a
valid request is answered before the garbage in a later read. The lane itself never keeps more than
about one head's worth of a head that does not end (`Lane.buffered`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import http_parser

from sidecar.request_head import SINGLETONS
from sidecar.transports import lane as lane_module
from sidecar.transports.lane import Lane
from tests.peers.mcp_clients import eventually
from tests.peers.processes import HOST, SidecarHandle, start_sidecar
from tests.peers.resetting_relay import ResettingRelay
from tests.test_fast_path import PATH, Recorder, call, exchange, initialize, post, read_answer


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    upstream = Recorder()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def relay(recorder: Recorder) -> AsyncIterator[ResettingRelay]:
    async with ResettingRelay(HOST, recorder.port) as started:
        yield started


@pytest.fixture
def pair(tmp_path: Path, relay: ResettingRelay) -> Iterator[tuple[SidecarHandle, SidecarHandle]]:
    """Both sidecars reach the upstream through the one relay: the same `Host` upstream."""
    url = f"{relay.base}{PATH}"
    fast = start_sidecar(tmp_path / "fast", url, server={"fast_path": True})
    slow = start_sidecar(tmp_path / "slow", url, server={"fast_path": False})
    try:
        yield fast, slow
    finally:
        fast.stop()
        slow.stop()


Answers = list[tuple[int, list[Any], bytes]]


async def same_bytes_with_and_without(
    pair: tuple[SidecarHandle, SidecarHandle],
    recorder: Recorder,
    relay: ResettingRelay,
    sequence: list[bytes],
) -> Answers:
    """`same_with_and_without`, and the upstream was sent the same bytes both ways."""
    seen = []
    for sidecar in pair:
        recorder.log, relay.sent[:] = [], b""
        answers = await exchange(sidecar.listen_port, sequence)
        seen.append((answers, recorder.log, bytes(relay.sent)))
    assert seen[0][0] == seen[1][0]
    assert seen[0][1] == seen[1][1]
    assert seen[0][2] == seen[1][2]
    return seen[0][0]


def head(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


INITIALIZE = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
LONG = "a" * 8191  # a value longer than aiohttp's 8,190 bytes


# Heads aiohttp's request parser refuses with 400 that a session's POST could carry.
REFUSED = {
    **{
        f"duplicate-{name.lower()}": call(1, f"{name}: {value}", f"{name}: {value}")
        for name, value in (
            ("Content-Type", "application/json"),  # one already in `call`'s head
            ("User-Agent", "a"),
            ("Content-Location", "/x"),
            ("Max-Forwards", "3"),
            ("Content-Range", "bytes 0-1/2"),
            ("ETag", '"x"'),
            ("Server", "s"),
        )
    },
    "sec-websocket-key1": call(1, "Sec-WebSocket-Key1: 4 @1  46546xW%0l 1 5"),
    "leading-empty-lines-and-a-long-line": b"\r\n\r\n" + call(1, f"X-Long: {LONG}"),
    "long-line": call(1, f"X-Long: {LONG}"),
}


@pytest.mark.parametrize("request_bytes", REFUSED.values(), ids=REFUSED.keys())
async def test_a_head_aiohttp_refuses_is_refused_with_the_fast_path_too(
    pair: tuple[SidecarHandle, SidecarHandle],
    recorder: Recorder,
    relay: ResettingRelay,
    request_bytes: bytes,
) -> None:
    answers = await same_bytes_with_and_without(
        pair, recorder, relay, [initialize("s-1"), request_bytes]
    )
    assert answers[1][0] == 400


async def test_blanks_around_a_value_are_not_part_of_it_identity_included(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: Recorder, relay: ResettingRelay
) -> None:
    """A session made with `Bearer tok ` is the session of `Bearer tok`: its later requests
    and its DELETE find it on both paths, and the upstream gets the value without the blank."""
    blank = "Authorization: Bearer tok \t"
    delete = head(
        f"DELETE {PATH} HTTP/1.1",
        "Host: example.test",
        "Mcp-Session-Id: s-1",
        "Authorization: Bearer tok",
    )
    sequence = [
        post(INITIALIZE, "X-Test-Sid: s-1", blank, session=""),
        call(1, "Authorization: Bearer tok", "X-Extra:  spaced \t "),
        call(2, blank),
        delete,
    ]
    answers = await same_bytes_with_and_without(pair, recorder, relay, sequence)
    assert [status for status, _, _ in answers] == [200, 200, 200, 200]


GARBAGE = b"GARBAGE \x01\r\n\r\n"


@pytest.mark.parametrize("split", ["after-the-request", "after-its-head"])
async def test_a_valid_request_before_garbage_in_a_later_read_is_answered_first(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: Recorder, split: str
) -> None:
    """aiohttp answers a request whose bytes came before garbage in an earlier read, then
    the 400: so must the lane, whether it served the request or kept its head for it."""
    request = call(1)
    at = len(request) if split == "after-the-request" else request.index(b"\r\n\r\n") + 4
    results = []
    for sidecar in pair:
        recorder.log = []
        await exchange(sidecar.listen_port, [initialize("s-1")])
        reader, writer = await asyncio.open_connection(HOST, sidecar.listen_port)
        writer.write(request[:at])
        await writer.drain()
        if at == len(request):  # the garbage comes once the request has reached the upstream
            await eventually(lambda: len(recorder.log) == 2, what="the request upstream")
        else:  # a pause between two writes makes two reads (the lane's own test is exact)
            await asyncio.sleep(0.2)
        writer.write(request[at:] + GARBAGE)
        first, second = await read_answer(reader), await read_answer(reader)
        writer.close()
        results.append([first, second])
    assert results[0] == results[1]
    assert [status for status, _, _ in results[0]] == [200, 400]


class _Connection:
    """The client connection a lane is given: it records what is handed to aiohttp."""

    transport = None

    def __init__(self) -> None:
        self.handed = bytearray()
        self.pieces: list[bytes] = []

    def idle(self) -> bool:
        return True

    def hand_over(self, data: bytes) -> None:
        self.handed += data
        self.pieces.append(data)

    def fast_begins(self) -> None:
        raise AssertionError("a head that never ends is never served fast")

    def fast_ended(self) -> None:
        raise AssertionError("a head that never ends is never served fast")


class _Path:
    target = PATH.encode()

    def head_ok(self, index: dict[bytes, list[bytes]]) -> bool:
        return True


@pytest.mark.parametrize(
    "line", [b"X-Long: " + b"a" * 1000, b"a: b"], ids=["long-lines", "tiny-headers"]
)
async def test_a_head_that_never_ends_is_handed_on_not_kept(line: bytes) -> None:
    """Past one head's worth the lane keeps nothing more: aiohttp has the bytes (and
    refuses them at its limits); the lane collects no more than its own limit of headers."""
    conn = _Connection()
    lane = Lane(conn, _Path(), "127.0.0.1", "http")  # type: ignore[arg-type]
    sent = bytearray(f"POST {PATH} HTTP/1.1\r\nHost: x\r\n".encode())
    lane.feed(bytes(sent))
    for _ in range(50):
        chunk = (line + b"\r\n") * (64 * 1024 // (len(line) + 2))  # a read's worth
        lane.feed(chunk)
        sent += chunk
        assert lane.buffered <= lane_module.MAX_HEAD
        assert len(lane.headers) <= lane_module.MAX_HEADERS + 1
    assert conn.handed == sent


async def test_kept_reads_are_handed_on_read_by_read() -> None:
    """A head kept for its body, then the body and garbage: aiohttp gets the two reads as
    they came, so it answers the request before the 400 (one read of both loses it)."""
    conn = _Connection()
    lane = Lane(conn, _Path(), "127.0.0.1", "http")  # type: ignore[arg-type]
    request = call(1)
    at = request.index(b"\r\n\r\n") + 4
    lane.feed(request[:at])
    assert conn.pieces == []  # kept: the lane waits for the body
    lane.feed(request[at:] + GARBAGE)
    assert conn.pieces == [request[:at], request[at:] + GARBAGE]


def test_the_singleton_headers_are_aiohttps() -> None:
    assert {name.decode() for name in SINGLETONS} == set(http_parser.SINGLETON_HEADERS)
