"""The fast lane of one client connection: which requests skip aiohttp's server machinery.

Every byte a client sends passes through one `httptools` (llhttp) request parser here. While
aiohttp's handler is idle and no request of this connection is being served, the bytes of a
new request are kept, not handed on. When the request is complete and `FastPath.plan` takes
it (a POST of a session held live here, nothing unusual about it), it is served by
`FastPath.serve` without aiohttp's Request/Response objects, router and middlewares.

Everything else is handed to aiohttp exactly as it came, all kept bytes first, in order and
in the reads they came in (aiohttp answers a request whose head came before garbage, but not
one in the same read as the garbage): another method or path, anything `plan` refuses, a
second request in the same buffer (pipelining), a head aiohttp's parser refuses
(`request_head`), a head longer than `MAX_HEAD` or with more than `MAX_HEADERS` headers (as
soon as it is: aiohttp's limits answer it, and the lane keeps no more than one head's worth),
a head or body that does not complete within `HANDOVER_WAIT` (aiohttp's own timeouts answer a
slow client), bytes the parser refuses (aiohttp answers malformed HTTP). A header's value is
kept without the blanks around it, as aiohttp keeps it: what is forwarded, and the identity
it makes, is the same on both paths.
Once a request went to aiohttp, the rest of it does too: the lane takes requests again only
at a message boundary with aiohttp's handler idle. A parser error makes the connection
aiohttp's for the rest of its life: the boundaries are no longer known.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import httptools

from ..request_head import field_value, refused
from . import fast_init

if TYPE_CHECKING:
    from .fast import FastPath

# How long a partly received request is kept before aiohttp gets it (and its timeouts).
HANDOVER_WAIT = 1.0
# aiohttp refuses a head line over 8190 bytes and more than 128 headers (400); the lane takes
# only heads well inside both, so it never serves what aiohttp would have refused, and hands
# on a head as soon as it is past either (nothing more of it is kept).
MAX_HEAD = 8000
MAX_HEADERS = 100
# Bytes llhttp's lenient defaults might take where aiohttp's strict parser answers 400:
# control characters, obs-fold (a line starting with white space), a bare LF (see `_odd`).
# The bytes a head may hold anywhere (HTAB, visible ASCII, obs-text); CR and LF only as pairs.
_PLAIN = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])


def _odd(head: bytes) -> bool:
    """Whether the head has any of those: byte scans in C, not a regex with alternatives tried
    at every byte (which cost as much as the rest of the head checks together). Deleting the
    plain bytes leaves the CRs, LFs and control characters; with nothing but real CRLF pairs
    among them, that is twice as many bytes as there are pairs (a bare CR is refused too)."""
    return (
        len(head.translate(None, _PLAIN)) != 2 * head.count(b"\r\n")
        or b"\n " in head
        or b"\n\t" in head
    )


def _lead(kept: bytes) -> int:
    """Where the request line starts: after the CRLFs before it (usually none)."""
    if kept[:1] != b"\r":
        return 0
    at = 0
    while kept.startswith(b"\r\n", at):
        at += 2
    return at


class Serving(Protocol):
    """The request being served: a task, or an exchange driven by the upstream's callbacks."""

    def cancel(self) -> Any: ...


class Connection(Protocol):
    """What the lane needs of its client connection (`connections.ClientConnection`)."""

    transport: asyncio.Transport | None

    def idle(self) -> bool: ...

    def hand_over(self, data: bytes) -> None: ...

    def fast_begins(self) -> None: ...

    def fast_ended(self) -> None: ...


class Lane:
    """The per-connection interception; one parser sees every byte, in order."""

    def __init__(self, conn: Connection, fast: FastPath, peer: str | None, scheme: str) -> None:
        self._conn = conn
        self._fast = fast
        self.peer = peer
        self.scheme = scheme
        self.peer_bytes = (peer or "unknown").encode()  # as X-Forwarded-For gets it
        self.scheme_bytes = scheme.encode()
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._slow = False  # the current request is aiohttp's
        self._kept: list[bytes] = []  # the reads of a request not yet decided, as they came
        self._size = 0  # their bytes
        self._headed = False  # the kept request's head is complete
        self._begun = 0  # messages begun in the kept bytes
        self._complete = False
        self._refused = False  # the head was seen and the fast path will not take it
        self._timer: asyncio.TimerHandle | None = None
        self.serving: Serving | None = None
        self._pending: list[bytes] = []  # bytes that came while a fast request was served
        self.on_resume: Callable[[], None] | None = None
        self.on_pause: Callable[[], None] | None = None
        self._held: list[bytes] | None = None
        self._reset_message()

    @property
    def buffered(self) -> int:
        """The bytes kept for a request not yet decided."""
        return self._size

    # ---- bytes in ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.serving is not None:
            self._pending.append(data)  # served in order once the answer is written
            return
        if self._parser is None:
            self._conn.hand_over(data)
            return
        if self._slow and self._at_boundary() and self._conn.idle():
            self._slow = False
            self._begun = 0
            self._refused = False
        if self._slow:
            self._conn.hand_over(data)
            self._track(data)
            return
        self._kept.append(data)
        self._size += len(data)
        self._track(data)
        if (
            self._parser is None
            or self._refused
            or self._begun > 1
            or (self._size > MAX_HEAD and not self._headed)
        ):
            self._give_up()
        elif self._complete:
            self._take()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(HANDOVER_WAIT, self._give_up)

    def _at_boundary(self) -> bool:
        return self._begun == 0 or self._complete

    def _track(self, data: bytes) -> None:
        parser = self._parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._parser = None

    def _give_up(self) -> None:
        """Hand everything kept to aiohttp; the rest of this request goes there too."""
        self._cancel_timer()
        kept, self._kept = self._kept, []
        self._size = 0
        self._slow = True
        self._refused = False
        for data in kept:  # read by read, as aiohttp would have had them
            self._conn.hand_over(data)

    def _take(self) -> None:
        self._cancel_timer()
        request = self._fast.plan(self)
        if request is None:
            self._take_initialize()
            return
        self._begin()
        self._fast.start(request, self)  # sets `serving`; `finished` when it is done

    def _take_initialize(self) -> None:
        # A new session's `initialize` (no session id yet) has its own fast path.
        request = fast_init.plan(self._fast, self)
        if request is None:
            self._give_up()
            return
        self._begin()
        self.run(fast_init.serve(self._fast, request, self))

    def _begin(self) -> None:
        self._kept = []
        self._size = 0
        self._begun = 0
        self._complete = False
        self._conn.fast_begins()

    def run(self, serving: Coroutine[Any, Any, None]) -> None:
        """Serve (or go on serving) the request in a task."""
        self.serving = asyncio.get_running_loop().create_task(self._run(serving))

    async def _run(self, serving: Coroutine[Any, Any, None]) -> None:
        try:
            await serving
        finally:
            self.finished()

    def finished(self) -> None:
        """The request's answer is written: the connection is aiohttp's or the lane's again."""
        self.serving = None
        self._conn.fast_ended()
        pending, self._pending = self._pending, []
        for data in pending:
            self.feed(data)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def lost(self) -> None:
        """The client went away: a request being served is cancelled, like aiohttp's handler
        (`handler_cancellation`), also mid-stream: its call is no longer in flight and its
        upstream connection is dropped at once, not at the upstream's next event."""
        self._cancel_timer()
        if self.serving is not None:
            self.serving.cancel()

    # ---- bytes out --------------------------------------------------------------------------
    def write(self, data: bytes) -> bool:
        """Write to the client (or to the held bytes); False once the client is gone."""
        if self._held is not None:
            self._held.append(data)
            return True
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    def hold(self) -> None:
        """Collect writes until `flush`: several small pieces leave as one segment."""
        self._held = []

    def flush(self) -> bool:
        held, self._held = self._held, None
        return self.write(b"".join(held)) if held else True

    def close(self) -> None:
        transport = self._conn.transport
        if transport is not None:
            transport.close()

    # ---- llhttp callbacks -------------------------------------------------------------------
    def _reset_message(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.names: list[bytes] = []  # the headers' names in lower case, in order
        self.index: dict[bytes, list[bytes]] = {}  # lower-case name: its values, in order
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self._begun += 1
        self._complete = False
        self._headed = False
        if not self._slow:
            self._reset_message()

    def on_url(self, url: bytes) -> None:
        if not self._slow:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._slow or self._refused:
            return
        if len(self.headers) >= MAX_HEADERS:
            # Refused: the rest of this head is aiohttp's, and not collected here.
            self._refused = True
            return
        value = field_value(value)
        # One lower-casing per header: every later look-up is a dict hit.
        low = name.lower()
        values = self.index.get(low)
        if values is None:
            self.index[low] = [value]
        else:
            values.append(value)
            # Sent again: under its first spelling, as the full path forwards it
            # (`request_head.spelled`).
            name = self.headers[self.names.index(low)][0]
        self.headers.append((name, value))
        self.names.append(low)

    def on_headers_complete(self) -> None:
        self._headed = True
        if self._slow or self._refused:
            return
        parser = self._parser
        assert parser is not None
        kept = self._kept[0] if len(self._kept) == 1 else b"".join(self._kept)
        # Empty lines before the request line are skipped (by llhttp and aiohttp alike); the
        # head's end is the first empty line after them, its length counted from the start.
        end = kept.find(b"\r\n\r\n", _lead(kept))
        head = kept[: end + 4]
        if (
            end < 0
            or end > MAX_HEAD
            or parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or self.url != self._fast.target
            or _odd(head)
            or refused(self.names, self.index)
            or not self._fast.head_ok(self.index)
        ):
            self._refused = True

    def on_body(self, body: bytes) -> None:
        if not self._slow:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True
        if self._slow:
            self._begun = 0

    # ---- back-pressure from the client -------------------------------------------------------
    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        if self.on_resume is not None:
            with contextlib.suppress(Exception):
                self.on_resume()
