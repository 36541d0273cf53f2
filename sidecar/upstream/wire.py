"""A lean upstream client for the fast path: raw keep-alive connections, llhttp's parser.

The fast path (`transports/fast.py`) sends a request it built as bytes and reads the answer
with `httptools`, without aiohttp's per-request client objects, timers and tracing, which
cost more CPU than the rest of a proxied request together. The rules are those of
`client.py`, so an answer or a failure looks the same to the client on either path:

* connections are kept per member and dropped after `POOL_IDLE_SECONDS` idle (below the
  servers' 5 s, so an upstream rarely closes one just as a request is written to it);
* a request is written only to a connection that is not closing and has nothing to read: one
  the upstream closed (or wrote more on) since its last answer, unread by the loop yet, is
  dropped and the request goes on a fresh one, as aiohttp refuses to write to a closing
  transport and retries; one that broke after the write is a failure (502), never retried:
  the upstream may have run the call;
* an answer is read as aiohttp's client reads it (`answers.py`): interim 1xx answers skipped,
  trailers not taken into the head, header values without trailing blanks, the same
  leniencies and limits; a connection goes back to the pool only after a complete final
  answer with no byte after it;
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
from . import answers
from .client import POOL_IDLE_SECONDS, Upstream
from .idle import IdleWatch

Sink = Callable[[bytes], None]

_MAX_FIELD = answers.MAX_FIELD
_MAX_HEADERS = answers.MAX_HEADERS
_BLANKS = answers.BLANKS


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


class AnswerRefused(Exception):
    """A head aiohttp's client would refuse (`answers.py`), raised from a parser callback:
    httptools turns it into its `HttpParserCallbackError`."""


class WireConnection(asyncio.Protocol):
    """One keep-alive connection to a member; at most one exchange at a time."""

    def __init__(self, pool: WirePool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._parser.set_dangerous_leniencies(**answers.LENIENCIES)
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._interim = False  # the message being parsed is an interim 1xx answer
        self._done: Answer | None = None  # complete in this read, not yet handed on
        self._leftover = False  # bytes came after the complete answer
        self._reuse = False  # the complete answer lets the connection be kept alive
        self._fresh: Answer | None = None  # its head came in the read being parsed
        self._idle = IdleWatch(None)

    # ---- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        # Asks the kernel, before a request is written, whether the upstream closed or wrote
        # since its last answer (`usable`); a poll of one socket costs ~0.5 µs.
        self._idle = IdleWatch(transport.get_extra_info("socket"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.transport = None
        answer = self.answer
        if exc is None and answer is not None and answer.headed and _ends_with_connection(answer):
            # Framed by the connection's end (RFC 9112 §6.3: neither a length nor chunked):
            # its end is the answer's, complete, as aiohttp's client reads it.
            self.answer = None
            answer._end(None)
            listener = answer.listener
            if listener is not None:
                answer.listener = None
                listener.answered(answer)
            return
        self._fail("the upstream closed the connection before its answer ended")

    def data_received(self, data: bytes) -> None:
        if self.answer is None:
            self.abandon()  # bytes nobody asked for: the connection cannot be trusted
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broke(exc)
            return
        self._fresh = None
        done = self._done
        if done is not None:
            # Handed on only now, the whole read parsed: a byte after the answer must keep
            # the connection from the pool before the listener lets the next request in.
            self._done = None
            self._finish(done)
            return
        answer = self.answer
        if answer is not None and answer.headed and answer.listener is not None:
            # The rest of the body comes in later reads: a task waits for it (with its timeout).
            answer.listener.head_only(answer)

    def _broke(self, exc: httptools.HttpParserError) -> None:
        """Bytes the parser refuses. aiohttp's client parses a whole read before it hands on
        the answer in it, and fails that answer when a later byte of the read breaks (502 on
        the full path), junk after a complete answer included; an answer whose head came in
        an earlier read was handed on, and breaks off. The same here: one answer both ways."""
        done, self._done = self._done, None
        if done is not None:
            self.answer = done
        fresh, self._fresh = self._fresh, None
        if fresh is not None and fresh is self.answer:
            fresh.headed = False  # no task has seen the head yet: it resumes on the error
        self._fail(f"malformed answer from the upstream ({exc})")
        self.abandon()

    # ---- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._done is not None:
            self._leftover = True  # a second message in the read that completed the answer

    def on_status(self, reason: bytes) -> None:
        answer = self.answer
        if answer is None:
            return  # bytes after a complete answer (`on_message_begin` noted them)
        answer.reason += reason
        if (why := answers.refused_reason(answer.reason)) is not None:
            raise AnswerRefused(why)

    def on_header(self, name: bytes, value: bytes) -> None:
        answer = self.answer
        if answer is None or answer.headed:
            return  # a trailer (never part of the head, as on the full path), or leftover
        # `answers.refused_field`'s checks, inlined (a call per header cost more than the rest
        # of the header's handling together); the count is checked once, at the head's end.
        if len(value) > _MAX_FIELD or len(name) > _MAX_FIELD or 0 in value:
            raise AnswerRefused(answers.refused_field(name, value, 0))
        if value and value[-1] in _BLANKS:
            value = answers.field_value(value)
        answer.headers.append((name, value))
        answer.names.append(name.lower())

    def on_headers_complete(self) -> None:
        answer = self.answer
        if answer is None:
            return
        status = self._parser.get_status_code()
        if answers.interim(status):
            # Not the answer (103 Early Hints, 100 Continue): the final one follows on this
            # connection; ending here gave its bytes to whichever request came next.
            self._interim = True
            answer.reason = b""
            answer.headers = []
            answer.names = []
            return
        if len(answer.headers) > _MAX_HEADERS:
            raise AnswerRefused(answers.refused_field(b"", b"", len(answer.headers)))
        answer.status = status
        answer.reason = answers.relayed_text(answer.reason)
        length = answer.header(b"content-length")
        answer.content_length = int(length) if length is not None and length.isdigit() else None
        encoding = answer.header(b"transfer-encoding")
        answer.chunked = encoding is not None and b"chunked" in encoding.lower()
        self._fresh = answer
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
        if self._interim:
            self._interim = False
            return
        answer, self.answer = self.answer, None
        if answer is None:
            return  # abandoned within this same read, or bytes after a complete answer
        self._done = answer
        self._reuse = self._parser.should_keep_alive()

    def _finish(self, answer: Answer) -> None:
        """The complete answer handed on: the connection reused only if nothing followed it."""
        keep = self._reuse and not self._leftover and not self.closed
        self._leftover = False
        answer._end(None)
        if keep:
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
        if self.closed or transport is None or transport.is_closing():
            return False
        # Readable while idle: the upstream closed it (or wrote bytes nobody asked for) and
        # the loop has not read that yet, e.g. a FIN right behind the answer, whose callback
        # lets the next request in before the FIN is read. A request written there never
        # reaches the upstream; a fresh connection takes it.
        return not self._idle.spoke()

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


def _ends_with_connection(answer: Answer) -> bool:
    """An answer whose body runs to the connection's end: no length, not chunked, and a
    status that has a body (1xx, 204 and 304 have none)."""
    status = answer.status
    return (
        answer.content_length is None
        and not answer.chunked
        and status >= 200
        and status not in (204, 304)
    )


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
            conn.abandon()
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
