"""A lean upstream client for the fast path: raw keep-alive connections, llhttp's parser.

The fast path (`transports/fast.py`) sends a request it built as bytes and reads the answer
with `httptools`, without aiohttp's per-request client objects, timers and tracing, which
cost more CPU than the rest of a proxied request together. The rules are those of
`client.py`, so an answer or a failure looks the same to the client on either path:

* connections are kept per member and dropped after `POOL_IDLE_SECONDS` idle (below the
  servers' 5 s, so an upstream rarely closes one just as a request is written to it);
* a request is written only to a connection that is not closing; one that broke after the
  write is a failure (502), never retried: the upstream may have run the call;
* connect failures are `UpstreamRefusedError` (refused: the member is down) or
  `UpstreamUnreachableError`; no answer head within `read_timeout` is `UpstreamTimeoutError`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from ..errors import (
    UpstreamError,
    UpstreamRefusedError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from .client import POOL_IDLE_SECONDS, Upstream

Sink = Callable[[bytes], None]


class Listener(Protocol):
    """Who is told of an exchange's progress from the connection's callbacks, without a task
    (`transports/fast.py`'s `Exchange`); at most one of these is called, once."""

    def answered(self, answer: Answer) -> None: ...  # the whole answer came

    def head_only(self, answer: Answer) -> None: ...  # a read ended between head and end

    def broke(self, answer: Answer) -> None: ...  # the exchange failed (see `error`)


class Answer:
    """One exchange on a wire connection: its head once it came, its body as it comes.

    Body bytes are kept (`chunks`) until a `sink` is set; from then on each goes to the sink.
    `headed` is set when the head came, `finished` when the answer is complete or broke off
    (`error` says which). A task waits with `wait_head` / `wait_ended`; their futures are made
    only then, so an answer served from callbacks (`listener`) allocates none.
    """

    __slots__ = (
        "_ended",
        "_head",
        "chunked",
        "chunks",
        "conn",
        "content_length",
        "error",
        "finished",
        "headed",
        "headers",
        "listener",
        "names",
        "reason",
        "sink",
        "status",
    )

    def __init__(self, conn: WireConnection) -> None:
        self.conn = conn
        self._head: asyncio.Future[None] | None = None
        self._ended: asyncio.Future[None] | None = None
        self.headed = False
        self.finished = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.names: list[bytes] = []  # the headers' names in lower case
        self.chunks: list[bytes] = []
        self.sink: Sink | None = None
        self.error: UpstreamError | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.listener: Listener | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (`name` in lower case)."""
        names = self.names
        # A scan before `index`: a missing header (`Transfer-Encoding`, mostly) raising and
        # catching ValueError cost more than the scan.
        return self.headers[names.index(name)][1] if name in names else None

    async def wait_head(self) -> None:
        """Until the head came; the exchange's error if it failed before."""
        if not self.headed and not self.finished:
            self._head = asyncio.get_running_loop().create_future()
            await self._head
        if not self.headed:
            assert self.error is not None
            raise self.error

    async def wait_ended(self) -> None:
        """Until the answer is complete or broke off (`error`)."""
        if not self.finished:
            self._ended = asyncio.get_running_loop().create_future()
            await self._ended

    def _got_head(self) -> None:
        self.headed = True
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def _end(self, error: UpstreamError | None) -> None:
        self.finished = True
        self.error = error
        for waiter in (self._head, self._ended):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """Drop the connection: the upstream sees the exchange end (an aborted stream)."""
        self.conn.abandon()

    def pause(self) -> None:
        self.conn.pause()

    def resume(self) -> None:
        self.conn.resume()


class WireConnection(asyncio.Protocol):
    """One keep-alive connection to a member; at most one exchange at a time."""

    def __init__(self, pool: WirePool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False

    # ---- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.transport = None
        self._fail("the upstream closed the connection before its answer ended")

    def data_received(self, data: bytes) -> None:
        if self.answer is None:
            self.abandon()  # bytes nobody asked for: the connection cannot be trusted
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed answer from the upstream ({exc})")
            self.abandon()
            return
        answer = self.answer
        if answer is not None and answer.headed and answer.listener is not None:
            # The rest of the body comes in later reads: a task waits for it (with its timeout).
            answer.listener.head_only(answer)

    # ---- httptools callbacks ----------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        assert self.answer is not None
        self.answer.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        answer = self.answer
        assert answer is not None
        answer.headers.append((name, value))
        answer.names.append(name.lower())

    def on_headers_complete(self) -> None:
        answer = self.answer
        assert answer is not None
        answer.status = self._parser.get_status_code()
        length = answer.header(b"content-length")
        answer.content_length = int(length) if length is not None and length.isdigit() else None
        encoding = answer.header(b"transfer-encoding")
        answer.chunked = encoding is not None and b"chunked" in encoding.lower()
        answer._got_head()

    def on_body(self, body: bytes) -> None:
        answer = self.answer
        if answer is None:
            return  # abandoned by its sink (the client left) within this same read
        if answer.sink is not None:
            answer.sink(body)
        else:
            answer.chunks.append(body)

    def on_message_complete(self) -> None:
        answer, self.answer = self.answer, None
        if answer is None:
            return  # abandoned within this same read: the connection is closed already
        keep = self._parser.should_keep_alive()
        answer._end(None)
        if keep and not self.closed:
            self._pool.release(self)
        else:
            self.abandon()
        # Told last: the connection is back in the pool for the request its answer lets in.
        listener = answer.listener
        if listener is not None:
            answer.listener = None
            listener.answered(answer)

    # ---- use --------------------------------------------------------------------------------
    def send(self, data: bytes) -> Answer:
        assert self.transport is not None
        answer = self.answer = Answer(self)
        self.transport.write(data)
        return answer

    def usable(self) -> bool:
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def abandon(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._fail("the upstream connection was closed before its answer ended")

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _fail(self, why: str) -> None:
        answer, self.answer = self.answer, None
        if answer is None:
            return
        if answer.finished:
            return
        answer._end(UpstreamUnreachableError(why))
        listener = answer.listener
        if listener is not None:
            answer.listener = None
            listener.broke(answer)


class WirePool:
    """Idle keep-alive connections of one member, newest first."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        url = upstream.url
        self.host = url.host or "127.0.0.1"
        self.port = url.port or 80
        self._idle: list[WireConnection] = []
        self._reaper: asyncio.TimerHandle | None = None

    async def exchange(self, request: bytes) -> Answer:
        """Write a request on a usable connection; returns once the answer's head came."""
        upstream = self.upstream
        conn = self.take()
        if conn is None:
            conn = await self._connect()
        answer = conn.send(request)
        try:
            async with asyncio.timeout(upstream.read_timeout):
                await answer.wait_head()
        except TimeoutError as exc:
            conn.abandon()
            raise too_late(upstream) from exc
        except BaseException:
            conn.abandon()
            raise
        return answer

    def take(self) -> WireConnection | None:
        """An idle connection that can take a request now, if there is one."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
        return None

    async def _connect(self) -> WireConnection:
        upstream = self.upstream
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(upstream.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: WireConnection(self), self.host, self.port
                )
        except TimeoutError as exc:
            raise UpstreamUnreachableError(self._cannot_reach(exc)) from exc
        except OSError as exc:
            raise UpstreamRefusedError(self._cannot_reach(exc)) from exc
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _cannot_reach(self, exc: BaseException) -> str:
        return (
            f"cannot reach the upstream MCP server at {self.upstream.url.origin()} ({exc}); "
            "check that it is running and that upstream.url is right"
        )

    def release(self, conn: WireConnection) -> None:
        if conn._paused:
            conn.resume()
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._reaper is None:
            self._reaper = loop.call_later(POOL_IDLE_SECONDS, self._reap)

    def _reap(self) -> None:
        """Close connections idle for `POOL_IDLE_SECONDS`; one timer per pool, not per use."""
        self._reaper = None
        now = asyncio.get_running_loop().time()
        keep = []
        for conn in self._idle:
            if now - conn.idle_since >= POOL_IDLE_SECONDS:
                conn.abandon()
            elif conn.usable():
                keep.append(conn)
        self._idle = keep
        if keep:
            wait = POOL_IDLE_SECONDS - (now - min(c.idle_since for c in keep))
            self._reaper = asyncio.get_running_loop().call_later(max(wait, 0.01), self._reap)

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abandon()


def too_late(upstream: Upstream) -> UpstreamTimeoutError:
    """No answer head within `read_timeout` (the same words as `client.py`)."""
    return UpstreamTimeoutError(
        f"{upstream.url.origin()}{upstream.url.path} did not answer within "
        f"{upstream.read_timeout:g}s (upstream.read_timeout)"
    )
