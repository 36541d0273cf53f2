"""Resuming sessions behind the client's unchanged id (SPEC 2.7).

A dormant session (hibernated when it went idle) or a lost one (the upstream answered 404 or
"session gone", with `upstream.recover_lost`) is re-created upstream from what the sidecar
stored when the client set it up: the `initialize` params are replayed with the credentials
of the request that woke it, then `notifications/initialized`, then the session-scoped setup
(`logging/setLevel`, each `resources/subscribe`). The new upstream session becomes the
session's binding; the client keeps its id and sees no error.

A GET on a dormant id is *held*: the sidecar answers it with an SSE stream of comments and
joins it to the new upstream session's GET stream when a request resumes the session --
before that request is forwarded, so nothing the server sends in answer to it is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from .. import jsonrpc, untrackable
from ..admission import LimitReachedError
from ..errors import StoreError, UpstreamError, UpstreamTimeoutError
from ..forwarding import StreamRelay, is_event_stream, pump_into
from ..intake import RequestTimer, credentials, request_identity
from ..sessions import Binding, CloseReason, ResumeState, Session, short
from ..sse import EventSplitter, parse_event
from ..upstream import PROTOCOL_HEADER, SESSION_HEADER, Upstream
from .forwarder import Forwarder
from .rejections import NO_LOOKUP, limit_rejection, not_found, store_rejection

log = logging.getLogger("sidecar.resume")

# SSE comment cadence on a held stream: below the 30-60 s idle cut-offs of common proxies.
HOLD_KEEPALIVE_SECONDS = 15.0


class ResumeRefusedError(Exception):
    """The upstream would not re-create the session as the client had it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def initial_resume_state(params: Any, text: str | None = None) -> ResumeState | None:
    """What a resume replays, from the client's `initialize` params (never credentials);
    `text`: those params' JSON text as the request carried it, kept instead of encoding them
    again (readers decode it, whatever its spacing)."""
    if not isinstance(params, dict):
        return None
    return ResumeState(initialize=params if text is None else text)


@dataclass(frozen=True, slots=True)
class Waker:
    """The client whose request needs a resume: its identity (limits, for a dormant session)
    and the credentials the replayed handshake carries."""

    identity: str
    credentials: dict[str, str]


class HeldStream:
    """A client's GET on a dormant id, waiting to be joined to an upstream stream."""

    __slots__ = ("_wake", "aborted", "request", "upstream")
    long_lived = True

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.aborted = False
        self.upstream: aiohttp.ClientResponse | None = None
        self._wake = asyncio.Event()

    def abort(self) -> None:
        self.aborted = True
        if self.upstream is not None:
            self.upstream.close()
        self._wake.set()

    def attach(self, upstream: aiohttp.ClientResponse) -> None:
        self.upstream = upstream
        self._wake.set()

    async def wait(self, seconds: float) -> bool:
        """True once joined or aborted, False after `seconds` of nothing."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True


class Resumer:
    def __init__(self, forwarder: Forwarder) -> None:
        self.fw = forwarder
        self.manager = forwarder.manager
        self.metrics = forwarder.metrics
        self._resuming: dict[str, asyncio.Future[None]] = {}
        self._held: dict[str, set[HeldStream]] = {}
        self._ids = itertools.count(1)

    # ---- resuming --------------------------------------------------------------------------
    async def resume(
        self,
        request: web.Request,
        session: Session,
        cause: str,
        request_id: jsonrpc.RequestId | None,
        replacing: Binding | None,
    ) -> None:
        """`resume_for` the client of this request."""
        await self.resume_for(
            Waker(request_identity(request), credentials(request)),
            session,
            cause,
            request_id,
            replacing,
        )

    async def resume_for(
        self,
        waker: Waker,
        session: Session,
        cause: str,
        request_id: jsonrpc.RequestId | None,
        replacing: Binding | None,
    ) -> None:
        """Re-create the session's upstream session in place of `replacing`, the binding the
        request saw fail (None: it saw the session dormant); one resume at a time per session.
        `waker`: who sent the request that needs it (the fast path has no `web.Request`).

        Keyed on what the request saw, not on the binding found when it gets here: a resume
        sets the new binding before its store write commits, and a request that came in
        meanwhile, or after, must use that binding rather than replace it again (the first
        new upstream session would be left to nobody).

        Raises `Rejected` (404 when the session cannot be resumed and is closed, 503 at a
        limit or when the store refuses) or `UpstreamError` (502/504, nothing changed).
        """
        while (running := self._resuming.get(session.id)) is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
        if not session.usable:
            raise not_found("expired", request_id)
        if session.live and session.binding != replacing:
            return  # another request resumed it already: this one is sent on the new binding
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._resuming[session.id] = done
        try:
            await self._resume(waker, session, cause, request_id)
        finally:
            del self._resuming[session.id]
            done.set_result(None)

    async def _resume(
        self,
        waker: Waker,
        session: Session,
        cause: str,
        request_id: jsonrpc.RequestId | None,
    ) -> None:
        identity = waker.identity
        admitted = session.dormant  # a lost session is live and already counted
        if admitted:
            try:
                await self.manager.admit(identity)
            except LimitReachedError as exc:
                raise limit_rejection(exc, request_id) from exc
        try:
            await self._recreate_and_bind(waker, session, cause, request_id)
        finally:
            if admitted:
                self.manager.release(identity)

    async def _recreate_and_bind(
        self,
        waker: Waker,
        session: Session,
        cause: str,
        request_id: jsonrpc.RequestId | None,
    ) -> None:
        started = time.perf_counter()
        # A dormant session's old upstream session is owed its DELETE already (hibernation).
        previous = session.binding if session.live else None
        name = self._member_for(session)
        member = self.fw.upstreams.member(name) or self.fw.upstreams.primary
        try:
            await self.manager.load_resume_state(session)
        except StoreError as exc:
            raise store_rejection(request_id, NO_LOOKUP) from exc
        try:
            new_id = await self._recreate(waker, session, member)
        except UpstreamError:
            self.metrics.resume_failures.labels("unreachable").inc()
            raise
        except ResumeRefusedError as exc:
            await self._give_up(session, exc)
            raise not_found("expired", request_id) from exc
        try:
            rebound = await self.manager.rebind(session, Binding(name, new_id), cause)
        except StoreError as exc:
            self.manager.store_failed("resume", exc)
            await self.fw.close_orphan(new_id, waker.credentials, member)
            raise store_rejection(request_id) from exc
        if not rebound:
            await self._lost_race(session, Binding(name, new_id), request_id)
            await self._join_held(session)
            return
        if previous is not None:
            # Whatever the upstream said of it (404, "gone", or nothing from a replica that is
            # down: a partition, not a crash), the replaced session may still live there.
            await self.manager.owe_close(previous, session.protocol_version, session.credentials)
        await self._join_held(session)
        log.info(
            "resumed session %s cause=%s upstream=%s took=%.1fms",
            session.short_id,
            cause,
            short(new_id),
            (time.perf_counter() - started) * 1000,
        )

    async def _lost_race(
        self, session: Session, mine: Binding, request_id: jsonrpc.RequestId | None
    ) -> None:
        """Another sidecar on the shared store resumed the session first (SPEC 2.8): the
        upstream session created here is nobody's, so it is owed a DELETE (durable, retried
        like any other), and the request goes to the binding that won."""
        await self.manager.owe_close(mine, session.protocol_version, session.credentials)
        if not await self.manager.take_winning_binding(session):
            if not session.usable:
                raise not_found("expired", request_id)  # closed by the other sidecar
            raise store_rejection(request_id)  # unreadable now: the client's retry reads it
        assert session.binding is not None
        log.info(
            "session %s was resumed by another sidecar first; its upstream %s is used",
            session.short_id,
            short(session.binding.session_id),
        )

    def _member_for(self, session: Session) -> str:
        """A lost session stays on its upstream while it is configured and up (it restarted,
        or reaped the session); a dormant one, or one whose replica is down, is placed like
        a new session."""
        binding = session.binding
        pool = self.fw.upstreams
        if (
            session.live
            and binding is not None
            and pool.member(binding.upstream) is not None
            and pool.is_up(binding.upstream)
        ):
            return binding.upstream
        return self.fw.place()

    async def _give_up(self, session: Session, exc: ResumeRefusedError) -> None:
        self.metrics.resume_failures.labels(exc.reason).inc()
        log.warning("cannot resume session %s (%s); closing it", session.short_id, exc)
        await self.manager.close(session, CloseReason.RESUME_FAILED, upstream_done=True)

    async def _recreate(self, waker: Waker, session: Session, member: Upstream) -> str:
        """The replayed handshake and setup; returns the new upstream session id."""
        resume = session.resume
        if resume is None:
            raise ResumeRefusedError("refused", "nothing recorded to resume from")
        headers = self._headers(waker, session, member)
        new_id, version = await self._initialize(member, headers, resume)
        raw = untrackable.raw_id(new_id)
        why = untrackable.why_untrackable(raw)
        if why is not None:
            # Never bind an id the store cannot key nor a header carry unaltered: the upstream
            # session is closed with its exact bytes, and the resume fails as a refused one.
            await self.fw.refuse_untrackable(raw, why, waker.credentials, member, None)
            raise ResumeRefusedError(
                "untrackable", f"the upstream issued a session id the sidecar cannot track ({why})"
            )
        if session.protocol_version and version != session.protocol_version:
            await self.fw.close_orphan(new_id, waker.credentials, member)
            raise ResumeRefusedError(
                "protocol_version",
                f"the upstream negotiated {version}, the client speaks {session.protocol_version}",
            )
        headers[SESSION_HEADER] = new_id
        headers[PROTOCOL_HEADER] = version
        try:
            await self._replay_setup(member, headers, resume)
        except UpstreamError:
            await self.fw.close_orphan(new_id, waker.credentials, member)
            raise
        return new_id

    @staticmethod
    def _headers(waker: Waker, session: Session, member: Upstream) -> dict[str, str]:
        headers = {
            **member.static_headers,
            "Host": member.authority,
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        }
        if session.user_agent:
            headers["User-Agent"] = session.user_agent
        headers.update(waker.credentials)
        return headers

    async def _initialize(
        self, member: Upstream, headers: dict[str, str], resume: ResumeState
    ) -> tuple[str, str]:
        request_id = f"mcp-sidecar-resume-{next(self._ids)}"
        body = _rpc(request_id, "initialize", resume.initialize)
        answer = await member.request("POST", member.url, headers, body)
        new_id = answer.headers.get(SESSION_HEADER)
        result = await _result_of(answer, request_id, member.read_timeout)
        if not 200 <= answer.status < 300 or new_id is None or result is None:
            raise ResumeRefusedError(
                "refused", f"the replayed initialize was answered HTTP {answer.status}"
            )
        version = result.get("protocolVersion")
        if not isinstance(version, str):
            raise ResumeRefusedError("refused", "the replayed initialize named no protocol version")
        return new_id, version

    async def _replay_setup(
        self, member: Upstream, headers: dict[str, str], resume: ResumeState
    ) -> None:
        notification = json.dumps(
            {"jsonrpc": "2.0", "method": "notifications/initialized"}
        ).encode()
        await self._send(member, headers, notification, None)
        if resume.log_level is not None:
            request_id = f"mcp-sidecar-resume-{next(self._ids)}"
            body = _rpc(request_id, "logging/setLevel", {"level": resume.log_level})
            await self._send(member, headers, body, request_id)
        for uri in resume.subscriptions:
            request_id = f"mcp-sidecar-resume-{next(self._ids)}"
            body = _rpc(request_id, "resources/subscribe", {"uri": uri})
            await self._send(member, headers, body, request_id)

    async def _send(
        self,
        member: Upstream,
        headers: dict[str, str],
        body: bytes,
        request_id: str | None,
    ) -> None:
        answer = await member.request("POST", member.url, headers, body)
        await _result_of(answer, request_id, member.read_timeout)
        if not 200 <= answer.status < 300:
            log.warning(
                "replaying setup on a resumed session: the upstream answered HTTP %d",
                answer.status,
            )

    # ---- held streams ------------------------------------------------------------------------
    async def hold(
        self, request: web.Request, session: Session, timer: RequestTimer
    ) -> web.StreamResponse:
        """A GET on a dormant id: kept open without waking the upstream (SPEC 2.7)."""
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                SESSION_HEADER: session.id,
            },
        )
        await response.prepare(request)
        timer.upstream_begins()  # holding is not the sidecar's overhead
        held = HeldStream(request)
        session.relays.add(held)
        self._held.setdefault(session.id, set()).add(held)
        try:
            return await self._keep(response, held, session)
        finally:
            timer.upstream_answered()
            self._forget_held(session, held)

    async def _keep(
        self, response: web.StreamResponse, held: HeldStream, session: Session
    ) -> web.StreamResponse:
        try:
            while not await held.wait(HOLD_KEEPALIVE_SECONDS):
                await response.write(b": session dormant; held until it resumes\n\n")
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            return response  # the client went away
        upstream = held.upstream
        if held.aborted or upstream is None:
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                await response.write_eof()
            return response
        relay = StreamRelay(upstream, long_lived=True)
        session.open_streams += 1
        try:
            return await pump_into(response, upstream, relay, self.fw.event_watcher(session))
        finally:
            session.open_streams -= 1

    def _forget_held(self, session: Session, held: HeldStream) -> None:
        if session.runtime is not None:
            session.runtime.relays.discard(held)
        waiting = self._held.get(session.id)
        if waiting is not None:
            waiting.discard(held)
            if not waiting:
                del self._held[session.id]

    async def _join_held(self, session: Session) -> None:
        """Open the new upstream session's GET stream for every held client stream, before
        the request that woke the session is forwarded."""
        for held in list(self._held.get(session.id, ())):
            try:
                upstream = await self.fw.forward(held.request, None, RequestTimer(), session)
            except UpstreamError as exc:
                log.warning("joining a held stream of %s failed: %s", session.short_id, exc)
                held.abort()
                continue
            if upstream.status == 200 and is_event_stream(upstream):
                held.attach(upstream)
            else:
                upstream.release()
                held.abort()  # the client reconnects its stream, now to the live session


def _rpc(request_id: str, method: str, params: Any) -> bytes:
    message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    return json.dumps(message, separators=(",", ":")).encode()


async def _result_of(
    answer: aiohttp.ClientResponse, request_id: str | None, within: float
) -> dict[str, Any] | None:
    """The `result` of the answer to `request_id`, in a JSON or an SSE body; None if none."""
    try:
        async with answer, asyncio.timeout(within):
            body = await answer.read()
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"the upstream's answer broke off: {exc}") from exc
    except TimeoutError as exc:
        raise UpstreamTimeoutError(f"the upstream did not answer within {within:g}s") from exc
    if request_id is None:
        return None
    for payload in _payloads(answer, body):
        try:
            data = json.loads(payload)
        except ValueError:
            continue
        for item in data if isinstance(data, list) else [data]:
            if isinstance(item, dict) and item.get("id") == request_id:
                result = item.get("result")
                return result if isinstance(result, dict) else None
    return None


def _payloads(answer: aiohttp.ClientResponse, body: bytes) -> list[str]:
    if not is_event_stream(answer):
        return [body.decode("utf-8", "replace")]
    splitter = EventSplitter()
    events = list(splitter.feed(body))
    tail = splitter.flush()
    if tail.strip():
        events.append(parse_event(tail))
    return [event.data for event in events]
