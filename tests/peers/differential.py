"""The differential fuzzer (SPEC 2.5 "One proxy, whichever way in"): the same raw bytes to a
sidecar with `server.fast_path` on and one with it off, and the same results from both.

Shared by ``tests/test_differential.py`` (hundreds of cases in the suite) and
``bench/differential.py`` (as many as you like). Two kinds of case, drawn by hypothesis:

* `RequestCase`: a generated raw client request (method, path spelling, header names, case,
  duplicates, blanks and odd bytes, framing by Content-Length or chunked, split at random
  points, a pipelined follow-up, bodies of every JSON-RPC shape and bad ones, a large one)
  naming a session in some state (live, closed, foreign, unknown, malformed, none).
* `AnswerCase`: a generated raw upstream answer (1xx before it, odd status lines and heads,
  odd `Mcp-Session-Id`s, chunk oddities and trailers, extra bytes, an early close) to a plain
  request on a live session or to an `initialize`, then a plain follow-up request.

Both sidecars stand in front of one `RawUpstream`: an asyncio server in a thread of its own
that records every request as it arrived (request line, headers in order as spelled, body)
and answers DELETEs, initializes and calls by default, or with the case's scripted bytes.
Each side's case runs on sessions of its own (same roles, different ids); ids are replaced
by their role (`<live>`, `<foreign>`, `<new1>`...) before comparing. Per case the verdict
compares (`Side.outcome`): the client's answers (status, headers but `Date`, body), the
requests that reached the upstream for the case's sessions, and the sessions' admin views
(state, requests, in-flight count...; times left out) and the live count.

`KNOWN_DIFFERENCES` names the classes of difference already reported (each with its finding
number in issue 18): a case in one of them is not drawn (`hypothesis.assume`), so the run
finds what is new. Empty it entry by entry as the fixes land.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from tests.peers.processes import HOST, SidecarHandle, free_ports, start_sidecar

PATH = "/mcp"
ALICE = b"Bearer diff-alice"
BOB = b"Bearer diff-bob"
MAX_BODY = 32 * 1024  # both sidecars' `server.max_body_bytes`: a "large" body is over it
READ_TIMEOUT = 3.0  # the client gives up on an answer after this long (counted as "no answer")
IGNORED_ANSWER_HEADERS = frozenset({b"date"})
SESSION_ID = re.compile(rb"u[0-9a-f]{24}")
# What the upstream answers when the case does not script it.
INITIALIZED = (
    b'{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18","capabilities":{}}}'
)
FUZZ_HEADER = b"X-Diff-Script"  # the request the scripted answer is for carries it

# ---- the classes of difference already known -------------------------------------------------


@dataclass(frozen=True)
class Known:
    """A class of difference already reported: `finding` (issue 18), and a test on a case."""

    finding: int
    what: str
    applies: Callable[[Any], bool]


def _head_lines(case: Any) -> list[bytes]:
    return list(getattr(case, "head_lines", ()))


def _request_known(*, blanks: bool, duplicates: bool, garbage: bool) -> Callable[[Any], bool]:
    def applies(case: Any) -> bool:
        if not isinstance(case, RequestCase):
            return False
        if blanks and case.blank_values:
            return True
        if duplicates and case.duplicate_singletons:
            return True
        return garbage and case.garbage_after

    return applies


def _answer_known(attr: str) -> Callable[[Any], bool]:
    return lambda case: isinstance(case, AnswerCase) and bool(getattr(case, attr))


KNOWN_DIFFERENCES: tuple[Known, ...] = ()


def known(case: Any) -> list[Known]:
    return [entry for entry in KNOWN_DIFFERENCES if entry.applies(case)]


# ---- the raw recording upstream --------------------------------------------------------------


@dataclass
class Script:
    """A scripted answer: `{SID}` in `data` becomes a fresh session id; close after it?"""

    data: bytes
    close: bool
    creates: bool = False  # a 2xx to an initialize: its id is an upstream session


@dataclass
class Recorded:
    method: bytes
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    answered_sid: bytes = b""  # the session id its answer issued, if any

    def session(self) -> bytes:
        for name, value in self.headers:
            if name.lower() == b"mcp-session-id":
                return value
        return b""


class _UpstreamConnection(asyncio.Protocol):
    def __init__(self, upstream: RawUpstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: Recorded | None = None
        self.name = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.upstream.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._close()

    def on_message_begin(self) -> None:
        self.current = Recorded(b"", b"", "", [], b"")

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.method = self.parser.get_method()
        self.current.version = self.parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        request, self.current = self.current, None
        assert request is not None
        assert self.transport is not None
        data, close = self.upstream.answer(request)
        if self.closed:
            return
        self.transport.write(data)
        if close:
            # The FIN right behind the answer (written at once, the buffer being empty), and
            # the case told when it is out (`closed_after_answer`): a FIN still to come
            # would race the next request, which either path may have written by then.
            self.transport.write_eof()
            self._close()
            self.upstream.closed_after_answer.set()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RawUpstream:
    """A Streamable HTTP upstream in a thread of its own, answering from raw bytes."""

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        self.log: list[Recorded] = []
        self.issued: set[bytes] = set()
        self.deleted: set[bytes] = set()
        self.script: Script | None = None
        self.origin: dict[bytes, bytes] = {}  # a scripted session id: the answer that issued it
        # Sessions issued in an answer the sidecar refused as unusable (502: a head cut off,
        # bytes that are not HTTP in its read): the client never got the id, and the full
        # path's parser (aiohttp's) hands over nothing of such an answer to know it by.
        self.unknowable: set[bytes] = set()
        self.lock = threading.Lock()
        self.closed_after_answer = threading.Event()
        self.connections: set[_UpstreamConnection] = set()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.thread = threading.Thread(target=self._run, name="raw-upstream", daemon=True)
        started = threading.Event()
        self.thread.start()
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._serve(started)))
        started.wait(5)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _serve(self, started: threading.Event) -> None:
        self.server = await self.loop.create_server(
            lambda: _UpstreamConnection(self), HOST, self.port
        )
        started.set()

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
                for connection in list(self.connections):
                    if connection.transport is not None:
                        connection.transport.close()
                await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()  # its self-pipe, or the next collection warns of it (an error here)

    def new_sid(self, creates: bool = True) -> bytes:
        sid = b"u" + secrets.token_hex(12).encode()
        if creates:
            self.issued.add(sid)
        return sid

    def answer(self, request: Recorded) -> tuple[bytes, bool]:
        with self.lock:
            self.log.append(request)
            script = self.script
            if script is not None and any(
                n.lower() == FUZZ_HEADER.lower() for n, _ in request.headers
            ):
                self.script = None
                sid = self.new_sid(script.creates) if b"{SID}" in script.data else b""
                request.answered_sid = sid
                self.origin[sid] = script.data
                if re.search(rb"^HTTP/1\.1 404|\nHTTP/1\.1 404", script.data):
                    self.deleted.add(request.session())  # it told the sidecar: no such session
                return script.data.replace(b"{SID}", sid), script.close
            return self._default(request), False

    def issued_by(self, script: Script) -> set[bytes]:
        """The session ids a script's answers issued."""
        return {sid for sid, data in self.origin.items() if data is script.data and sid}

    def _default(self, request: Recorded) -> bytes:
        if request.method == b"DELETE":
            self.deleted.add(request.session())
            return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        if request.method != b"POST":
            return _answer(405, [(b"Allow", b"POST, DELETE")], b"")
        if b'"initialize"' in request.body and not request.session():
            sid = self.new_sid()
            request.answered_sid = sid
            return _answer(
                200, [(b"Content-Type", b"application/json"), (b"Mcp-Session-Id", sid)], INITIALIZED
            )
        if b"no-such" in request.session():
            return _answer(404, [(b"Content-Type", b"application/json")], b'{"error":"no session"}')
        reply = b'{"jsonrpc":"2.0","id":1,"result":{"n":%d}}' % len(request.body)
        return _answer(200, [(b"Content-Type", b"application/json")], reply)

    def take(self) -> list[Recorded]:
        with self.lock:
            taken, self.log = self.log, []
        return taken


def _answer(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [b"HTTP/1.1 %d X" % status, *(n + b": " + v for n, v in headers)]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---- a raw client ----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _AnswerReader:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.answers: list[Answer] = []
        self.current: Answer | None = None
        self.broken = False

    def on_message_begin(self) -> None:
        self.current = Answer(0, [], b"")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.answers.append(self.current)
        self.current = None

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.broken = True


def exchange(port: int, pieces: list[bytes], expected: int) -> list[Answer]:
    """Write the pieces (a short pause between them), read until `expected` final answers,
    the connection's end, or READ_TIMEOUT; a close-delimited answer counts at the end."""
    reader = _AnswerReader()
    with socket.create_connection((HOST, port), timeout=READ_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for index, piece in enumerate(pieces):
                if index:
                    time.sleep(0.003)
                sock.sendall(piece)
        except OSError:
            pass
        deadline = time.monotonic() + READ_TIMEOUT
        while _finals(reader.answers) < expected and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not data:
                break
            reader.feed(data)
    if reader.current is not None and reader.current.status:
        reader.answers.append(reader.current)  # ended by the close
    return reader.answers


def _finals(answers: list[Answer]) -> int:
    return sum(1 for answer in answers if answer.status >= 200)


# ---- one sidecar with its sessions -----------------------------------------------------------


def _request(
    method: bytes, headers: list[tuple[bytes, bytes]], body: bytes, target: bytes = PATH.encode()
) -> bytes:
    head = [
        method + b" " + target + b" HTTP/1.1",
        b"Host: diff.test",
        *(n + b": " + v for n, v in headers),
    ]
    head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "diff", "version": "1"},
        },
    }
).encode()
JSON_HEADERS = [
    (b"Content-Type", b"application/json"),
    (b"Accept", b"application/json, text/event-stream"),
]


class Side:
    """One sidecar, and the ids of the sessions of the case it is running."""

    def __init__(self, name: str, sidecar: SidecarHandle, upstream: RawUpstream) -> None:
        self.name = name
        self.sidecar = sidecar
        self.upstream = upstream
        self.roles: dict[bytes, str] = {}

    def initialize(self, identity: bytes) -> bytes:
        answers = exchange(
            self.sidecar.listen_port,
            [_request(b"POST", [*JSON_HEADERS, (b"Authorization", identity)], INITIALIZE)],
            1,
        )
        for name, value in answers[0].headers if answers else []:
            if name.lower() == b"mcp-session-id":
                return value
        raise AssertionError(f"{self.name}: initialize failed: {answers}")

    def delete(self, sid: bytes, identity: bytes) -> None:
        request = _request(b"DELETE", [(b"Mcp-Session-Id", sid), (b"Authorization", identity)], b"")
        exchange(self.sidecar.listen_port, [request], 1)

    def prepare(self, ref: str) -> dict[str, bytes]:
        """Sessions for one case in the roles it names; the upstream's log is then cleared."""
        # Made again each time: a case sent as Bob may have closed the last one.
        ids = {"live": self.initialize(ALICE), "foreign": self.initialize(BOB)}
        if ref == "closed":
            ids["closed"] = self.initialize(ALICE)
            self.delete(ids["closed"], ALICE)
        ids["unknown"] = b"u" + b"0" * 20 + b"dead"
        self.roles = {value: f"<{role}>" for role, value in ids.items()}
        self.upstream.take()
        return ids

    def state(self, ids: dict[str, bytes]) -> dict[str, Any]:
        views = {role: self._view(sid) for role, sid in ids.items()}
        live = _admin(self.sidecar.admin_url + "/sessions?state=live&limit=1")
        return {"sessions": views, "live": live.get("total")}

    def holds(self, sid: bytes) -> bool:
        """The session is live here (by its upstream id: made here, never resumed)."""
        return _admin(f"{self.sidecar.admin_url}/sessions/{sid.decode()}").get("state") == "live"

    def _view(self, sid: bytes) -> Any:
        view = _admin(f"{self.sidecar.admin_url}/sessions/{sid.decode()}")
        for volatile in (
            "id",
            "created_at",
            "last_activity_at",
            "idle_seconds",
            "expires_at",
            "closed_at",
            "dormant_since",
            "upstream_id",
            "client",
        ):
            view.pop(volatile, None)
        return view

    def normalise(self, data: bytes, fresh: dict[bytes, str]) -> bytes:
        def role(match: re.Match[bytes]) -> bytes:
            sid = match.group(0)
            if sid in self.roles:
                return self.roles[sid].encode()
            return fresh.setdefault(sid, f"<new{len(fresh)}>").encode()

        return SESSION_ID.sub(role, data)


def _admin(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return {"status": exc.code}


# ---- the outcome of one case on one side, and the comparison ---------------------------------


@dataclass
class Outcome:
    answers: list[Any]
    upstream: list[Any]
    state: dict[str, Any]


def outcome(
    side: Side, ids: dict[str, bytes], answers: list[Answer], seen: list[Recorded]
) -> Outcome:
    fresh: dict[bytes, str] = {}
    norm = side.normalise
    shown = [
        (
            a.status,
            [
                (n.lower(), norm(v, fresh))
                for n, v in a.headers
                if n.lower() not in IGNORED_ANSWER_HEADERS
            ],
            norm(a.body, fresh),
        )
        for a in answers
    ]
    requests = [
        (
            r.method,
            norm(r.target, fresh),
            r.version,
            [(n, norm(v, fresh)) for n, v in r.headers],
            norm(r.body, fresh),
        )
        for r in seen
        # The sidecar's own DELETEs (the closer's: no X-Forwarded-For, the client's requests
        # all carry one) go out behind the case, in their own time, whatever case they are
        # of: no part of its bytes. That each one comes is what `Pair.untracked` checks.
        if r.method != b"DELETE" or _forwarded(r)
    ]
    state = side.state(ids)
    # Sessions the upstream made for this case that this side neither holds nor closed.
    made = {r.answered_sid for r in seen if r.answered_sid in side.upstream.issued}
    state["untracked"] = sum(not side.holds(sid) for sid in made - side.upstream.deleted)
    return Outcome(shown, requests, state)


def _forwarded(request: Recorded) -> bool:
    """A request the sidecar forwarded for a client, not one it sent of its own."""
    return any(name.lower() == b"x-forwarded-for" for name, _ in request.headers)


def differences(fast: Outcome, reference: Outcome) -> list[str]:
    found = []
    for what in ("answers", "upstream", "state"):
        if getattr(fast, what) != getattr(reference, what):
            ours, theirs = getattr(fast, what), getattr(reference, what)
            found.append(f"{what}:\n  fast:      {ours!r}\n  reference: {theirs!r}")
    return found


# ---- generated client requests ---------------------------------------------------------------

# Names the reference path's client writes in its own spelling.
RESPELLED = {b"content-type": b"Content-Type", b"accept": b"Accept"}
SINGLETONS = (b"Content-Type", b"User-Agent", b"Content-Location", b"Max-Forwards", b"Host")
ODD_VALUES = (b"plain", b"a\x80b", b"\xc3\xa9t\xc3\xa9", b"x\ty", b"", b"a,b", b'"q"')


@dataclass
class RequestCase:
    method: bytes
    target: bytes
    version: bytes
    ref: str  # the session it names: none, live, closed, foreign, unknown, malformed
    session_names: tuple[bytes, ...]
    session_pad: tuple[bytes, bytes]  # blanks before and after the id
    identity: bytes | None
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    chunked: bool
    splits: tuple[int, ...]
    follow_up: bool
    garbage: bytes
    head_lines: tuple[bytes, ...] = ()
    blank_values: bool = False
    duplicate_singletons: bool = False
    garbage_after: bool = False
    spellings: bool = False  # a header name repeated in two spellings (X-Odd, x-odd)
    respelled: bool = False
    obs_text: bool = False

    @property
    def kind(self) -> str:
        return f"{self.method.decode(errors='replace')} {self.ref}"

    def build(self, ids: dict[str, bytes]) -> tuple[list[bytes], int]:
        """The raw bytes as pieces to write, and how many answers to wait for."""
        lines = [self.method + b" " + self.target + b" " + self.version, b"Host: diff.test"]
        sid = ids.get(self.ref, b"not a valid id!" if self.ref == "malformed" else b"")
        for name in self.session_names:
            lines.append(name + b": " + self.session_pad[0] + sid + self.session_pad[1])
        if self.identity is not None:
            lines.append(b"Authorization: " + self.identity)
        lines.extend(n + b": " + v for n, v in self.headers)
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked")
            body = _chunked(self.body, self.splits)
        else:
            lines.append(b"Content-Length: %d" % len(self.body))
            body = self.body
        data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        expected = 1
        if self.follow_up:
            follow = [*JSON_HEADERS, (b"Authorization", ALICE), (b"Mcp-Session-Id", ids["live"])]
            data += _request(b"POST", follow, b'{"jsonrpc":"2.0","id":99,"method":"ping"}')
            expected = 2
        data += self.garbage
        cuts = sorted({c % len(data) for c in self.splits if c % len(data)})
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)], expected


def _chunked(body: bytes, splits: tuple[int, ...]) -> bytes:
    cuts = sorted({c % len(body) for c in splits if body and c % len(body)})
    pieces = (
        [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)] if body else []
    )
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


_IDS = st.one_of(
    st.integers(-(2**63), 2**63),
    st.just(1.5),
    st.text(max_size=8),
    st.none(),
    st.just([1]),
    st.just({}),
)


@st.composite
def _message(draw: st.DrawFn) -> dict[str, Any]:
    method = draw(
        st.sampled_from(
            [
                "tools/list",
                "ping",
                "tools/call",
                "notifications/initialized",
                "initialize",
                "resources/read",
                "x/unknown",
            ]
        )
    )
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if not method.startswith("notifications/"):
        message["id"] = draw(_IDS)
    if method == "initialize":
        message["params"] = {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "d", "version": "1"},
        }
    elif draw(st.booleans()):
        message["params"] = {"name": draw(st.text(max_size=6))}
    return message


@st.composite
def _request_body(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["rpc"] * 5 + ["batch", "answer", "bad", "empty", "large"]))
    if kind == "rpc":
        return json.dumps(draw(_message())).encode()
    if kind == "batch":
        return json.dumps(draw(st.lists(_message(), max_size=3))).encode()
    if kind == "answer":  # the client answering a server's request
        return json.dumps({"jsonrpc": "2.0", "id": draw(_IDS), "result": {}}).encode()
    if kind == "bad":
        return draw(st.binary(max_size=40))
    if kind == "empty":
        return b""
    size = draw(st.sampled_from([MAX_BODY - 200, MAX_BODY + 1]))
    return b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"p":"' + b"x" * size + b'"}}'


@st.composite
def request_cases(draw: st.DrawFn) -> RequestCase:
    method = draw(st.sampled_from([b"POST"] * 8 + [b"GET", b"DELETE", b"PUT", b"OPTIONS", b"post"]))
    target = draw(
        st.sampled_from(
            [b"/mcp"] * 8
            + [b"/mcp/", b"/MCP", b"/mcp?x=1", b"//mcp", b"/mcp/x", b"/other", b"/mcp%2F"]
        )
    )
    version = draw(st.sampled_from([b"HTTP/1.1"] * 10 + [b"HTTP/1.0"]))
    ref = draw(
        st.sampled_from(["live"] * 6 + ["none", "closed", "foreign", "unknown", "malformed"])
    )
    names: tuple[bytes, ...] = ()
    if ref != "none":
        name = draw(
            st.sampled_from([b"Mcp-Session-Id"] * 4 + [b"mcp-session-id", b"MCP-SESSION-ID"])
        )
        names = (name,) * draw(st.sampled_from([1] * 9 + [2]))
    pad = draw(st.sampled_from([(b"", b"")] * 8 + [(b" ", b""), (b"", b" "), (b"\t", b"\t")]))
    identity = draw(st.sampled_from([ALICE] * 6 + [BOB, None, ALICE + b" "]))
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 5)):
        headers += JSON_HEADERS
    else:
        headers += draw(
            st.lists(
                st.sampled_from(
                    [
                        (b"Content-Type", b"text/plain"),
                        (b"Accept", b"application/json"),
                        (b"accept", b"*/*"),
                        (b"CONTENT-TYPE", b"application/json; charset=utf-8"),
                        (b"Accept", b"text/event-stream"),
                    ]
                ),
                max_size=3,
            )
        )
    extras = draw(
        st.lists(
            st.sampled_from(
                [
                    (b"Connection", b"close"),
                    (b"Connection", b"keep-alive"),
                    (b"Connection", b"Upgrade"),
                    (b"Upgrade", b"h2c"),
                    (b"Expect", b"100-continue"),
                    (b"Origin", b"http://elsewhere.test"),
                    (b"MCP-Protocol-Version", b"2025-06-18"),
                    (b"MCP-Protocol-Version", b"1999-01-01"),
                    (b"X-Forwarded-For", b"10.0.0.1"),
                    (b"Keep-Alive", b"timeout=5"),
                    (b"TE", b"trailers"),
                    (b"User-Agent", b"diff/1"),
                    (b"Content-Encoding", b"identity"),
                ]
            ),
            max_size=3,
        )
    )
    headers += extras
    for _ in range(draw(st.integers(0, 2))):
        headers.append(
            (
                draw(st.sampled_from([b"X-Odd", b"x-odd", b"X-ODD-2"])),
                draw(st.sampled_from(ODD_VALUES)),
            )
        )
    if not draw(st.integers(0, 9)):
        single = draw(st.sampled_from(SINGLETONS))
        headers += [(single, b"a"), (single, b"b")]
    blanks = pad != (b"", b"") or identity == ALICE + b" "
    counts = Counter(n.lower() for n, _ in headers)
    body = draw(_request_body())
    splits = tuple(draw(st.lists(st.integers(1, 10_000), max_size=3)))
    garbage = draw(
        st.sampled_from([b""] * 12 + [b"\x00garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"])
    )
    return RequestCase(
        method=method,
        target=target,
        version=version,
        ref=ref,
        session_names=names,
        session_pad=pad,
        identity=identity,
        headers=tuple(headers),
        body=body,
        chunked=not draw(st.integers(0, 7)),
        splits=splits,
        follow_up=not draw(st.integers(0, 7)),
        garbage=garbage,
        blank_values=blanks,
        duplicate_singletons=any(counts[n.lower()] > 1 for n in SINGLETONS),
        garbage_after=bool(garbage),
        spellings=len({n for n, _ in headers}) > len(counts),
        respelled=any(n.lower() in RESPELLED and n not in RESPELLED.values() for n, _ in headers),
        obs_text=any(max(v, default=0) >= 0x80 for _, v in headers),
    )


# ---- generated upstream answers --------------------------------------------------------------


@dataclass
class AnswerCase:
    initialize: bool
    script: Script
    interim: bool = False
    closes: bool = False  # closed after the answer without saying so in its head
    cut: bool = False
    extra: bool = False
    odd_head: bool = False
    blank_session: bool = False
    trailers: bool = False
    obs_text: bool = False
    control_session: bool = False
    description: str = ""

    @property
    def kind(self) -> str:
        return self.description


@st.composite
def answer_cases(draw: st.DrawFn) -> AnswerCase:
    initialize = not draw(st.integers(0, 3))
    parts: list[str] = []
    data = b""
    interim = not draw(st.integers(0, 11))
    if interim:
        data += draw(
            st.sampled_from(
                [
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
                ]
            )
        )
        parts.append("1xx")
    status = draw(st.sampled_from([200] * 6 + [202, 400, 404, 500, 503]))
    reason = draw(st.sampled_from([b"OK"] * 10 + [b"", b"Odd Reason", b"\xc3\xa9"]))
    odd_head = reason == b"\xc3\xa9"
    eol = b"\r\n"
    if not draw(st.integers(0, 19)):
        eol, odd_head = b"\n", True
    heads: list[bytes] = [b"HTTP/1.1 %d %s" % (status, reason)]
    content_type = draw(
        st.sampled_from([b"application/json"] * 3 + [b"text/event-stream", b"text/plain", b""])
    )
    if content_type:
        heads.append(
            draw(st.sampled_from([b"Content-Type", b"content-type"])) + b": " + content_type
        )
    sid_form = draw(st.sampled_from(["plain"] * 10 + ["none", "blank", "twice", "bad", "empty"]))
    blank_session = sid_form == "blank"
    sid = {
        "plain": [b"{SID}"],
        "none": [],
        "blank": [b" {SID} "],
        "twice": [b"{SID}", b"{SID}"],
        "bad": [b"bad id\x01"],
        "empty": [b""],
    }[sid_form]
    heads += [
        draw(st.sampled_from([b"Mcp-Session-Id", b"mcp-session-id"])) + b": " + v for v in sid
    ]
    parts.append(f"{status} sid={sid_form}")
    if not draw(st.integers(0, 15)):
        heads.append(b"X-Folded: a" + eol + b" b")
        odd_head = True
    obs_text = False
    if draw(st.booleans()):
        value = draw(st.sampled_from([b"1", b"a  b", b"", b"1", b"a  b", b"", b"\x80"]))
        heads.append(b"X-Up: " + value)
        obs_text = value == b"\x80"
    if content_type == b"text/event-stream":
        body = b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'
    else:
        body = draw(
            st.sampled_from(
                [
                    b'{"jsonrpc":"2.0","id":1,"result":{}}',
                    b'{"jsonrpc":"2.0","id":0,"result":{}}',
                    b"",
                    b"not json",
                ]
            )
        )
    framing = draw(st.sampled_from(["length"] * 4 + ["chunked", "chunked", "until-close"]))
    closes = False
    trailers = False
    if framing == "length":
        heads.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        heads.append(
            draw(st.sampled_from([b"Transfer-Encoding: chunked", b"transfer-encoding: Chunked"]))
        )
        splits = tuple(draw(st.lists(st.integers(1, 200), max_size=3)))
        payload = _chunked(body, splits)
        if draw(st.integers(0, 7)) == 0:
            payload = payload[:-2] + b"X-Trailer: t\r\n\r\n"
            trailers = True
        if draw(st.integers(0, 3)) == 0:
            payload = payload.replace(b"\r\n", b";ext=1\r\n", 1) if body else payload
    else:
        heads.append(b"Connection: close")
        payload = body
    said_close = framing == "until-close"
    if draw(st.integers(0, 5)) == 0 and not said_close:
        heads.append(b"Connection: close")
        said_close = True
    elif draw(st.integers(0, 9)) == 0 and not said_close:
        closes = True  # closed after the answer without a word
    parts.append(framing)
    data += eol.join(heads) + eol + eol + payload
    extra = False
    if not draw(st.integers(0, 11)) and not said_close:
        data += draw(st.sampled_from([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", b"junk"]))
        extra = True
    cut = not draw(st.integers(0, 11))
    if cut:
        data = data[: max(1, len(data) - draw(st.integers(1, 10)))]
        parts.append("cut")
    creates = initialize and 200 <= status < 300
    script = Script(data, closes or cut or said_close, creates)
    return AnswerCase(
        initialize=initialize,
        script=script,
        interim=interim,
        closes=closes,
        cut=cut,
        extra=extra,
        odd_head=odd_head,
        blank_session=blank_session,
        trailers=trailers,
        obs_text=obs_text,
        control_session=sid_form == "bad",
        description=("initialize " if initialize else "call ") + " ".join(parts),
    )


# ---- the pair, and running cases on it -------------------------------------------------------


@dataclass
class Pair:
    upstream: RawUpstream
    fast: Side
    reference: Side
    sent: Counter[str] = field(default_factory=Counter)
    skipped: Counter[int] = field(default_factory=Counter)
    found: list[str] = field(default_factory=list)

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.fast, self.reference

    def stop(self) -> None:
        for side in self.sides:
            side.sidecar.stop()
        self.upstream.stop()

    def tracebacks(self) -> list[str]:
        return [s.name for s in self.sides if "Traceback" in s.sidecar.output()]

    def untracked(self) -> list[bytes]:
        """Sessions the upstream issued and never saw a DELETE for, that no side holds live;
        but those issued in an answer refused as unusable (`RawUpstream.unknowable`)."""
        owed = self.upstream.issued - self.upstream.deleted - self.upstream.unknowable
        return sorted(sid for sid in owed if not any(side.holds(sid) for side in self.sides))


def start_pair(tmp_path: Path) -> Pair:
    upstream = RawUpstream()
    sides = []
    for name, on in (("fast", True), ("reference", False)):
        sidecar = start_sidecar(
            tmp_path / name,
            upstream.url,
            server={"fast_path": on, "max_body_bytes": MAX_BODY, "body_timeout": "2s"},
            upstream={"read_timeout": "2s"},
            log={"level": "info"},
        )
        sides.append(Side(name, sidecar, upstream))
    return Pair(upstream, sides[0], sides[1])


def run_request(pair: Pair, case: RequestCase) -> list[str]:
    results = []
    for side in pair.sides:
        ids = side.prepare(case.ref)
        pieces, expected = case.build(ids)
        answers = exchange(side.sidecar.listen_port, pieces, expected)
        if case.garbage_after:
            answers = _before_garbage(answers)
        results.append(outcome(side, ids, answers, side.upstream.take()))
    return differences(*results)


def _before_garbage(answers: list[Answer]) -> list[Answer]:
    """The answers to what came before bytes that are not HTTP. Whether aiohttp answers those
    bytes with a 400 depends on the reads they arrive in (it drops every request of a read
    that fails to parse), which the kernel decides, run by run, on either path; in a 10,000
    run about one case in 500 saw them in another read on one side than on the other."""
    while answers and answers[-1].status == 400 and b"Malformed HTTP" in answers[-1].body:
        answers = answers[:-1]
    return answers


def run_answer(pair: Pair, case: AnswerCase) -> list[str]:
    results = []
    for side in pair.sides:
        ids = side.prepare("live")
        headers = [*JSON_HEADERS, (b"Authorization", ALICE), (FUZZ_HEADER, b"1")]
        if case.initialize:
            first = _request(b"POST", headers, INITIALIZE)
        else:
            first = _request(
                b"POST",
                [*headers, (b"Mcp-Session-Id", ids["live"])],
                b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
            )
        side.upstream.script = case.script
        side.upstream.closed_after_answer.clear()
        follow = _request(
            b"POST",
            [*JSON_HEADERS, (b"Authorization", ALICE), (b"Mcp-Session-Id", ids["live"])],
            b'{"jsonrpc":"2.0","id":2,"method":"ping"}',
        )
        answers = exchange(side.sidecar.listen_port, [first], 1)
        if answers and answers[0].status == 502 and case.script.creates:
            side.upstream.unknowable.update(side.upstream.issued_by(case.script))
        if case.script.close:
            # The next request only once the upstream's FIN is out (see `_UpstreamConnection`).
            side.upstream.closed_after_answer.wait(READ_TIMEOUT)
        answers += exchange(side.sidecar.listen_port, [follow], 1)
        side.upstream.script = None
        results.append(outcome(side, ids, answers, side.upstream.take()))
    return differences(*results)


def run_cases(pair: Pair, count: int, which: str, *, keep_going: bool = False) -> None:
    """`count` derandomized cases of `which` ("requests" or "answers"), known classes skipped;
    the first difference raises unless `keep_going` (then they gather in `pair.found`)."""
    strategy: st.SearchStrategy[Any] = request_cases() if which == "requests" else answer_cases()
    run: Callable[[Pair, Any], list[str]] = run_request if which == "requests" else run_answer  # type: ignore[assignment]
    pair.sent.clear()

    @settings(
        max_examples=count,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],  # the sidecars' state moves on: a shrink would not replay
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def one(case: Any) -> None:
        entries = known(case)
        for entry in entries:
            pair.skipped[entry.finding] += 1
        assume(not entries)
        pair.sent[case.kind] += 1
        found = run(pair, case)
        if found:
            report = f"{case!r}\n" + "\n".join(found)
            pair.found.append(report)
            if not keep_going:
                raise AssertionError(report)

    one()
