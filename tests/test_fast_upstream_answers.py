"""Odd upstream answers mean the same on the fast path as on the full path (SPEC 2.5).

Two real sidecars, one with `server.fast_path` and one without, in front of one scripted raw
upstream (`tests/peers/scripted_upstream.py`): interim `1xx` answers, chunked trailers, bytes
after a complete answer, a connection the upstream drops right after an answer, obs-folded
headers, bare LF line ends, a non-ASCII reason, a NUL in a header and a session id with blanks
around it must give the same answers (status lines included), the same upstream requests and
the same tracked sessions on both.

The cases where a connection is reused need the next request written while the answer before
it is still being read: it is sent while the upstream holds that answer back (`X-Test-Hold`),
and a round trip to the sidecar's admin API, answered by the same event loop, shows it was
read before the upstream is released.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.upstream import answers
from tests.peers.mcp_clients import session_rows
from tests.peers.processes import HOST, SidecarHandle
from tests.peers.scripted_upstream import ScriptedUpstream
from tests.test_fast_init import initialize, start_pair
from tests.test_fast_path import IGNORED, post, session_view

# What a client sees of an answer: its status line, its headers but Date and Server, its body.
Seen = tuple[bytes, list[tuple[bytes, ...]], bytes]
HOLD = "X-Test-Hold: 1"


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def pair(
    tmp_path: Path, upstream: ScriptedUpstream
) -> Iterator[tuple[SidecarHandle, SidecarHandle]]:
    sidecars = start_pair(tmp_path, upstream.url)
    try:
        yield sidecars
    finally:
        for sidecar in sidecars:
            sidecar.stop()


def call(n: int, kind: str = "json", *extra: str) -> bytes:
    message = {"jsonrpc": "2.0", "id": n, "method": "tools/list"}
    return post(message, f"X-Test-Answer: {kind}", *extra)


async def read_seen(reader: asyncio.StreamReader) -> Seen:
    head = await reader.readuntil(b"\r\n\r\n")
    line, *lines = head[:-4].split(b"\r\n")
    headers = [tuple(entry.split(b": ", 1)) for entry in lines]
    names = {name.lower(): value for name, *value in headers for value in value}
    if b"content-length" in names:
        body = await reader.readexactly(int(names[b"content-length"]))
    else:
        body = b""
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    shown = sorted((h[0].lower(), *h[1:]) for h in headers if h[0].lower() not in IGNORED)
    return line, shown, body


async def on_one_connection(port: int, requests: list[bytes]) -> list[Seen]:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        seen = []
        for request in requests:
            writer.write(request)
            seen.append(await read_seen(reader))
        return seen
    finally:
        writer.close()


def rpc_ids(seen: list[Seen]) -> list[Any]:
    return [json.loads(body).get("id") for _, _, body in seen]


def assert_alike(runs: list[tuple[Any, list[dict[str, Any]]]]) -> None:
    """What the clients saw and what the upstream got, the same through both sidecars."""
    (fast_seen, fast_log), (slow_seen, slow_log) = runs
    assert fast_seen == slow_seen
    assert fast_log == slow_log


async def held_then(
    sidecar: SidecarHandle, upstream: ScriptedUpstream, first: bytes, then: bytes, *, same: bool
) -> list[Seen]:
    """`first` (held by the upstream once it came), then `then` on the same connection (a
    client that does not wait for an answer) or on another one; both answers."""
    upstream.arrived.clear()
    upstream.release.clear()
    reader, writer = await asyncio.open_connection(HOST, sidecar.listen_port)
    other_reader, other_writer = (
        (reader, writer) if same else await asyncio.open_connection(HOST, sidecar.listen_port)
    )
    try:
        writer.write(first)
        await upstream.arrived.wait()
        other_writer.write(then)
        await other_writer.drain()
        await session_view(sidecar, "s-1")  # the sidecar's loop went round: `then` was read
        upstream.release.set()
        if same:
            return [await read_seen(reader), await read_seen(reader)]
        return list(await asyncio.gather(read_seen(reader), read_seen(other_reader)))
    finally:
        writer.close()
        other_writer.close()


async def test_an_interim_answer_is_never_the_final_one_nor_another_clients(
    pair: tuple[SidecarHandle, SidecarHandle], upstream: ScriptedUpstream
) -> None:
    """A 103 then a 100 before the final answer: the client gets the final answer, and the
    next request (another client's) is not written on that connection meanwhile."""
    runs = []
    for sidecar in pair:
        upstream.log = []
        warm = await on_one_connection(sidecar.listen_port, [initialize("s-1"), call(1)])
        seen = await held_then(sidecar, upstream, call(2, "early-hints", HOLD), call(3), same=False)
        runs.append((warm + seen, upstream.log))
    assert_alike(runs)
    assert rpc_ids(runs[0][0]) == [0, 1, 2, 3]
    assert [line for line, _, _ in runs[0][0]] == [b"HTTP/1.1 200 OK"] * 4


async def test_an_initialize_after_an_interim_answer_gets_its_own_session_tracked(
    pair: tuple[SidecarHandle, SidecarHandle], upstream: ScriptedUpstream
) -> None:
    runs = []
    for sidecar in pair:
        upstream.log = []
        warm = await on_one_connection(sidecar.listen_port, [initialize("s-1")])
        first = initialize("s-a", "X-Test-Answer: early-hints", HOLD, request_id="a")
        seen = await held_then(
            sidecar, upstream, first, initialize("s-b", request_id="b"), same=False
        )
        runs.append((warm + seen, upstream.log))
    assert_alike(runs)
    sessions = [dict(headers)[b"mcp-session-id"] for _, headers, _ in runs[0][0]]
    assert sessions == [b"s-1", b"s-a", b"s-b"]
    assert rpc_ids(runs[0][0]) == [0, "a", "b"]
    assert sorted(session_rows(pair[0].db_path)) == sorted(session_rows(pair[1].db_path))
    assert sorted(session_rows(pair[0].db_path)) == ["s-1", "s-a", "s-b"]


@pytest.mark.parametrize("kind", ["extra", "close"])
async def test_a_connection_is_reused_only_after_an_answer_with_nothing_after_it(
    pair: tuple[SidecarHandle, SidecarHandle], upstream: ScriptedUpstream, kind: str
) -> None:
    """`extra`: a second answer nobody asked for follows the first in the same write; `close`:
    the upstream ends the connection right after its answer without saying so. The client's
    next request, already waiting, goes to a fresh connection and gets its own answer."""
    runs = []
    for sidecar in pair:
        upstream.log = []
        warm = await on_one_connection(sidecar.listen_port, [initialize("s-1"), call(1)])
        seen = await held_then(sidecar, upstream, call(2, kind, HOLD), call(3), same=True)
        runs.append((warm + seen, upstream.log))
    assert_alike(runs)
    assert rpc_ids(runs[0][0]) == [0, 1, 2, 3]
    assert [line for line, _, _ in runs[0][0]] == [b"HTTP/1.1 200 OK"] * 4


REFUSED = ["nul", "long-field", "many-headers"]  # aiohttp's client refuses these heads
ODD_HEADS = ["obs-fold", "bare-lf", "reason", "reason-latin-1", "trailers", "blank-sid", *REFUSED]


@pytest.mark.parametrize("kind", ODD_HEADS)
async def test_odd_answer_heads_are_read_as_the_full_path_reads_them(
    pair: tuple[SidecarHandle, SidecarHandle], upstream: ScriptedUpstream, kind: str
) -> None:
    """The same answer, or the same 502, for a session's call and for an `initialize`; a
    session the upstream made is tracked under the same id (blanks around it dropped)."""
    sequence = [
        initialize("s-1"),
        call(1, kind),
        call(2),
        initialize("s-new", f"X-Test-Answer: {kind}", request_id="new"),
    ]
    runs = []
    for sidecar in pair:
        upstream.log = []
        runs.append((await on_one_connection(sidecar.listen_port, sequence), upstream.log))
    assert_alike(runs)
    fast_rows, slow_rows = session_rows(pair[0].db_path), session_rows(pair[1].db_path)
    assert sorted(fast_rows) == sorted(slow_rows)
    seen = runs[0][0]
    if kind in REFUSED:
        assert [line for line, _, _ in seen] == [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 502 Bad Gateway",
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 502 Bad Gateway",
        ]
        assert sorted(fast_rows) == ["s-1"]
        return
    assert rpc_ids(seen) == [0, 1, 2, "new"]
    assert sorted(fast_rows) == ["s-1", "s-new"]
    assert (b"x-trailer", b"t") not in seen[1][1]
    assert dict(seen[3][1])[b"mcp-session-id"] == b"s-new"


@pytest.mark.parametrize(
    ("status", "interim"), [(100, True), (103, True), (199, True), (101, False), (200, False)]
)
def test_interim_answers_are_the_1xx_but_101(status: int, interim: bool) -> None:
    assert answers.interim(status) is interim


def test_a_field_value_loses_the_blanks_after_it_and_only_those() -> None:
    assert answers.field_value(b"a b \t ") == b"a b"
    assert answers.field_value(b"ab") == b"ab"
    assert answers.field_value(b"") == b""


def test_the_limits_on_an_answer_head_are_aiohttps() -> None:
    assert answers.refused_field(b"X", b"a" * 8190, 1) == ""
    assert answers.refused_field(b"X", b"a" * 8191, 1)
    assert answers.refused_field(b"X", b"a\x00", 1)
    assert answers.refused_field(b"X", b"a", 128) == ""
    assert answers.refused_field(b"X", b"a", 129)
    assert answers.refused_reason(b"r" * 8190) is None
    assert answers.refused_reason(b"r" * 8191) is not None
