"""The legacy HTTP+SSE transport (MCP 2024-11-05) under the same lifecycle (SPEC 2.2).

A legacy session *is* its SSE stream: the upstream names the session in the stream's first
`endpoint` event (a message URL with `sessionId` or `session_id` in the query), answers the
client's POSTs on that stream, and frees the session when the stream closes. So:

* the sidecar creates the session when it sees the `endpoint` event (committed before the
  event is relayed), and rewrites the URL to a relative one on the sidecar, so the client
  posts through us. SDK clients resolve it against the SSE URL they connected to, and the
  Python SDK insists on the same origin, which a relative URL always is;
* POSTs on the message path get Streamable HTTP's rules: 404 for expired, closed and unknown
  ids (answered here: some servers never answer an unknown id), binding, activity;
* a call is in flight from its POST until its answer appears on the stream;
* closing the session aborts the stream on both sides, which is what frees it upstream;
* if the client or the upstream ends the stream, the session is over and is closed here too.
  On shutdown the stream ends but the session stays recorded, and the next start closes it
  with reason `restart` (its stream cannot be recovered).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web

from .. import jsonrpc
from ..activity import classify
from ..admission import LimitReachedError
from ..clients import initialize_client
from ..errors import StoreError, UpstreamError
from ..forwarding import StreamRelay, is_event_stream, relay_stream
from ..gate import SESSION_PARAMS
from ..intake import RequestTimer, credentials, request_identity
from ..manager import Outcome
from ..sessions import CloseReason, Session, Transport, short, valid_session_id
from ..sse import Event
from ..upstream import SESSION_HEADER
from .forwarder import Forwarder, ping_watcher
from .rejections import NO_LOOKUP, bad_session_id, limit_rejection, not_found, store_rejection
from .streamable import StreamableHttp

log = logging.getLogger("sidecar.legacy")


def session_id_in(query: str) -> str | None:
    """The session id in a message URL's query, whichever spelling the server uses."""
    params = parse_qs(query, keep_blank_values=True)
    for name in SESSION_PARAMS:
        if params.get(name):
            # The gate has refused requests naming more than one session, so this is the only.
            return params[name][-1]
    return None


def relative_endpoint(data: str, prefix: str) -> tuple[str, str] | None:
    """(session id, URL for the client) from an `endpoint` event's data, or None."""
    url = urlsplit(data.strip())
    session_id = session_id_in(url.query)
    if session_id is None or not url.path:
        return None
    path = url.path if url.path.startswith("/") else "/" + url.path
    return session_id, f"{prefix.rstrip('/')}{path}?{url.query}"


class LegacySse:
    """The legacy SSE stream and message endpoints, on the forwarder both transports share.

    A request on these paths that names a Streamable HTTP session (an `Mcp-Session-Id`
    header) is handed to that transport: its session's rules apply wherever it is sent.
    """

    def __init__(self, forwarder: Forwarder, streamable: StreamableHttp) -> None:
        self.fw = forwarder
        self.manager = forwarder.manager
        self.streamable = streamable

    async def handle_sse(self, request: web.Request) -> web.StreamResponse:
        return await self.fw.handle(request, self.open_stream)

    async def handle_message(self, request: web.Request) -> web.StreamResponse:
        return await self.fw.handle(request, self.post)

    # ---- the stream ------------------------------------------------------------------------
    async def open_stream(
        self, request: web.Request, body: bytes, timer: RequestTimer
    ) -> web.StreamResponse:
        # A request naming a session gets that session's rules here too (no side doors).
        if SESSION_HEADER in request.headers:
            return await self.streamable.dispatch(request, body, timer)
        if session_id_in(request.query_string) is not None:
            return await self.post(request, body, timer)
        upstream = await self.fw.forward(request, body or None, timer)
        if request.method != "GET" or upstream.status != 200 or not is_event_stream(upstream):
            return await self.fw.relay(request, upstream, None, timer)
        identity = request_identity(request)
        try:
            await self.manager.admit(identity)
        except LimitReachedError as exc:
            upstream.close()  # dropping the stream frees the session the upstream just made
            raise limit_rejection(exc) from exc
        stream = _LegacyStream(self, request, upstream, identity)
        try:
            return await relay_stream(
                request, upstream, stream.relay, stream.on_event, on_prepared=timer.upstream_begins
            )
        finally:
            timer.upstream_answered()  # the stream's lifetime is not the sidecar's overhead
            # Also when the client went away and aiohttp cancelled this handler.
            stream.release()
            await stream.finish()

    # ---- messages --------------------------------------------------------------------------
    async def post(
        self, request: web.Request, body: bytes, timer: RequestTimer
    ) -> web.StreamResponse:
        batch = jsonrpc.parse(body) if body else jsonrpc.INVALID
        session_id = session_id_in(request.query_string)
        if session_id is None and SESSION_HEADER in request.headers:
            # A Streamable HTTP id: its rules.
            return await self.streamable.dispatch(request, body, timer)
        if session_id is None:
            upstream = await self.fw.forward(request, body or None, timer)
            return await self.fw.relay(request, upstream, None, timer)
        if not valid_session_id(session_id):
            raise bad_session_id("session id in the message URL", batch.first_id)
        try:
            resolution = await self.manager.resolve(session_id, request_identity(request))
        except StoreError as exc:
            raise store_rejection(batch.first_id, NO_LOOKUP) from exc
        session = resolution.session
        if session is None or session.transport is not Transport.SSE:
            reason = resolution.outcome.value if session is None else Outcome.UNKNOWN.value
            raise not_found(reason, batch.first_id)
        return await self._forward_message(request, body, batch, session, timer)

    async def _forward_message(
        self,
        request: web.Request,
        body: bytes,
        batch: jsonrpc.Batch,
        session: Session,
        timer: RequestTimer,
    ) -> web.StreamResponse:
        manager = self.manager
        manager.note_credentials(session, credentials(request))
        initialize = batch.find("initialize")
        if initialize is not None:
            manager.note_client_info(session, *initialize_client(initialize.params))
        use = classify(batch, manager.policy, session.server_pings)
        calls = list(use.calls)
        # Started before forwarding: a server may answer on the stream before its 202.
        manager.begin_legacy_calls(session, calls)
        try:
            upstream = await self.fw.forward(request, body, timer, session)
        except UpstreamError:
            manager.end_legacy_calls(session, calls)
            raise
        if not 200 <= upstream.status < 300:
            manager.end_legacy_calls(session, calls)  # refused: no answer will come
        manager.note_use(session, use)
        manager.count_request(session)
        return await self.fw.relay(request, upstream, session, timer, request_body=body)


class _LegacyStream:
    """One relayed legacy SSE stream and the session it carries."""

    def __init__(
        self, proxy: LegacySse, request: web.Request, upstream: aiohttp.ClientResponse, who: str
    ) -> None:
        self.proxy = proxy
        self.request = request
        self.identity = who
        self.relay = StreamRelay(upstream, long_lived=True)
        self.session: Session | None = None
        self._admitted = True
        self._watch: Callable[[Event], None] | None = None

    def release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.proxy.manager.release(self.identity)

    async def on_event(self, event: Event) -> bytes:
        if self.session is None and event.event == "endpoint":
            return await self._endpoint(event)
        session = self.session
        if session is not None and self._watch is not None:
            self._watch(event)
            self._calls_answered(session, event)
        return event.raw

    async def _endpoint(self, event: Event) -> bytes:
        prefix = self.request.headers.get("X-Forwarded-Prefix", "")
        parsed = relative_endpoint(event.data, prefix)
        if parsed is None or not valid_session_id(parsed[0]):
            log.warning("legacy endpoint event without a usable session id; not tracked")
            return event.raw
        session_id, client_url = parsed
        upstream_url = urlsplit(event.data.strip())
        expected = self.proxy.fw.options.messages_path
        if upstream_url.path.rstrip("/") != expected.rstrip("/"):
            # The client will post where the upstream said, a path the sidecar passes through
            # untracked: the session would look idle while in use and expire.
            log.warning(
                "the upstream announced message path %s but upstream.messages_path is %s; "
                "set upstream.messages_path to match",
                upstream_url.path,
                expected,
            )
        self.session = await self.proxy.manager.create(
            session_id,
            Transport.SSE,
            self.identity,
            protocol_version=None,
            user_agent=self.request.headers.get("User-Agent", "")[:200],
            upstream_endpoint=f"{upstream_url.path}?{upstream_url.query}",
        )
        self.release()
        self.session.relays.add(self.relay)
        self.session.open_streams += 1
        self._watch = ping_watcher(self.proxy.manager, self.session)
        return f"event: endpoint\ndata: {client_url}\n\n".encode()

    def _calls_answered(self, session: Session, event: Event) -> None:
        if not session.pending_calls:
            return
        batch = jsonrpc.parse(event.data.encode())
        answered = [m.id for m in batch.responses if m.id is not None]
        if self.proxy.manager.end_legacy_calls(session, answered):
            self.proxy.manager.touch(session)  # the end of a call is activity (SPEC 2.3)

    async def finish(self) -> None:
        """The stream is over: so is its session, unless the sidecar itself is stopping."""
        session = self.session
        if session is None:
            return
        session.relays.discard(self.relay)
        session.open_streams -= 1
        if not session.live or self.relay.aborted:
            return  # closed by us (expiry, admin), or shutdown: restored as `restart`
        reason = CloseReason.CLIENT_DELETE if self.relay.client_gone else CloseReason.UPSTREAM_GONE
        log.debug("legacy stream of %s ended; closing it (%s)", short(session.id), reason.value)
        await self.proxy.manager.close(session, reason, upstream_done=True)
