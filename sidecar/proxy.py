"""The Streamable HTTP endpoint: every client request's path through the sidecar (SPEC 2.1).

request -> checks (origin, size, session id form) -> `SessionManager` decides (live, expired,
unknown, bound elsewhere) -> forward upstream -> relay the answer, watching it for what
changes the session (a new id, a 404, a server ping). Rejections are answered here, never
forwarded, and each one leaves a status, a JSON body, a metric and a (throttled) log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp import web

from . import jsonrpc
from .clients import initialize_client
from .errors import StoreError, UpstreamError, UpstreamTimeoutError
from .forwarding import (
    EventHook,
    StreamRelay,
    is_event_stream,
    relay_buffered,
    relay_stream,
    upstream_request_headers,
)
from .gate import Route, check_one_session, route_of
from .gone import GonePatterns
from .intake import (
    Rejected,
    RequestTimer,
    check_origin,
    credentials,
    read_body,
    request_identity,
    upstream_failure,
)
from .log import Throttled
from .manager import LimitReachedError, Outcome, SessionManager
from .metrics import Metrics
from .sessions import CloseReason, Session, Transport, short, valid_session_id
from .sse import Event
from .upstream import PROTOCOL_HEADER, SESSION_HEADER, Upstream

log = logging.getLogger("sidecar.proxy")

# The first protocol revision without sessions; its traffic is passed through untracked.
SESSIONLESS_SINCE = "2026-07-28"
LIMIT_RETRY_AFTER = "30"
STORE_RETRY_AFTER = "5"


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """The proxy's share of the config; replaced whole on reload."""

    allowed_origins: frozenset[str] = frozenset()
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0
    unknown: Literal["reject", "forward"] = "reject"
    messages_path: str = "/messages/"  # legacy transport, to check the endpoint event against
    mcp_path: str = "/mcp"  # the gate routes every spelling of these to their handler
    sse_path: str = "/sse"


Dispatch = Callable[[web.Request, bytes, RequestTimer], Awaitable[web.StreamResponse]]


class Proxy:
    def __init__(
        self,
        manager: SessionManager,
        upstream: Upstream,
        metrics: Metrics,
        options: ProxyOptions,
        gone: GonePatterns | None = None,
    ) -> None:
        self.manager = manager
        self.upstream = upstream
        self.metrics = metrics
        self.options = options
        self.gone = gone or GonePatterns()
        self._throttled = Throttled(log)
        # Adoptions are rare (a deploy in front of live sessions); one lock makes two
        # concurrent adoptions of one id create one session, counted once.
        self._adoption_lock = asyncio.Lock()

    # ---- entry points ----------------------------------------------------------------------
    async def handle_mcp(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._dispatch)

    async def _read_body(self, request: web.Request) -> bytes:
        options = self.options
        return await read_body(request, options.max_body_bytes, options.body_timeout)

    async def _handle(self, request: web.Request, dispatch: Dispatch) -> web.StreamResponse:
        """Checks, dispatch, and the one place rejections and upstream failures are answered."""
        timer = RequestTimer()
        body = b""
        try:
            check_one_session(request)
            check_origin(request, self.options.allowed_origins)
            if request.method == "POST":
                body = await read_body(
                    request, self.options.max_body_bytes, self.options.body_timeout
                )
            response = await dispatch(request, body, timer)
            outcome = "forwarded"
        except Rejected as rejection:
            response = await self._reject(request, rejection)
            outcome = "rejected"
        except UpstreamError as exc:
            response = await self._upstream_failed(request, body, exc)
            outcome = "upstream_error"
        self.metrics.requests.labels(request.method, outcome).inc()
        self.metrics.request_duration.observe(timer.own_time())
        return response

    async def handle_passthrough(self, request: web.Request) -> web.StreamResponse:
        """Paths other than the MCP endpoint (OAuth metadata, health pages) go through as-is.

        Unless the upstream could take the path for one of its endpoints, or the request
        names a session: then it gets that endpoint's (or the MCP endpoint's) rules.
        """
        options = self.options
        route = route_of(request.path, options.mcp_path, options.sse_path, options.messages_path)
        dispatch = self._dispatch_for(route, request)
        if dispatch is not None:
            return await self._handle(request, dispatch)
        timer = RequestTimer()
        try:
            check_one_session(request)
            check_origin(request, self.options.allowed_origins)
            body = await self._read_body(request) if request.can_read_body else None
            upstream = await self._forward(request, body, timer)
            await self._backstop(request, upstream)
            return await relay_stream(request, upstream, StreamRelay(upstream), None)
        except Rejected as rejection:
            return await self._reject(request, rejection)
        except UpstreamError as exc:
            return await self._upstream_failed(request, b"", exc)

    # ---- dispatch ------------------------------------------------------------------------
    def _dispatch_for(self, route: Route | None, request: web.Request) -> Dispatch | None:
        """The session-checking handler for a path the exact routes missed, if it needs one."""
        if route is Route.MCP or SESSION_HEADER in request.headers:
            return self._dispatch
        return None

    async def _dispatch(
        self, request: web.Request, body: bytes, timer: RequestTimer
    ) -> web.StreamResponse:
        session_id = request.headers.get(SESSION_HEADER)
        batch = jsonrpc.parse(body) if body else jsonrpc.INVALID
        if session_id is None:
            initialize = batch.find("initialize") if request.method == "POST" else None
            if initialize is not None:
                return await self._initialize(request, body, initialize, timer)
            return await self._sessionless(request, body, timer)
        if not valid_session_id(session_id):
            raise Rejected(
                400,
                "bad_session_id",
                jsonrpc.error_body(
                    jsonrpc.INVALID_REQUEST,
                    "Invalid Mcp-Session-Id header: expected 1-256 visible ASCII characters",
                    batch.first_id,
                ),
            )
        identity = request_identity(request)
        resolution = await self.manager.resolve(session_id, identity)
        session = resolution.session
        if session is None:
            if resolution.outcome is Outcome.UNKNOWN and self.options.unknown == "forward":
                return await self._adopt(request, body, session_id, identity, timer)
            raise Rejected(404, resolution.outcome.value, jsonrpc.session_not_found(batch.first_id))
        self._note_client_headers(request, session)
        if request.method == "DELETE":
            return await self._client_delete(request, session, timer)
        if request.method == "GET":
            return await self._open_stream(request, session, timer)
        return await self._post(request, body, batch, session, timer)

    async def _post(
        self,
        request: web.Request,
        body: bytes,
        batch: jsonrpc.Batch,
        session: Session,
        timer: RequestTimer,
    ) -> web.StreamResponse:
        policy = self.manager.policy
        shows_use = batch.valid and session.shows_use(batch, policy)
        is_call = shows_use and any(
            m.is_request and m.method not in policy.ignore_methods for m in batch.messages
        )
        if is_call:
            self.manager.begin_call(session)
        try:
            upstream = await self._forward(request, body, timer)
        except UpstreamError:
            if is_call:  # a failed forward changes nothing about the session (SPEC 2.5)
                self.manager.abandon_call(session)
            raise
        except BaseException:
            # The client went away (aiohttp cancels the handler) before the upstream's
            # headers came: the call counts until then, never longer (SPEC 2.5).
            if is_call:
                self.manager.end_call(session)
            raise
        try:
            if shows_use:
                self.manager.touch(session)
            self.manager.count_request(session)
            return await self._relay(request, upstream, session, timer, request_body=body)
        finally:
            if is_call:
                self.manager.end_call(session)

    async def _open_stream(
        self, request: web.Request, session: Session, timer: RequestTimer
    ) -> web.StreamResponse:
        """A GET stream: relayed, but never activity (unless open_stream_keeps_alive)."""
        upstream = await self._forward(request, None, timer)
        session.open_streams += 1
        try:
            return await self._relay(request, upstream, session, timer, long_lived=True)
        finally:
            session.open_streams -= 1
            if self.manager.policy.open_stream_keeps_alive and session.live:
                self.manager.touch(session)

    async def _client_delete(
        self, request: web.Request, session: Session, timer: RequestTimer
    ) -> web.StreamResponse:
        """Whatever the upstream says, the session is closed and the client gets a 2xx."""
        answered = False
        status = 200
        try:
            upstream = await self._forward(request, None, timer)
            async with upstream:
                await upstream.read()
            answered = self._closed_upstream_by(request, upstream.status)
            status = upstream.status if 200 <= upstream.status < 300 else 200
        except UpstreamError as exc:
            log.warning(
                "forwarding DELETE of session %s failed (%s); the sidecar will retry "
                "closing it upstream",
                session.short_id,
                exc,
            )
        await self.manager.close(session, CloseReason.CLIENT_DELETE, upstream_done=answered)
        return web.Response(status=status)

    async def _initialize(
        self, request: web.Request, body: bytes, initialize: jsonrpc.Message, timer: RequestTimer
    ) -> web.StreamResponse:
        identity = request_identity(request)
        try:
            await self.manager.admit(identity)
        except LimitReachedError as exc:
            raise limit_rejection(exc, initialize.id) from exc
        try:
            upstream = await self._forward(request, body, timer)
            session_id = upstream.headers.get(SESSION_HEADER)
            session = None
            # Only a successful answer creates a session: the Python SDK's 400 carries a
            # throw-away id that must not be tracked (SPEC 2.1).
            if session_id is not None and 200 <= upstream.status < 300:
                session = await self._track_or_undo(
                    request, upstream, session_id, identity, initialize
                )
            elif 200 <= upstream.status < 300:
                self.metrics.stateless_requests.inc()
        finally:
            self.manager.release(identity)
        return await self._relay(request, upstream, session, timer)

    async def _track_or_undo(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        session_id: str,
        identity: str,
        initialize: jsonrpc.Message,
    ) -> Session | None:
        """Track the new session, or, when the store cannot record it, close it upstream again
        at once and answer 503: the client never holds an id the sidecar could not commit."""
        try:
            return await self._track_new(request, session_id, identity, initialize)
        except StoreError as exc:
            self.manager.store_failed("insert", exc)
            upstream.release()
            log.warning(
                "cannot record session %s (store failed); closing it upstream", short(session_id)
            )
            await self._delete_orphan(request, session_id)
            raise store_rejection(initialize.id) from exc

    async def _track_new(
        self, request: web.Request, session_id: str, identity: str, initialize: jsonrpc.Message
    ) -> Session | None:
        if not valid_session_id(session_id):
            log.warning("upstream issued a malformed session id; passing it through untracked")
            return None
        client_info, version = initialize_client(initialize.params)
        return await self.manager.create(
            session_id,
            Transport.STREAMABLE_HTTP,
            identity,
            protocol_version=version,
            user_agent=request.headers.get("User-Agent", "")[:200],
            client_info=client_info,
            credentials=credentials(request),
        )

    async def _adopt(
        self, request: web.Request, body: bytes, session_id: str, identity: str, timer: RequestTimer
    ) -> web.StreamResponse:
        """`sessions.unknown = "forward"`: let the upstream judge an id we never saw."""
        upstream = await self._forward(request, body, timer)
        session = None
        # A DELETE ends a session, it never adopts one (its 2xx says the session is gone).
        if 200 <= upstream.status < 300 and request.method != "DELETE":
            session = await self._adopt_accepted(request, upstream, session_id, identity)
        return await self._relay(request, upstream, session, timer)

    async def _adopt_accepted(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        session_id: str,
        identity: str,
    ) -> Session:
        """Track an id the upstream accepted, within the limits like any new session."""
        async with self._adoption_lock:
            session = self.manager.live.get(session_id)
            if session is not None:
                return session
            try:
                await self.manager.admit(identity)
            except LimitReachedError as exc:
                upstream.release()
                raise limit_rejection(exc) from exc
            session = await self._create_admitted(request, session_id, identity)
        log.info("adopted session %s already live upstream", short(session_id))
        return session

    async def _create_admitted(
        self, request: web.Request, session_id: str, identity: str
    ) -> Session:
        """Create an admitted session known only from its id (adopted, or caught by the
        backstop); the admission is released whatever happens."""
        try:
            return await self.manager.create(
                session_id,
                Transport.STREAMABLE_HTTP,
                identity,
                protocol_version=request.headers.get(PROTOCOL_HEADER),
                user_agent=request.headers.get("User-Agent", "")[:200],
                credentials=credentials(request),
            )
        finally:
            self.manager.release(identity)

    async def _sessionless(
        self, request: web.Request, body: bytes, timer: RequestTimer
    ) -> web.StreamResponse:
        """No session id and no initialize: a stateless server's or a sessionless client's."""
        version = request.headers.get(PROTOCOL_HEADER, "")
        if version >= SESSIONLESS_SINCE or request.method == "POST":
            self.metrics.stateless_requests.inc()
        upstream = await self._forward(request, body or None, timer)
        session = await self._backstop(request, upstream)
        return await self._relay(request, upstream, session, timer)

    async def _backstop(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> Session | None:
        """An upstream session born of a request we did not read as `initialize` (SPEC 2.5).

        Whatever the parser thought, the upstream must hold no session the sidecar does not
        know: track it (limits apply), or close it upstream at once and refuse the client.
        """
        session_id = upstream.headers.get(SESSION_HEADER)
        if session_id is None or not 200 <= upstream.status < 300:
            return None
        if session_id in self.manager.live or not valid_session_id(session_id):
            return None
        identity = request_identity(request)
        try:
            await self.manager.admit(identity)
        except LimitReachedError as exc:
            upstream.release()
            await self._close_untracked(request, session_id)
            raise limit_rejection(exc) from exc
        try:
            session = await self._create_admitted(request, session_id, identity)
        except StoreError as exc:
            self.manager.store_failed("insert", exc)
            upstream.release()
            await self._close_untracked(request, session_id)
            raise store_rejection(None) from exc
        self.metrics.untracked_sessions.labels("tracked").inc()
        log.warning(
            "upstream created session %s for %s %s, not read as an initialize; tracking it",
            session.short_id,
            request.method,
            request.path,
        )
        return session

    async def _close_untracked(self, request: web.Request, session_id: str) -> None:
        """DELETE a session we cannot track, so it does not live upstream unseen."""
        self.metrics.untracked_sessions.labels("closed").inc()
        log.warning("upstream created session %s beyond the limits; closing it", short(session_id))
        await self._delete_orphan(request, session_id)

    async def _delete_orphan(self, request: web.Request, session_id: str) -> None:
        """Close upstream a session the client will never hear of (one attempt, logged)."""
        # Not the client's headers: its Content-Length and body belong to another request.
        headers = {"Host": self.upstream.authority, SESSION_HEADER: session_id}
        headers.update(credentials(request))
        try:
            answer = await self.upstream.request(
                "DELETE", self.upstream.target(self.options.mcp_path), headers, None
            )
            answer.release()
        except UpstreamError as exc:
            log.warning("closing untracked session %s failed: %s", short(session_id), exc)

    # ---- upstream exchange -----------------------------------------------------------------
    async def _forward(
        self, request: web.Request, body: bytes | None, timer: RequestTimer
    ) -> aiohttp.ClientResponse:
        headers = upstream_request_headers(request, self.upstream.authority)
        timer.upstream_begins()
        try:
            return await self.upstream.request(
                request.method, self.upstream.target(request.path_qs), headers, body
            )
        finally:
            timer.upstream_answered()

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        session: Session | None,
        timer: RequestTimer,
        *,
        long_lived: bool = False,
        request_body: bytes = b"",
    ) -> web.StreamResponse:
        if session is not None:
            self._note_accepted_version(request, upstream, session)
        if (
            session is not None
            and upstream.status == 404
            and session.live
            and self._answers_for_session(request, session)
        ):
            # The upstream lost the session (restart, its own reaper): stop tracking it.
            await self.manager.close(session, CloseReason.UPSTREAM_GONE, upstream_done=True)
        if not is_event_stream(upstream) and upstream.content_length is not None:
            timer.upstream_begins()
            read_timeout = self.upstream.read_timeout
            try:
                # A body that stalls after its headers is bounded like the headers were.
                async with upstream, asyncio.timeout(read_timeout):
                    body = await upstream.read()
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"upstream answer broke off: {exc}") from exc
            except TimeoutError as exc:
                raise UpstreamTimeoutError(
                    f"the upstream's answer body did not arrive within {read_timeout:g}s "
                    "(upstream.read_timeout)"
                ) from exc
            finally:
                timer.upstream_answered()
            if (
                session is not None
                and self._answers_for_session(request, session)
                and self.gone.matches(upstream.status, body)
            ):
                await self._session_gone(session, upstream.status, request_body)
            return await relay_buffered(request, upstream, body)
        relay = StreamRelay(upstream, long_lived)
        if session is not None:
            session.relays.add(relay)
        try:
            return await relay_stream(
                request,
                upstream,
                relay,
                None if session is None else self._event_watcher(session),
                on_prepared=timer.upstream_begins,
            )
        finally:
            timer.upstream_answered()
            if session is not None:
                session.relays.discard(relay)

    @staticmethod
    def _note_accepted_version(
        request: web.Request, upstream: aiohttp.ClientResponse, session: Session
    ) -> None:
        version = request.headers.get(PROTOCOL_HEADER)
        if version and 200 <= upstream.status < 300 and version != session.protocol_version:
            session.protocol_version = version

    def _answers_for_session(self, request: web.Request, session: Session) -> bool:
        """Whether an upstream "not found" on this request speaks about the session.

        Only the exact MCP endpoint's 404 means "no such session" (SPEC 2.1): the same 404 on
        another spelling or path is the router's "no such route" (FastMCP's routes are
        case-sensitive), and believing it would stop tracking a session the upstream still
        holds. A legacy session is different: closing it cuts its stream, which frees it
        upstream whatever the 404 meant.
        """
        if session.transport is not Transport.STREAMABLE_HTTP:
            return True
        return request.path == self.options.mcp_path

    def _closed_upstream_by(self, request: web.Request, status: int) -> bool:
        """Did the client's own DELETE close the session upstream? Only a 2xx, 404 or 405 from
        the exact endpoint says so (SPEC 2.4); otherwise (5xx, another 4xx, another path)
        the closer sends the sidecar's own DELETE, with the negotiated protocol version."""
        if request.path != self.options.mcp_path:
            return False
        return 200 <= status < 300 or status in (404, 405)

    def _event_watcher(self, session: Session) -> EventHook:
        watch = ping_watcher(session)

        async def hook(event: Event) -> bytes:
            watch(event)
            return event.raw

        return hook

    async def _session_gone(self, session: Session, status: int, request_body: bytes) -> None:
        """A non-compliant "session not found": close it and answer the spec's 404."""
        if session.live:
            log.info(
                "upstream answered %d meaning session %s is gone; answering 404",
                status,
                session.short_id,
            )
            await self.manager.close(session, CloseReason.UPSTREAM_GONE, upstream_done=True)
        batch = jsonrpc.parse(request_body) if request_body else jsonrpc.INVALID
        raise Rejected(404, "expired", jsonrpc.session_not_found(batch.first_id))

    # ---- checks and answers ----------------------------------------------------------------
    def _note_client_headers(self, request: web.Request, session: Session) -> None:
        """Remember what a later upstream DELETE must carry (SPEC 2.4). The protocol version
        is taken only from a request the upstream accepted (`_note_accepted_version`): a
        bogus one the upstream refused must not make the sidecar's own DELETE fail too."""
        used = credentials(request)
        if used:
            session.credentials = used

    async def _reject(self, request: web.Request, rejection: Rejected) -> web.Response:
        self.metrics.rejected.labels(rejection.reason).inc()
        # Legacy (2024-11-05) message URLs carry the id in the query, not in a header.
        query = request.query
        session_id = (
            request.headers.get(SESSION_HEADER) or query.get("sessionId") or query.get("session_id")
        )
        self._throttled.info(
            rejection.reason,
            "rejected %s %s session=%s reason=%s status=%d",
            request.method,
            request.path,
            short(session_id) if session_id else "-",
            rejection.reason,
            rejection.status,
        )
        response = rejection.response()
        if rejection.status in (408, 413):
            # Never read the rest of a body that is too large or too slow: close instead.
            response.force_close()
        elif request.can_read_body:
            await request.release()  # drain, so the connection stays usable for the client
        return response

    async def _upstream_failed(
        self, request: web.Request, body: bytes, exc: UpstreamError
    ) -> web.Response:
        # Throttled: with the upstream down, every client request would otherwise log a line.
        self._throttled.warning(type(exc).__name__, "%s %s: %s", request.method, request.path, exc)
        return upstream_failure(exc, body)


def limit_rejection(
    exc: LimitReachedError, request_id: jsonrpc.RequestId | None = None
) -> Rejected:
    """503 with Retry-After and a JSON-RPC error: a session limit refused a new session."""
    return Rejected(
        503,
        "limit",
        jsonrpc.error_body(
            jsonrpc.SERVER_ERROR, f"Too many sessions ({exc.scope}); retry later", request_id
        ),
        {"Retry-After": LIMIT_RETRY_AFTER},
    )


def store_rejection(request_id: jsonrpc.RequestId | None) -> Rejected:
    """503 with Retry-After: the store could not record a new session (SPEC 2.5)."""
    return Rejected(
        503,
        "store_unavailable",
        jsonrpc.error_body(
            jsonrpc.SERVER_ERROR,
            "The sidecar cannot record new sessions right now (its store failed); retry later",
            request_id,
        ),
        {"Retry-After": STORE_RETRY_AFTER},
    )


def ping_watcher(session: Session) -> Callable[[Event], None]:
    """Remember server-initiated pings so the client's answers do not count (SPEC 2.3)."""

    def watch(event: Event) -> None:
        if '"ping"' not in event.data:  # cheap pre-filter: most events are not pings
            return
        try:
            batch = jsonrpc.parse(event.data.encode())
        except ValueError:
            return
        for message in batch.messages:
            if message.method == "ping" and message.id is not None:
                session.remember_server_ping(message.id)

    return watch
