"""What both transports share: the checks every request passes, the upstream exchange, the
relay of its answer, and the one place rejections and upstream failures are answered.

The forwarder speaks for the client's id on the way up and back: a request of a session goes
to the upstream its binding names, carrying the binding's session id; an answer reaches the
client with the client's id (SPEC 2.7). It watches each answer for what changes the session
(an upstream 404 or "session gone", a server ping) and reports it to the manager.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from .. import jsonrpc, recovery, untrackable
from ..errors import UpstreamError, UpstreamRefusedError, UpstreamTimeoutError
from ..forwarding import (
    EventHook,
    StreamRelay,
    is_event_stream,
    relay_buffered,
    relay_stream,
    upstream_request_headers,
)
from ..gate import Route, check_one_session, route_of
from ..gone import GonePatterns
from ..intake import (
    Rejected,
    RequestTimer,
    check_content_coding,
    check_origin,
    credentials,
    read_body,
    upstream_failure,
)
from ..log import Throttled
from ..manager import SessionManager
from ..metrics import Metrics
from ..recovery import Verdict
from ..sessions import CloseReason, Session, Transport, short
from ..sse import Event
from ..upstream import PROTOCOL_HEADER, SESSION_HEADER, Upstream, UpstreamPool
from .rejections import not_found

log = logging.getLogger("sidecar.proxy")

# The methods the Streamable HTTP endpoint serves (SPEC 2.1); any other method there gets the
# upstream router's answer, never one about a session.
ENDPOINT_METHODS = frozenset({"POST", "GET", "DELETE"})


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """The transports' share of the config; replaced whole on reload."""

    allowed_origins: frozenset[str] = frozenset()
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0
    unknown: Literal["reject", "forward"] = "reject"
    messages_path: str = "/messages/"  # legacy transport, to check the endpoint event against
    mcp_path: str = "/mcp"  # the gate routes every spelling of these to their handler
    sse_path: str = "/sse"
    recover_lost: bool = False
    fast_path: bool = False  # a live session's POST below aiohttp's machinery (`fast.py`)


MAX_CACHED_COUNTERS = 64

Dispatch = Callable[[web.Request, bytes, RequestTimer], Awaitable[web.StreamResponse]]


class SessionLostError(Exception):
    """The upstream no longer holds a session the sidecar holds live, and `recover_lost` may
    re-create it: raised before anything of the answer reached the client."""


class Forwarder:
    def __init__(
        self,
        manager: SessionManager,
        upstreams: UpstreamPool,
        metrics: Metrics,
        options: ProxyOptions,
        gone: GonePatterns | None = None,
    ) -> None:
        self.manager = manager
        self.upstreams = upstreams
        self.metrics = metrics
        self.options = options
        self.gone = gone or GonePatterns()
        self._throttled = Throttled(log)
        self._counters: dict[tuple[str, str], Counter] = {}

    # ---- one request, start to end ---------------------------------------------------------
    async def handle(self, request: web.Request, dispatch: Dispatch) -> web.StreamResponse:
        """Checks, dispatch, and the one place rejections and upstream failures are answered."""
        timer = RequestTimer()
        body = b""
        # A client that leaves mid-answer cancels the handler (aiohttp): the request was
        # forwarded all the same and counts, so the finally, not the happy path, counts it.
        outcome = "forwarded"
        try:
            self.check(request)
            if request.method == "POST":
                body = await self.read_body(request)
            return await dispatch(request, body, timer)
        except Rejected as rejection:
            outcome = "rejected"
            return await self.reject(request, rejection)
        except UpstreamError as exc:
            outcome = "upstream_error"
            return await self.upstream_failed(request, body, exc)
        finally:
            self.count_request(request.method, outcome)
            self.metrics.request_duration.observe(timer.own_time())

    def count_request(self, method: str, outcome: str) -> None:
        # `labels()` takes a lock and builds a key on every call; the children are cached
        # (bounded: a client can send any method name, and the cache must not grow with it).
        child = self._counters.get((method, outcome))
        if child is None:
            child = self.metrics.requests.labels(method, outcome)
            if len(self._counters) < MAX_CACHED_COUNTERS:
                self._counters[(method, outcome)] = child
        child.inc()

    def check(self, request: web.Request) -> None:
        check_one_session(request)
        check_origin(request, self.options.allowed_origins)
        check_content_coding(request)

    async def read_body(self, request: web.Request) -> bytes:
        options = self.options
        return await read_body(request, options.max_body_bytes, options.body_timeout)

    # ---- the upstream exchange -------------------------------------------------------------
    def upstream_of(self, session: Session | None) -> Upstream:
        """The member a request goes to: its session's binding, else the pool's primary."""
        if session is not None and session.binding is not None:
            member = self.upstreams.member(session.binding.upstream)
            if member is not None:
                return member
        return self.upstreams.primary

    async def forward(
        self,
        request: web.Request,
        body: bytes | None,
        timer: RequestTimer,
        session: Session | None = None,
        upstream: Upstream | None = None,
    ) -> aiohttp.ClientResponse:
        """Send the client's request to its session's member (else `upstream`, else the
        primary); a refused connection marks that member down at once (SPEC 2.8)."""
        if upstream is None or session is not None:
            upstream = self.upstream_of(session)
        binding = None if session is None else session.binding
        headers = upstream_request_headers(
            request, upstream.authority, None if binding is None else binding.session_id
        )
        timer.upstream_begins()
        try:
            return await upstream.request(
                request.method, upstream.target(request.path_qs), headers, body
            )
        except UpstreamRefusedError:
            self.upstreams.refused(upstream)
            raise
        finally:
            timer.upstream_answered()

    def place(self) -> str:
        """The member a new (or re-created) session goes to: fewest live sessions."""
        return self.upstreams.place_live(self._bound)

    def _bound(self) -> Iterable[str]:
        return (s.binding.upstream for s in self.manager.live.values() if s.binding is not None)

    async def relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        session: Session | None,
        timer: RequestTimer,
        *,
        long_lived: bool = False,
        request_body: bytes = b"",
        may_recover: bool = False,
    ) -> web.StreamResponse:
        """Relay the answer, acting on what it says about the session first.

        With `may_recover`, an answer that says the upstream lost the session raises
        `SessionLostError` instead of closing it, before any of it reached the client.
        """
        client_id = None if session is None else session.id
        speaks = session is not None and self.answers_for_session(request, session)
        if session is not None:
            self._note_accepted_version(request, upstream, session, request_body)
            verdict = recovery.after_head(upstream.status, session, speaks=speaks, may=may_recover)
            if verdict is Verdict.LOST:
                upstream.release()
                raise SessionLostError
            if verdict is Verdict.GONE:
                # The upstream lost the session (restart, its own reaper): stop tracking it.
                await self.manager.close(session, CloseReason.UPSTREAM_GONE, upstream_done=True)
        if not is_event_stream(upstream) and upstream.content_length is not None:
            body = await self._read_answer(upstream, timer)
            if session is not None:
                verdict = recovery.after_body(
                    upstream.status, body, session, self.gone, speaks=speaks, may=may_recover
                )
                if verdict is Verdict.LOST:
                    raise SessionLostError
                if verdict is Verdict.GONE:
                    await self.session_gone(session, upstream.status, request_body)
            return await relay_buffered(request, upstream, body, client_id)
        relay = StreamRelay(upstream, long_lived)
        if session is not None:
            session.relays.add(relay)
        try:
            return await relay_stream(
                request,
                upstream,
                relay,
                None if session is None else self.event_watcher(session),
                on_prepared=timer.upstream_begins,
                session_id=client_id,
            )
        finally:
            timer.upstream_answered()
            if session is not None:
                session.relays.discard(relay)

    async def _read_answer(self, upstream: aiohttp.ClientResponse, timer: RequestTimer) -> bytes:
        timer.upstream_begins()
        read_timeout = self.upstreams.primary.read_timeout
        try:
            # A body that stalls after its headers is bounded like the headers were.
            async with upstream, asyncio.timeout(read_timeout):
                return await upstream.read()
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream answer broke off: {exc}") from exc
        except TimeoutError as exc:
            raise body_too_late(read_timeout) from exc
        finally:
            timer.upstream_answered()

    def _note_accepted_version(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        session: Session,
        request_body: bytes,
    ) -> None:
        """Remember the protocol version the upstream accepted, for the sidecar's own DELETE.

        Only the exact endpoint's answer to an MCP method says the version was accepted: a 2xx
        elsewhere (Express's CORS answers any OPTIONS 204 before MCP sees it) proves nothing,
        and a version noted from it makes the upstream refuse the close later."""
        version = request.headers.get(PROTOCOL_HEADER)
        if recovery.accepts_version(
            version, session, upstream.status, speaks=self._at_exact_endpoint(request)
        ):
            assert version is not None
            batch = jsonrpc.parse(request_body) if request_body else jsonrpc.INVALID
            self.manager.note_protocol_version(session, version, batch)

    def _at_exact_endpoint(self, request: web.Request) -> bool:
        """Whether the upstream's MCP handler itself answered, not its router.

        The path as sent (`raw_path`: Express does not decode `/%6Dcp`, FastMCP's Starlette
        does not fold case) and a method the endpoint serves: Express answers PUT or PATCH
        on `/mcp` 404 (no such route), which says nothing about the session."""
        return (
            request.method in ENDPOINT_METHODS and request.rel_url.raw_path == self.options.mcp_path
        )

    def answers_for_session(self, request: web.Request, session: Session) -> bool:
        """Whether an upstream "not found" on this request speaks about the session.

        Only the exact MCP endpoint's 404 means "no such session" (SPEC 2.1): the same 404 on
        another spelling, path or method is the router's "no such route" (FastMCP's routes
        are case-sensitive, Express's are method-bound), and believing it would stop tracking
        a session the upstream still holds. A legacy session is different: closing it cuts
        its stream, which frees it upstream whatever the 404 meant.
        """
        if session.transport is not Transport.STREAMABLE_HTTP:
            return True
        return self._at_exact_endpoint(request)

    def closed_upstream_by(self, request: web.Request, status: int) -> bool:
        """Did the client's own DELETE close the session upstream? (SPEC 2.4)

        A 2xx to a DELETE naming the session on a spelling of the endpoint's path (Express
        serves `/MCP` as `/mcp`) is the upstream closing it; a 404 or 405 says so
        only from the exact endpoint, elsewhere it is the router's. Otherwise (5xx, another
        4xx, a router's 404) the closer sends the sidecar's own DELETE, with the negotiated
        protocol version."""
        if 200 <= status < 300:
            return self._at_endpoint_spelling(request)
        return status in (404, 405) and self._at_exact_endpoint(request)

    def _at_endpoint_spelling(self, request: web.Request) -> bool:
        # Not any path: a DELETE naming a session on `/other` gets the session rules too, and
        # an upstream's catch-all page answering it 2xx has closed nothing.
        options = self.options
        route = route_of(request.path, options.mcp_path, options.sse_path, options.messages_path)
        return route is Route.MCP

    def event_watcher(self, session: Session) -> EventHook:
        watch = ping_watcher(self.manager, session)

        async def hook(event: Event) -> bytes:
            watch(event)
            return event.raw

        return hook

    async def session_gone(self, session: Session, status: int, request_body: bytes) -> None:
        """A non-compliant "session not found": close it and answer the spec's 404."""
        if session.live:
            log.info(
                "upstream answered %d meaning session %s is gone; answering 404",
                status,
                session.short_id,
            )
            await self.manager.close(session, CloseReason.UPSTREAM_GONE, upstream_done=True)
        batch = jsonrpc.parse(request_body) if request_body else jsonrpc.INVALID
        raise not_found("expired", batch.first_id)

    async def delete_orphan(
        self, request: web.Request, session_id: str, upstream: Upstream | None = None
    ) -> None:
        """Close upstream a session the client will never hear of (one attempt, logged)."""
        await self.close_orphan(session_id, credentials(request), upstream)

    async def close_orphan(
        self, session_id: str, client_credentials: dict[str, str], upstream: Upstream | None
    ) -> None:
        """`delete_orphan` with the client's credentials already read (the fast path has no
        `web.Request`)."""
        member = upstream or self.upstreams.primary
        # Not the client's headers: its Content-Length and body belong to another request.
        headers = {"Host": member.authority, SESSION_HEADER: session_id}
        headers.update(member.static_headers)
        headers.update(client_credentials)
        try:
            answer = await member.request("DELETE", member.url, headers, None)
            answer.release()
        except UpstreamError as exc:
            log.warning("closing untracked session %s failed: %s", short(session_id), exc)

    async def refuse_untrackable(
        self,
        session_id: bytes,
        why: str,
        client_credentials: dict[str, str],
        upstream: Upstream | None,
        request_id: jsonrpc.RequestId | None,
    ) -> Rejected:
        """An upstream session whose id the sidecar cannot track (`untrackable.py`): closed
        upstream at once (one attempt, logged), and the client's 502 to raise. The closer's
        retries are not for it: its owed DELETEs are keyed by ids the store can hold."""
        member = upstream or self.upstreams.primary
        self._throttled.warning(
            untrackable.REASON,
            "upstream %s issued a session id the sidecar cannot track (%s, %s); closing it",
            member.authority,
            why,
            untrackable.loggable(session_id),
        )
        try:
            await member.delete_raw(session_id, client_credentials)
        except UpstreamError as exc:
            log.warning(
                "closing untrackable session %s failed: %s", untrackable.loggable(session_id), exc
            )
        return untrackable.refusal(why, request_id)

    # ---- answers ---------------------------------------------------------------------------
    async def reject(self, request: web.Request, rejection: Rejected) -> web.Response:
        # Legacy (2024-11-05) message URLs carry the id in the query, not in a header.
        query = request.query
        session_id = (
            request.headers.get(SESSION_HEADER) or query.get("sessionId") or query.get("session_id")
        )
        self.note_rejection(request.method, request.path, session_id, rejection)
        response = rejection.response()
        if rejection.status in (408, 413, 415):
            # Never read the rest of a body that is too large, too slow, or encoded (aiohttp
            # would decompress it to drop it): close instead.
            response.force_close()
        elif request.can_read_body:
            await request.release()  # drain, so the connection stays usable for the client
        return response

    def note_rejection(
        self, method: str, path: str, session_id: str | None, rejection: Rejected
    ) -> None:
        self.metrics.rejected.labels(rejection.reason).inc()
        self._throttled.info(
            rejection.reason,
            "rejected %s %s session=%s reason=%s status=%d",
            method,
            path,
            short(session_id) if session_id else "-",
            rejection.reason,
            rejection.status,
        )

    async def upstream_failed(
        self, request: web.Request, body: bytes, exc: UpstreamError
    ) -> web.Response:
        self.note_upstream_failure(request.method, request.path, exc)
        return upstream_failure(exc, body)

    def note_upstream_failure(self, method: str, path: str, exc: UpstreamError) -> None:
        # Throttled: with the upstream down, every client request would otherwise log a line.
        self._throttled.warning(type(exc).__name__, "%s %s: %s", method, path, exc)


def body_too_late(read_timeout: float) -> UpstreamTimeoutError:
    """An answer whose body stalled after its headers (both paths answer it 504)."""
    return UpstreamTimeoutError(
        f"the upstream's answer body did not arrive within {read_timeout:g}s "
        "(upstream.read_timeout)"
    )


def ping_watcher(manager: SessionManager, session: Session) -> Callable[[Event], None]:
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
                manager.remember_server_ping(session, message.id)

    return watch
