"""The Streamable HTTP endpoint: every client request's path through the sidecar (SPEC 2.1).

request -> checks (origin, size, session id form) -> `SessionManager` decides (live, dormant,
expired, unknown, bound elsewhere) -> forward upstream -> relay the answer, watching it for
what changes the session (a new id, a 404, a server ping). A dormant session is resumed
before its request is forwarded, and a lost one re-created when `recover_lost` allows
(`resume.py`). Rejections are answered by the forwarder, never forwarded.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from .. import jsonrpc, recovery, untrackable
from ..admission import LimitReachedError
from ..calls import Call
from ..errors import StoreError, UpstreamError, UpstreamRefusedError
from ..forwarding import StreamRelay, relay_stream
from ..intake import Rejected, RequestTimer, credentials, request_identity
from ..manager import Outcome
from ..sessions import CloseReason, Session, Transport, short, valid_session_id
from ..upstream import PROTOCOL_HEADER, SESSION_HEADER, Upstream
from .forwarder import Forwarder, SessionLostError
from .opening import Opening, open_session, refuse_untrackable
from .rejections import (
    NO_LOOKUP,
    bad_session_id,
    limit_rejection,
    not_found,
    store_rejection,
)
from .resume import Resumer

log = logging.getLogger("sidecar.proxy")

# The first protocol revision without sessions; its traffic is passed through untracked.
SESSIONLESS_SINCE = "2026-07-28"


class StreamableHttp:
    def __init__(self, forwarder: Forwarder, resumer: Resumer) -> None:
        self.fw = forwarder
        self.manager = forwarder.manager
        self.metrics = forwarder.metrics
        self.resumer = resumer
        # Adoptions are rare (a deploy in front of live sessions); one lock makes two
        # concurrent adoptions of one id create one session, counted once.
        self._adoption_lock = asyncio.Lock()

    # ---- dispatch ------------------------------------------------------------------------
    async def dispatch(
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
            raise bad_session_id("Mcp-Session-Id header", batch.first_id)
        identity = request_identity(request)
        try:
            resolution = await self.manager.resolve(session_id, identity)
        except StoreError as exc:
            raise store_rejection(batch.first_id, NO_LOOKUP) from exc
        session = resolution.session
        if session is None:
            if resolution.outcome is Outcome.UNKNOWN and self.fw.options.unknown == "forward":
                return await self._adopt(request, body, session_id, identity, timer)
            raise not_found(resolution.outcome.value, batch.first_id)
        self.manager.note_credentials(session, credentials(request))
        if session.dormant:
            return await self._dormant(request, body, batch, session, timer)
        return await self._live(request, body, batch, session, timer)

    async def _live(
        self,
        request: web.Request,
        body: bytes,
        batch: jsonrpc.Batch,
        session: Session,
        timer: RequestTimer,
    ) -> web.StreamResponse:
        if request.method == "DELETE":
            return await self._client_delete(request, session, timer)
        recover = recovery.may_recover(self.fw.options.recover_lost, session)
        # The binding the request is sent on: what a resume replaces if it fails (read here,
        # as `forward` will, so a resume another request finished meanwhile is not repeated).
        sent_on = session.binding
        if recovery.resumes_first(recover, self._replica_up(session)):
            # SPEC 2.8: its replica is down; re-created on a healthy one before sending.
            await self.resumer.resume(request, session, "upstream_lost", batch.first_id, sent_on)
            sent_on = session.binding
        try:
            return await self._exchange(request, body, batch, session, timer, may_recover=recover)
        except UpstreamRefusedError:
            # The request never reached the replica: re-created elsewhere and sent, once.
            if not recovery.recovers_refusal(recover, len(self.fw.upstreams)):
                raise
        except SessionLostError:
            pass  # SPEC 2.7 recover_lost: re-create behind the same id and send it again, once.
        await self.resumer.resume(request, session, "upstream_lost", batch.first_id, sent_on)
        return await self._exchange(request, body, batch, session, timer, may_recover=False)

    def _replica_up(self, session: Session) -> bool:
        binding = session.binding
        return binding is None or self.fw.upstreams.is_up(binding.upstream)

    async def _dormant(
        self,
        request: web.Request,
        body: bytes,
        batch: jsonrpc.Batch,
        session: Session,
        timer: RequestTimer,
    ) -> web.StreamResponse:
        """SPEC 2.7: a GET is held without waking anything; a DELETE ends the id for good;
        anything else resumes the session first."""
        if request.method == "GET":
            return await self.resumer.hold(request, session, timer)
        if request.method == "DELETE":
            await self.manager.close(session, CloseReason.CLIENT_DELETE)
            return web.Response(status=200)
        await self.resumer.resume(request, session, "hibernated", batch.first_id, None)
        return await self._exchange(request, body, batch, session, timer, may_recover=False)

    async def _exchange(
        self,
        request: web.Request,
        body: bytes,
        batch: jsonrpc.Batch,
        session: Session,
        timer: RequestTimer,
        *,
        may_recover: bool,
    ) -> web.StreamResponse:
        if request.method == "GET":
            return await self._open_stream(request, session, timer, may_recover)
        return await self._post(request, body, batch, session, timer, may_recover=may_recover)

    async def _post(
        self,
        request: web.Request,
        body: bytes,
        batch: jsonrpc.Batch,
        session: Session,
        timer: RequestTimer,
        *,
        may_recover: bool,
    ) -> web.StreamResponse:
        call = Call(self.manager, session, batch)
        try:
            upstream = await self.fw.forward(request, body, timer, session)
        except UpstreamError:
            call.unsent()
            raise
        except BaseException:
            call.ended()  # the client left (aiohttp cancels the handler) before the head
            raise
        try:
            call.answered(upstream.status)
            return await self.fw.relay(
                request, upstream, session, timer, request_body=body, may_recover=may_recover
            )
        finally:
            call.ended()

    async def _open_stream(
        self, request: web.Request, session: Session, timer: RequestTimer, may_recover: bool
    ) -> web.StreamResponse:
        """A GET stream: relayed, but never activity (unless open_stream_keeps_alive)."""
        upstream = await self.fw.forward(request, None, timer, session)
        session.open_streams += 1
        try:
            return await self.fw.relay(
                request, upstream, session, timer, long_lived=True, may_recover=may_recover
            )
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
            upstream = await self.fw.forward(request, None, timer, session)
            async with upstream:
                await upstream.read()
            answered = self.fw.closed_upstream_by(request, upstream.status)
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

    # ---- new sessions ----------------------------------------------------------------------
    async def _initialize(
        self, request: web.Request, body: bytes, initialize: jsonrpc.Message, timer: RequestTimer
    ) -> web.StreamResponse:
        """`opening.open_session` on aiohttp's client, the answer relayed."""
        opening = Opening(
            request_identity(request),
            initialize.id,
            initialize.params,
            None,
            credentials(request),
            request.headers.get("User-Agent", ""),
        )

        async def send(member: Upstream) -> _Answered:
            return _Answered(await self.fw.forward(request, body, timer, upstream=member))

        answered, session, _ = await open_session(self.fw, opening, send)
        return await self.fw.relay(request, answered.upstream, session, timer)

    async def _adopt(
        self, request: web.Request, body: bytes, session_id: str, identity: str, timer: RequestTimer
    ) -> web.StreamResponse:
        """`sessions.unknown = "forward"`: let the upstream judge an id we never saw."""
        upstream = await self.fw.forward(request, body, timer)
        session = None
        # A DELETE ends a session, it never adopts one (its 2xx says the session is gone).
        if 200 <= upstream.status < 300 and request.method != "DELETE":
            session = await self._adopt_accepted(request, upstream, session_id, identity)
        return await self.fw.relay(request, upstream, session, timer)

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
        backstop): nothing to resume it from. The admission is released whatever happens."""
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
        upstream = await self.fw.forward(request, body or None, timer)
        session = await self.backstop(request, upstream, body)
        return await self.fw.relay(request, upstream, session, timer)

    async def passthrough(self, request: web.Request, timer: RequestTimer) -> web.StreamResponse:
        """A path no endpoint claims and a request naming no session: relayed as it is."""
        body = await self.fw.read_body(request) if request.can_read_body else None
        upstream = await self.fw.forward(request, body, timer)
        await self.backstop(request, upstream, body or b"")
        return await relay_stream(request, upstream, StreamRelay(upstream), None)

    async def backstop(
        self, request: web.Request, upstream: aiohttp.ClientResponse, body: bytes = b""
    ) -> Session | None:
        """An upstream session born of a request we did not read as `initialize` (SPEC 2.5).

        Whatever the parser thought, the upstream must hold no session the sidecar does not
        know: track it (limits apply), or close it upstream at once and refuse the client.
        """
        session_id = upstream.headers.get(SESSION_HEADER)
        if session_id is None or not 200 <= upstream.status < 300:
            return None
        if session_id in self.manager.live:
            return None
        request_id = jsonrpc.parse(body).first_id if body else None
        raw = untrackable.raw_id(session_id)
        await refuse_untrackable(
            self.fw,
            _Answered(upstream),
            raw,
            credentials=credentials(request),
            member=None,
            request_id=request_id,
        )
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
        await self.fw.delete_orphan(request, session_id)


__all__ = ["Rejected", "StreamableHttp"]


class _Answered:
    """aiohttp's answer to an `initialize`, as `opening` reads it."""

    __slots__ = ("upstream",)

    def __init__(self, upstream: aiohttp.ClientResponse) -> None:
        self.upstream = upstream

    @property
    def status(self) -> int:
        return self.upstream.status

    def session_id(self) -> bytes | None:
        value = self.upstream.headers.get(SESSION_HEADER)
        return None if value is None else untrackable.raw_id(value)

    def drop(self) -> None:
        self.upstream.release()
