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
from multidict import CIMultiDict

from .errors import UpstreamUnreachableError
from .header_rules import Headers, end_to_end, forwarded, indexed
from .request_head import field_value, spelled
from .sse import Event, EventSplitter
from .upstream.answers import UNRELAYABLE, unrelayable_values

log = logging.getLogger("sidecar.proxy")

# Sees each complete SSE event and returns the bytes to send on (usually `event.raw`).
EventHook = Callable[[Event], Awaitable[bytes]]


def upstream_request_headers(
    request: web.Request, authority: str, session_id: str | None = None
) -> CIMultiDict[str]:
    """The client's headers as the upstream gets them, by `header_rules.forwarded` (the fast
    path's rules too), for aiohttp's client: `Host` the upstream's authority, `session_id`
    (the binding's) in place of the client's where the request names a session."""
    raw = _as_sent(request.raw_headers)
    names, index = indexed(raw)
    pairs = forwarded(
        raw,
        names,
        index,
        host=_raw(request.host),
        peer=_raw(request.remote or "unknown"),
        scheme=_raw(request.scheme),
        session=None if session_id is None else _raw(session_id),
    )
    headers = _decoded(pairs)
    headers["Host"] = authority
    return headers


def _as_sent(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    """A request's headers as the client spelled them, without the blanks around a value.
    `request.headers` would respell the names aiohttp knows (`CONTENT-TYPE` becomes
    `Content-Type`), which the fast path does not. A name sent again in another spelling
    keeps its first one (`request_head.spelled`): aiohttp's client merges headers by exact
    spelling, and would drop the earlier ones."""
    return [(name, field_value(value)) for name, value in spelled(raw)]


def _raw(text: str) -> bytes:
    """A value aiohttp decoded (UTF-8, surrogate escapes) as the bytes it came as."""
    return text.encode("utf-8", "surrogateescape")


def _decoded(pairs: Headers) -> CIMultiDict[str]:
    """Raw pairs as aiohttp reads them (UTF-8 with surrogate escapes), for its writers."""
    return CIMultiDict(
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in pairs
    )


def client_response_headers(
    upstream: aiohttp.ClientResponse, session_id: str | None = None
) -> CIMultiDict[str]:
    """The answer's headers for the client (`header_rules.end_to_end`); an upstream session id
    becomes the client's own (behind a resumed session the two differ, SPEC 2.7). As the
    upstream spelled them: `upstream.headers` respells the names aiohttp knows."""
    raw = [(name, field_value(value)) for name, value in upstream.raw_headers]
    headers = _decoded(end_to_end(raw, None if session_id is None else _raw(session_id)))
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
