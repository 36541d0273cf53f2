"""An `initialize` on the fast path (`transports/fast_init.py`) does what the full path does.

Two real sidecars, one with `server.fast_path` and one without, in front of one recording
upstream: the same raw `initialize` requests through each must give the same statuses,
headers (but Date and Server), bodies, upstream requests and store rows, at the limits and
with a failing store too. A real `Lane` fed the raw bytes in process shows which requests the
fast path takes, and the SDK client initializes and calls a tool through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.manager import Limits, SessionManager
from sidecar.metrics import Metrics
from sidecar.sessions import Policy
from sidecar.store.memory import MemoryStore
from sidecar.transports import fast_init
from sidecar.transports.fast import FastPath
from sidecar.transports.forwarder import Forwarder, ProxyOptions
from sidecar.transports.lane import Lane
from sidecar.transports.resume import Resumer
from sidecar.upstream import UpstreamPool
from tests.peers.mcp_clients import eventually, sdk_session, session_rows, text_of
from tests.peers.processes import SidecarHandle, UpstreamHandle, start_sidecar
from tests.test_fast_path import Recorder, exchange, same_with_and_without

PATH = "/mcp"
# Store columns that hold the moment a row was written.
MOMENTS = {"created_at", "last_activity_at", "closed_at"}


class InitUpstream(Recorder):
    """A Streamable HTTP upstream that logs every request and answers an `initialize` as its
    `X-Test-Sid` (the id to issue, none without it) and `X-Test-Answer` headers say."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        if request.method == "DELETE":
            return web.Response(status=200)
        return await self._answer(request, body)

    async def _answer(self, request: web.Request, body: bytes) -> web.StreamResponse:
        message = json.loads(body)
        first = message[0] if isinstance(message, list) else message
        sid = request.headers.get("X-Test-Sid")
        headers = {"Mcp-Session-Id": sid} if sid is not None else {}
        mode = request.headers.get("X-Test-Answer", "json")
        if mode == "hold":
            await self.release.wait()
        result = {"jsonrpc": "2.0", "id": first.get("id"), "result": {"protocolVersion": "x"}}
        if mode == "sse":
            response = web.StreamResponse(
                headers={**headers, "Content-Type": "text/event-stream", "X-Up": "1"}
            )
            await response.prepare(request)
            await response.write(f"event: message\ndata: {json.dumps(result)}\n\n".encode())
            await response.write_eof()
            return response
        if mode == "bad-request":  # the Python SDK's 400 carries a throw-away id
            error = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "no"}}
            return web.json_response(error, status=400, headers=headers)
        if mode == "broken":
            return web.Response(status=500, text="upstream broke", headers=headers)
        return web.json_response(result, headers={**headers, "X-Up": "1"})


@pytest.fixture
async def recorder() -> AsyncIterator[InitUpstream]:
    upstream = InitUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


def start_pair(
    tmp_path: Path, url: str, **config: dict[str, Any]
) -> tuple[SidecarHandle, SidecarHandle]:
    server = config.pop("server", {})
    fast = start_sidecar(tmp_path / "fast", url, server={**server, "fast_path": True}, **config)
    try:
        slow = start_sidecar(
            tmp_path / "slow", url, server={**server, "fast_path": False}, **config
        )
    except BaseException:
        fast.stop()
        raise
    return fast, slow


@pytest.fixture
def pair(tmp_path: Path, recorder: InitUpstream) -> Iterator[tuple[SidecarHandle, SidecarHandle]]:
    sidecars = start_pair(tmp_path, recorder.url)
    try:
        yield sidecars
    finally:
        for sidecar in sidecars:
            sidecar.stop()


def initialize(
    sid: str | None,
    *extra: str,
    request_id: int | str = 0,
    batch: bool = False,
    notify: bool = False,
) -> bytes:
    message: dict[str, Any] = {
        "jsonrpc": "2.0",
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {"roots": {}},
            "clientInfo": {"name": "fast-init-test", "version": "1.0"},
        },
    }
    if not notify:
        message["id"] = request_id
    data = json.dumps([message] if batch else message).encode()
    head = [
        f"POST {PATH} HTTP/1.1",
        "Host: example.test",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"Content-Length: {len(data)}",
        *([] if sid is None else [f"X-Test-Sid: {sid}"]),
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def call(sid: str, request_id: int) -> bytes:
    data = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/list"}).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: example.test\r\nContent-Type: application/json\r\n"
        f"Accept: application/json, text/event-stream\r\nMcp-Session-Id: {sid}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


SEQUENCE = [
    initialize("a-json", request_id=1),
    initialize("a-sse", "X-Test-Answer: sse", request_id=2),
    initialize(
        "a-client",
        "User-Agent: test-agent/1.0",
        "Authorization: Bearer token",
        "Cookie: c=1",
        "MCP-Protocol-Version: 2025-06-18",
        "Origin: http://example.test",
        request_id="three",
    ),
    initialize("throw-away", "X-Test-Answer: bad-request", request_id=4),
    initialize(None, request_id=5),  # a stateless server: no session
    initialize(None, "X-Test-Answer: sse", request_id=6),
    initialize("bad id", request_id=7),  # untrackable: closed upstream, answered 502
    initialize("b-batch", batch=True, request_id=8),  # the full path's on both
    initialize("b-notify", notify=True),
    initialize("broken", "X-Test-Answer: broken", request_id=9),
    call("a-json", 10),
    call("a-sse", 11),
]


def rows(sidecar: SidecarHandle) -> dict[str, dict[str, Any]]:
    return {
        sid: {k: v for k, v in row.items() if k not in MOMENTS}
        for sid, row in session_rows(sidecar.db_path).items()
    }


async def test_same_answers_requests_and_rows_with_and_without_fast_path(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: InitUpstream
) -> None:
    fast, slow = pair
    fast_answers = await same_with_and_without(pair, recorder, SEQUENCE)
    statuses = [status for status, _, _ in fast_answers]
    assert statuses == [200, 200, 200, 400, 200, 200, 502, 200, 200, 500, 200, 200]
    assert (b"mcp-session-id", b"a-sse") in fast_answers[1][1]
    fast_rows, slow_rows = rows(fast), rows(slow)
    assert fast_rows == slow_rows
    assert sorted(fast_rows) == ["a-client", "a-json", "a-sse", "b-batch", "b-notify"]
    assert fast_rows["a-client"]["user_agent"] == "test-agent/1.0"


async def test_limits_reached_give_the_same_503_on_both_paths(
    tmp_path: Path, recorder: InitUpstream
) -> None:
    sidecars = start_pair(tmp_path, recorder.url, sessions={"max_sessions": 1})
    try:
        answers = []
        for sidecar in sidecars:
            answers.append(
                await exchange(
                    sidecar.listen_port,
                    [initialize("first", request_id=1), initialize("second", request_id=2)],
                )
            )
            recorder.log.append({"sidecar": "next"})
        assert answers[0] == answers[1]
        (first, _, _), (status, headers, body) = answers[0]
        assert (first, status) == (200, 503)
        assert (b"retry-after", b"30") in headers
        assert json.loads(body)["id"] == 2
        # Refused before anything was sent upstream: only the first initialize got there.
        assert [entry.get("method") for entry in recorder.log] == ["POST", None, "POST", None]
        assert rows(sidecars[0]) == rows(sidecars[1])
    finally:
        for sidecar in sidecars:
            sidecar.stop()


@contextlib.contextmanager
def write_lock(db_path: Path) -> Iterator[None]:
    """Another process's write transaction: the sidecar's insert fails (busy)."""
    lock = sqlite3.connect(db_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        lock.rollback()
        lock.close()


async def test_a_store_failure_answers_503_and_deletes_the_upstream_session_on_both_paths(
    pair: tuple[SidecarHandle, SidecarHandle], recorder: InitUpstream
) -> None:
    logs, answers = [], []
    for sidecar in pair:
        with write_lock(sidecar.db_path):
            answers.append(
                await exchange(sidecar.listen_port, [initialize("doomed", "Cookie: c=2")])
            )
        logs.append([(entry["method"], entry["headers"]) for entry in recorder.log])
        recorder.log = []
    assert answers[0] == answers[1]
    status, headers, body = answers[0][0]
    assert status == 503
    assert (b"retry-after", b"5") in headers
    assert "store" in json.loads(body)["error"]["message"]
    assert logs[0] == logs[1]
    delete = dict(logs[0][1][1])
    assert logs[0][1][0] == "DELETE"
    assert (delete["mcp-session-id"], delete["cookie"]) == ("doomed", "c=2")
    for sidecar in pair:
        assert "doomed" not in session_rows(sidecar.db_path)


@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "kept-alive"])
async def test_an_initialize_answered_later_than_read_timeout_is_the_same_504_on_both_paths(
    tmp_path: Path, recorder: InitUpstream, warm: bool
) -> None:
    """The fast path's deadline (`fast.Deadlines`) gives the full path's 504, and the late
    answer never reaches the next request on that connection."""
    sidecars = start_pair(tmp_path, recorder.url, upstream={"read_timeout": "1s"})
    try:
        timed_out = []
        for sidecar in sidecars:
            if warm:  # a kept-alive upstream connection is at hand for the next initialize
                await exchange(sidecar.listen_port, [initialize("warm", request_id=1)])
            held = initialize("held", "X-Test-Answer: hold", request_id=2)
            timed_out.append(await exchange(sidecar.listen_port, [held]))
        recorder.release.set()  # the held answers now come, to connections given up on
        after = [
            await exchange(s.listen_port, [initialize(f"next-{n}", request_id=3 + n)])
            for n, s in enumerate(sidecars)
        ]
    finally:
        for sidecar in sidecars:
            sidecar.stop()
    assert timed_out[0] == timed_out[1]
    status, _, body = timed_out[0][0]
    assert status == 504
    assert json.loads(body)["id"] == 2
    assert [json.loads(answer[0][2])["id"] for answer in after] == [3, 4]
    assert "held" not in rows(sidecars[0])
    assert "held" not in rows(sidecars[1])


def compact_initialize(sid: str, params: str) -> bytes:
    """An `initialize` as the SDKs write it: compact JSON, `params` before `jsonrpc` and `id`."""
    data = ('{"method":"initialize","params":' + params + ',"jsonrpc":"2.0","id":1}').encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: example.test\r\nContent-Type: application/json\r\n"
        f"Accept: application/json, text/event-stream\r\nX-Test-Sid: {sid}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def test_the_resume_state_keeps_the_clients_params_text_and_matches_the_full_path(
    pair: tuple[SidecarHandle, SidecarHandle],
) -> None:
    """The fast path stores the params' text as the request carried it (no encoding again):
    for an SDK's compact ASCII JSON that is the very text the full path stores; other text
    (here non-ASCII) is encoded as the full path does."""
    ascii_params = (
        '{"protocolVersion":"2025-06-18","capabilities":{"roots":{"listChanged":true}},'
        '"clientInfo":{"name":"a \\"params\\": client","version":"1.0"}}'
    )
    other_params = '{"protocolVersion":"2025-06-18","clientInfo":{"name":"caf\u00e9 ü"}}'
    requests = [
        compact_initialize("ascii", ascii_params),
        compact_initialize("other", other_params),
    ]
    for sidecar in pair:
        answers = await exchange(sidecar.listen_port, requests)
        assert [status for status, _, _ in answers] == [200, 200]
    fast_rows, slow_rows = rows(pair[0]), rows(pair[1])
    assert fast_rows == slow_rows
    assert fast_rows["ascii"]["resume"] == (
        '{"initialize":' + ascii_params + ',"log_level":null,"subscriptions":[]}'
    )
    stored = json.loads(fast_rows["other"]["resume"])["initialize"]
    assert stored == json.loads(other_params)


@pytest.mark.parametrize(
    "body",
    [
        # The first "params": is nested; the top-level value is another object.
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","meta":{"params":{"a":1}},'
        b'"params":{"b":2}}',
        # A repeated key: the last one counts, as for `json.loads`.
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"a":1},"params":{"b":2}}',
        # Spaced JSON: no span is cut out, the params are encoded again.
        b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"b": 2}}',
    ],
)
def test_params_text_is_only_taken_where_it_is_the_top_level_value(body: bytes) -> None:
    taken = fast_init._initialize_of(body)
    assert taken is not None
    message, text = taken
    assert message.params == {"b": 2}
    assert text is None or json.loads(text) == message.params


async def test_sdk_client_initializes_and_calls_a_tool_through_the_fast_path(
    upstream: UpstreamHandle, tmp_path: Path
) -> None:
    sidecar = start_sidecar(tmp_path, upstream.url, server={"fast_path": True})
    try:
        async with sdk_session(sidecar.url) as (session, get_id):
            result = await session.call_tool("echo", {"text": "through the fast lane"})
            assert text_of(result) == "through the fast lane"
            session_id = get_id()
        assert session_id is not None

        async def closed() -> bool:
            return session_rows(sidecar.db_path)[session_id]["state"] == "closed"

        await eventually(closed, what="the client's DELETE closed the session")
    finally:
        sidecar.stop()


# ---- which requests the fast path takes, in process ------------------------------------------
class _Transport:
    """The client connection's transport: what the lane writes to the client."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _Connection:
    """`lane.Connection` with aiohttp's handler always idle; records what it is handed."""

    def __init__(self) -> None:
        self.transport = _Transport()
        self.handed: list[bytes] = []
        self.ended = asyncio.Event()
        self.fast = 0

    def idle(self) -> bool:
        return True

    def hand_over(self, data: bytes) -> None:
        self.handed.append(data)

    def fast_begins(self) -> None:
        self.fast += 1

    def fast_ended(self) -> None:
        self.ended.set()


class _NoCloser:
    def schedule(self, *args: object) -> None:
        raise AssertionError("nothing is closed here")


@pytest.fixture
async def fast_path(recorder: InitUpstream) -> AsyncIterator[FastPath]:
    metrics = Metrics()
    manager = SessionManager(
        MemoryStore(),
        _NoCloser(),  # type: ignore[arg-type]
        metrics,
        policy=Policy(idle_timeout=600),
        limits=Limits(),
        tombstone_ttl=60,
    )
    pool = UpstreamPool(recorder.url, 1.0, 5.0)
    forwarder = Forwarder(manager, pool, metrics, ProxyOptions(fast_path=True))
    path = FastPath(forwarder, Resumer(forwarder))
    yield path
    path.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        initialize("x", batch=True),
        initialize("x", notify=True),
        initialize("x").replace(b'"initialize"', b'"tools/list"'),
        initialize("x").replace(b'"method": "initialize"', b'"method": "ping", "x": "initialize"'),
        initialize("x", "Mcp-Session-Id: s-1"),
        initialize("x", "Expect: 100-continue"),
        initialize("x", "Connection: close"),
        initialize("x").replace(b"POST /mcp ", b"POST /mcp/ "),
        initialize("x").replace(b"HTTP/1.1", b"HTTP/1.0"),
    ],
    ids=[
        "batch",
        "notification",
        "other-method",
        "ping",
        "session-id",
        "expect",
        "close",
        "other-path",
        "http-1.0",
    ],
)
async def test_the_fast_path_leaves_to_aiohttp_what_is_not_a_plain_initialize(
    fast_path: FastPath, request_bytes: bytes
) -> None:
    conn = _Connection()
    Lane(conn, fast_path, "127.0.0.1", "http").feed(request_bytes)
    assert conn.fast == 0
    assert b"".join(conn.handed) == request_bytes


async def test_the_fast_path_serves_a_plain_initialize_and_tracks_its_session(
    fast_path: FastPath, recorder: InitUpstream
) -> None:
    conn = _Connection()
    Lane(conn, fast_path, "127.0.0.1", "http").feed(initialize("x-1", request_id=3))
    assert conn.fast == 1
    await conn.ended.wait()
    assert conn.handed == []
    assert bytes(conn.transport.written).startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Mcp-Session-Id: x-1\r\n" in conn.transport.written
    assert "x-1" in fast_path.manager.live
    assert [entry["method"] for entry in recorder.log] == ["POST"]
