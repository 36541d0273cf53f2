"""HTTP mechanics of relaying one exchange: header rules and body streaming.

Nothing here knows about sessions' rules; `proxy.py` decides, this module moves bytes.
Header rules (SPEC 2.1): hop-by-hop headers (RFC 9110 §7.6.1, plus any named in
`Connection`) are dropped both ways; `Host` becomes the upstream's authority because the SDK
servers' DNS-rebinding guard answers 421 to any other, with the client's own in
`X-Forwarded-Host`; `X-Forwarded-For` / `X-Forwarded-Proto` are appended to.
Everything else, `Accept`, `Content-Type`, `MCP-Protocol-Version`, `Origin`, `Last-Event-ID`
and unknown headers included, passes exactly as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import UpstreamUnreachableError
from .request_head import field_text, spelled
from .sse import Event, EventSplitter
from .upstream.answers import UNRELAYABLE, unrelayable_values
from .upstream.client import SESSION_HEADER

log = logging.getLogger("sidecar.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Headers aiohttp computes itself for the message it writes.
RECOMPUTED = frozenset({"content-length", "host"})

# Sees each complete SSE event and returns the bytes to send on (usually `event.raw`).
EventHook = Callable[[Event], Awaitable[bytes]]


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    return {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }


_DROPPED = HOP_BY_HOP | RECOMPUTED


def _end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    # On every request and answer: the `Connection` tokens are parsed only when present.
    drop = _DROPPED | _connection_tokens(headers) if "Connection" in headers else _DROPPED
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])


def upstream_request_headers(request: web.Request, authority: str) -> CIMultiDict[str]:
    headers = _end_to_end(as_sent(request.raw_headers))
    headers["Host"] = authority
    if request.host:
        headers["X-Forwarded-Host"] = request.host
    _append(headers, "X-Forwarded-For", request.remote or "unknown")
    _append(headers, "X-Forwarded-Proto", request.scheme)
    return headers


def as_sent(raw: tuple[tuple[bytes, bytes], ...]) -> CIMultiDict[str]:
    """A request's headers as the client spelled them, each value as aiohttp reads it (UTF-8
    with surrogate escapes, no blanks around it). `request.headers` would respell the names
    aiohttp knows (`CONTENT-TYPE` becomes `Content-Type`), which the fast path does not. A name
    sent again in another spelling keeps its first one (`request_head.spelled`): aiohttp's
    client merges headers by exact spelling, and would drop the earlier ones."""
    return _decoded(spelled(raw))


def _decoded(raw: Iterable[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    return CIMultiDict(
        (
            name.decode("utf-8", "surrogateescape"),
            field_text(value.decode("utf-8", "surrogateescape")),
        )
        for name, value in raw
    )


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    existing = ", ".join(headers.getall(name, []))
    headers[name] = f"{existing}, {value}" if existing else value


def client_response_headers(
    upstream: aiohttp.ClientResponse, session_id: str | None = None
) -> CIMultiDict[str]:
    """The answer's headers for the client; an upstream session id becomes the client's own
    (behind a resumed session the two differ, SPEC 2.7)."""
    # As the upstream spelled them: `upstream.headers` respells the names aiohttp knows.
    headers = _end_to_end(_decoded(upstream.raw_headers))
    if session_id is not None and SESSION_HEADER in headers:
        headers[SESSION_HEADER] = session_id
    if unrelayable_values(headers.values()):
        raise UpstreamUnreachableError(UNRELAYABLE)
    return headers


def is_event_stream(upstream: aiohttp.ClientResponse) -> bool:
    content_type = upstream.headers.get("Content-Type", "")
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def is_identity_encoded(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.headers.get("Content-Encoding", "identity").lower() == "identity"


class StreamRelay:
    """Handle on one relayed stream so closing its session can cut it on both sides."""

    __slots__ = ("aborted", "client_gone", "long_lived", "upstream")

    def __init__(self, upstream: aiohttp.ClientResponse, long_lived: bool = False) -> None:
        self.upstream = upstream
        self.long_lived = long_lived  # a GET stream, not the answer to a call
        self.aborted = False
        self.client_gone = False  # set when the client went away mid-stream

    def abort(self) -> None:
        # Closing the upstream response drops its connection, so the server sees the
        # stream end and frees what it holds; the relay loop then ends the client's side.
        self.aborted = True
        self.upstream.close()


async def relay_buffered(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    body: bytes,
    session_id: str | None = None,
) -> web.Response:
    """Relay a response whose body was already read (JSON-RPC answers, errors)."""
    response = web.Response(
        status=upstream.status,
        reason=upstream.reason,
        body=body,
        headers=client_response_headers(upstream, session_id),
    )
    await response.prepare(request)
    return response


async def relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    relay: StreamRelay,
    on_event: EventHook | None,
    *,
    on_prepared: Callable[[], None] | None = None,
    session_id: str | None = None,
) -> web.StreamResponse:
    """Relay a streaming response; SSE event by event so each reaches the client whole.

    Returns when the upstream ends, the relay is aborted, or the client goes away; the
    client's side is always ended cleanly so an SDK client sees its stream finish.
    """
    headers = client_response_headers(upstream, session_id)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    inspect = is_event_stream(upstream) and is_identity_encoded(upstream)
    if inspect:
        response.headers["X-Accel-Buffering"] = "no"  # for any buffering proxy in front
    await response.prepare(request)
    if on_prepared is not None:
        on_prepared()
    return await pump_into(response, upstream, relay, on_event if inspect else None, inspect)


async def pump_into(
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    relay: StreamRelay,
    on_event: EventHook | None,
    inspect: bool = True,
) -> web.StreamResponse:
    """Copy an upstream stream into a client response already prepared (a relayed stream, or
    a held one joined to the upstream once its session resumed), and end it cleanly."""
    client_gone = False
    try:
        await _pump(upstream, response, on_event, inspect)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        client_gone = relay.client_gone = True
    except asyncio.CancelledError:
        relay.client_gone = True  # aiohttp cancels the handler when the client disconnects
        raise
    except (TimeoutError, aiohttp.ClientError) as exc:
        if not relay.aborted:
            log.debug("upstream stream ended abnormally: %r", exc)
    finally:
        upstream.close()
    if not client_gone:
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await response.write_eof()
    return response


async def _pump(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    on_event: EventHook | None,
    by_event: bool,
) -> None:
    """Copy the body: raw chunks, or (SSE) whole events, each shown to `on_event` first."""
    if not by_event:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        return
    splitter = EventSplitter()
    async for chunk in upstream.content.iter_any():
        for event in splitter.feed(chunk):
            data = event.raw
            if on_event is not None and event.inspectable:
                data = await on_event(event)
            await response.write(data)
    if tail := splitter.flush():
        await response.write(tail)
