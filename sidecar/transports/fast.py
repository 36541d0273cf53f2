"""The fast path: a session's POST relayed below aiohttp's server and client (issue 10).

Most requests through the sidecar are POSTs of a session it holds live: check, count,
forward, relay. aiohttp's Request/Response objects, router, middlewares and its client cost
~80% of the sidecar's CPU on such a request. `lane.Lane` hands this module the requests
`plan` takes, parsed by llhttp; `serve` does for them exactly what `StreamableHttp._post`
and `Forwarder.relay` do (SPEC 2.1, 2.3, 2.5): the same checks, the same bookkeeping in the
manager, the same metrics, the same upstream request and the same answer, over a pool of raw
keep-alive upstream connections (`upstream/wire.py`).

`plan` decides synchronously, before anything is sent or counted; whatever it is unsure of
(another method or path, a session that is not simply live here, a resume, an unusual
header) gets None and takes the full path, which stays the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from .. import codings, jsonrpc, recovery
from .. import header_rules as rules
from ..calls import Call
from ..clients import client_identity
from ..errors import UpstreamError, UpstreamRefusedError, UpstreamTimeoutError
from ..intake import Rejected, RequestTimer
from ..recovery import Verdict
from ..sessions import Binding, CloseReason, Session, Transport, valid_session_id
from ..sse import EventSplitter
from ..upstream import Upstream
from ..upstream.wire import Answer, WirePool, too_late
from . import fast_http as wire
from .forwarder import Forwarder, SessionLostError, body_too_late, ping_watcher
from .lane import Lane
from .resume import Resumer, Waker

log = logging.getLogger("sidecar.proxy")

_UNEXPECTED = jsonrpc.error_body(jsonrpc.SERVER_ERROR, "Internal error in mcp-sidecar")


@dataclass(slots=True)
class FastRequest:
    """A request `plan` took: what serving it needs, decided before anything happens."""

    session: Session
    body: bytes
    upstream: bytes  # the whole request as the upstream gets it
    pool: WirePool
    member: Upstream
    protocol_version: str | None
    credentials: dict[str, str]
    timer: RequestTimer
    # The binding the request is sent on: what a recovery replaces if the upstream lost it.
    binding: Binding | None = None


class Exchange:
    """A request written on a kept-alive connection (by `FastPath.start`, before any task),
    served from that connection's callbacks (`wire.Listener`): a plain answer (whole, with a
    Content-Length, not an event stream, not a sign the session is gone) is relayed the moment
    it is complete, without a task; any other outcome goes on in a task (`FastPath.serve`
    with this as `sent`) from where it stands, so the rules stay those of the task path.
    `Deadlines` bounds the wait for the answer. One object holds what was sent and how far
    its exchange got: a request on this path allocates as few as it can."""

    __slots__ = ("answer", "call", "failure", "fast", "lane", "request")

    def __init__(
        self,
        fast: FastPath,
        request: FastRequest,
        lane: Lane,
        call: Call,
        answer: Answer,
    ) -> None:
        self.fast = fast
        self.request = request
        self.lane = lane
        self.call = call
        self.answer = answer
        self.failure: UpstreamError | None = None  # no answer head in time
        answer.listener = self
        fast.deadlines.add(self, request.pool.upstream.read_timeout)

    # ---- wire.Listener ----------------------------------------------------------------------
    def answered(self, answer: Answer) -> None:
        self._stop()
        if self.fast.relay_now(self.request, self, self.lane):
            self.lane.finished()
        else:
            self._go_on()

    def head_only(self, answer: Answer) -> None:
        self._stop()
        self._go_on()

    def broke(self, answer: Answer) -> None:
        self._stop()
        self._go_on()

    # ---- the rest ---------------------------------------------------------------------------
    def cancel(self) -> None:
        """The client left before the answer: the exchange is dropped, as a cancelled task's."""
        self._stop()
        self.answer.close()
        self.fast.dropped(self.request, self)
        # After the connection's own `connection_lost`, as a cancelled task would end.
        asyncio.get_running_loop().call_soon(self.lane.finished)

    def too_late(self) -> None:
        """No answer head within `read_timeout` (`Deadlines`): 504, as on the task path."""
        answer = self.answer
        answer.listener = None
        answer.close()  # a late answer must never reach the next request
        self.failure = too_late(self.request.pool.upstream)
        self._go_on()

    def _stop(self) -> None:
        self.fast.deadlines.discard(self)
        self.answer.listener = None

    def _go_on(self) -> None:
        self.lane.run(self.fast.serve(self.request, self.lane, self))


class Due(Protocol):
    """What `Deadlines` tells when no answer head came in time."""

    def too_late(self) -> None: ...


class HeadWait:
    """An answer head awaited in a task (`FastPath.exchange`) under `Deadlines`."""

    __slots__ = ("answer", "failure", "upstream")

    def __init__(self, answer: Answer, upstream: Upstream) -> None:
        self.answer = answer
        self.upstream = upstream
        self.failure: UpstreamError | None = None

    def too_late(self) -> None:
        self.failure = too_late(self.upstream)
        self.answer.close()  # wakes the waiter; a late answer must never reach the next request


class Deadlines:
    """The answer-head deadlines of the exchanges in flight, under one timer: a timer per
    request (made and cancelled) cost more than the rest of its bookkeeping. The timer is
    armed for the earliest deadline; when it fires, every exchange due is told and the timer
    re-armed for the earliest left (a few exchanges are in flight, one per busy connection)."""

    def __init__(self) -> None:
        self._due: dict[Due, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._at = 0.0

    def add(self, exchange: Due, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        due = self._due[exchange] = loop.time() + timeout
        if self._timer is None or due < self._at:
            self._arm(loop, due)

    def discard(self, exchange: Due) -> None:
        self._due.pop(exchange, None)

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        # Due by the time the timer was armed for, as a per-request timer would have fired
        # (the loop may run a timer a little before its time).
        now = max(asyncio.get_running_loop().time(), self._at)
        late = [exchange for exchange, due in self._due.items() if due <= now]
        for exchange in late:
            del self._due[exchange]
        if self._due:
            self._arm(asyncio.get_running_loop(), min(self._due.values()))
        for exchange in late:
            exchange.too_late()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class FastRelay:
    """A relayed answer stream in `session.relays`: closing the session cuts it."""

    __slots__ = ("aborted", "answer", "long_lived")

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.long_lived = False
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.answer.close()


class FastPath:
    def __init__(self, forwarder: Forwarder, resumer: Resumer) -> None:
        self.fw = forwarder
        self.manager = forwarder.manager
        self.resumer = resumer  # re-creates a lost session (`recover_lost`), as on the full path
        self._pools: dict[int, WirePool] = {}
        self._prefixes: dict[int, bytes] = {}
        self.deadlines = Deadlines()
        self._options = forwarder.options
        self._target = forwarder.options.mcp_path.encode()

    @property
    def enabled(self) -> bool:
        return self.fw.options.fast_path

    @property
    def target(self) -> bytes:
        """The MCP path as bytes, made again only when a reload brought other options."""
        options = self.fw.options
        if options is not self._options:
            self._options = options
            self._target = options.mcp_path.encode()
        return self._target

    def close(self) -> None:
        self.deadlines.close()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    # ---- deciding ---------------------------------------------------------------------------
    def head_ok(self, index: rules.Index) -> bool:
        """Checks the head alone decides (so a request that will not be taken goes to aiohttp
        at once, not after its body): plain framing, one in-limit Content-Length, keep-alive."""
        if b"transfer-encoding" in index or b"expect" in index or b"upgrade" in index:
            return False
        codings_named = index.get(b"content-encoding")
        if codings_named is not None and codings.unreadable(map(_text, codings_named)):
            return False  # the full path's 415 (`codings.py`)
        lengths = index.get(b"content-length")
        if lengths is None or len(lengths) != 1:
            return False
        length = lengths[0]
        if not length.isdigit() or int(length) > self.fw.options.max_body_bytes:
            return False
        connection = index.get(b"connection")
        return connection is None or all(v.strip().lower() == b"keep-alive" for v in connection)

    def plan(self, lane: Lane) -> FastRequest | None:
        """The request, if the fast path can serve it exactly as the full path would."""
        options = self.fw.options
        index = lane.index
        ids = index.get(rules.SESSION)
        hosts = index.get(b"host")
        if (
            not options.fast_path
            or ids is None
            or len(ids) != 1
            or hosts is None
            or len(hosts) != 1
            or lane.url != self.target
        ):
            return None
        session_id = ids[0].decode("latin-1")
        origin = rules.first_of(index, b"origin")
        allowed = options.allowed_origins
        if not valid_session_id(session_id) or (
            allowed and origin is not None and _text(origin) not in allowed
        ):
            return None
        authorization = rules.first_of(index, b"authorization")
        identity = client_identity(
            None if authorization is None else _text(authorization), lane.peer
        )
        session = self.manager.held(session_id, identity)
        if session is None or session.transport is not Transport.STREAMABLE_HTTP:
            return None
        member = self._member(session)
        if member is None:
            return None
        if recovery.may_recover(options.recover_lost, session) and not all(
            other.url.scheme == "http" for _, other in self.fw.upstreams
        ):
            return None  # a recovery may move it to a member this path cannot reach
        return self._request(lane, session, member, hosts[0], authorization)

    def _member(self, session: Session) -> Upstream | None:
        binding = session.binding
        pool = self.fw.upstreams
        if binding is not None and not pool.is_up(binding.upstream):
            return None
        member = self.fw.upstream_of(session)
        return member if member.url.scheme == "http" else None

    def _request(
        self,
        lane: Lane,
        session: Session,
        member: Upstream,
        host: bytes,
        authorization: bytes | None,
    ) -> FastRequest:
        index = lane.index
        chunks = lane.body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        binding = session.binding
        upstream = wire.upstream_request(
            self.prefix_of(member),
            lane.headers,
            lane.names,
            index,
            body,
            host=host,
            peer=lane.peer_bytes,
            scheme=lane.scheme_bytes,
            session=None if binding is None else binding.session_id.encode(),
        )
        version = rules.first_of(index, b"mcp-protocol-version")
        credentials = _credentials(authorization, rules.first_of(index, b"cookie"))
        return FastRequest(
            session,
            body,
            upstream,
            self.pool(member),
            member,
            None if version is None else _text(version),
            credentials,
            RequestTimer(),
            binding,
        )

    def pool(self, member: Upstream) -> WirePool:
        pool = self._pools.get(id(member))
        if pool is None:
            pool = self._pools[id(member)] = WirePool(member)
        return pool

    async def exchange(self, pool: WirePool, data: bytes) -> Answer:
        """`WirePool.exchange` with the answer-head deadline in `deadlines`, not a timeout
        context per request (that cost ~8% of an `initialize`'s CPU); a new connection
        keeps the pool's own (its connect is bounded there too)."""
        conn = pool.take()
        if conn is None:
            return await pool.exchange(data)
        wait = HeadWait(conn.send(data), pool.upstream)
        self.deadlines.add(wait, pool.upstream.read_timeout)
        try:
            await wait.answer.wait_head()
        except UpstreamError:
            if wait.failure is None:
                raise
        except BaseException:
            wait.answer.close()  # the client left: as `WirePool.exchange`, the connection goes
            raise
        finally:
            self.deadlines.discard(wait)
        if wait.failure is not None:
            # Also when the head came just as the timer fired: the answer is closed by then.
            raise wait.failure
        return wait.answer

    def prefix_of(self, member: Upstream) -> bytes:
        """The upstream request's first lines for a member, built once: request line, Host."""
        prefix = self._prefixes.get(id(member))
        if prefix is None:
            target = member.target(self.fw.options.mcp_path).raw_path_qs.encode()
            prefix = b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (target, member.authority.encode())
            self._prefixes[id(member)] = prefix
        return prefix

    # ---- serving ----------------------------------------------------------------------------
    def start(self, request: FastRequest, lane: Lane) -> None:
        """Serve a planned request. With a kept-alive upstream connection at hand it is written
        at once and the answer is relayed from that connection's callbacks (`Exchange`), no
        task; a new connection, and whatever an answer needs beyond the plain case, take a task
        (`serve`), which does the rest exactly as before."""
        conn = request.pool.take()
        if conn is None:
            lane.run(self.serve(request, lane))
            return
        try:
            call = self._begin(request)
        except Exception:
            log.exception("unexpected error handling POST %s", self.fw.options.mcp_path)
            request.pool.release(conn)
            lane.write(wire.json_answer(500, _UNEXPECTED))
            self.settle(request, "forwarded")
            lane.finished()
            return
        request.timer.upstream_begins()
        lane.serving = Exchange(self, request, lane, call, conn.send(request.upstream))

    def relay_now(self, request: FastRequest, sent: Exchange, lane: Lane) -> bool:
        """`_post`'s rest for a complete plain answer, without a task; False (and nothing
        done) when the answer needs more than this (`relay`'s other branches)."""
        answer = sent.answer
        session = request.session
        status = answer.status
        if recovery.after_head(status, session, speaks=True, may=False) is not Verdict.RELAY:
            return False
        body = plain_body(answer)
        if body is None:
            return False
        gone = recovery.after_body(status, body, session, self.fw.gone, speaks=True, may=False)
        if gone is not Verdict.RELAY:
            return False
        request.timer.upstream_answered()
        call = sent.call
        outcome = "forwarded"
        try:
            call.answered(status)
            version = request.protocol_version
            if recovery.accepts_version(version, session, status, speaks=True):
                assert version is not None
                self.manager.note_protocol_version(session, version, call.batch)
            lane.write(
                wire.buffered_from(
                    status,
                    answer.reason,
                    answer.headers,
                    answer.names,
                    session=session.id.encode(),
                    body=body,
                )
            )
        except UpstreamError as exc:  # an answer the client cannot be given (`_relayable`)
            outcome = "upstream_error"
            lane.write(self._failure(request, exc))
        except Exception:
            log.exception("unexpected error handling POST %s", self.fw.options.mcp_path)
            lane.write(wire.json_answer(500, _UNEXPECTED))
        finally:
            call.ended()
            self.settle(request, outcome)
        return True

    def dropped(self, request: FastRequest, sent: Exchange) -> None:
        """The client left while the answer was awaited: `_post` and `serve` when cancelled."""
        request.timer.upstream_answered()
        sent.call.ended()
        self.settle(request, "forwarded")

    def settle(self, request: FastRequest, outcome: str) -> None:
        """`Forwarder.handle`'s last step: the request counted, its own time observed (the
        usual outcome in plain numbers read at scrape time, `metrics.Tally`)."""
        if outcome == "forwarded":
            self.fw.metrics.fast.observe(request.timer.own_time())
            return
        self.fw.count_request("POST", outcome)
        self.fw.metrics.request_duration.observe(request.timer.own_time())

    async def serve(self, request: FastRequest, lane: Lane, sent: Exchange | None = None) -> None:
        """`Forwarder.handle` for a planned request: its outcome counted the same way."""
        outcome = "forwarded"
        try:
            await self._post(request, lane, sent)
        except Rejected as rejection:
            outcome = "rejected"
            self.fw.note_rejection("POST", self.fw.options.mcp_path, request.session.id, rejection)
            lane.write(rejection_answer(rejection))
        except UpstreamError as exc:
            outcome = "upstream_error"
            lane.write(self._failure(request, exc))
        except Exception:
            log.exception("unexpected error handling POST %s", self.fw.options.mcp_path)
            lane.write(wire.json_answer(500, _UNEXPECTED))
        finally:
            self.settle(request, outcome)

    def _failure(self, request: FastRequest, exc: UpstreamError) -> bytes:
        """`upstream_failure`: 502 or 504 with a JSON-RPC error echoing the request's id."""
        self.fw.note_upstream_failure("POST", self.fw.options.mcp_path, exc)
        timeout = isinstance(exc, UpstreamTimeoutError)
        batch = jsonrpc.parse(request.body) if request.body else jsonrpc.INVALID
        message = "Upstream MCP server timed out" if timeout else "Upstream MCP server unreachable"
        body = jsonrpc.error_body(jsonrpc.SERVER_ERROR, message, batch.first_id)
        return wire.json_answer(504 if timeout else 502, body)

    def _begin(self, request: FastRequest) -> Call:
        """What `_post` does before the upstream is asked."""
        manager = self.manager
        session = request.session
        body = request.body
        batch = jsonrpc.parse(body) if body else jsonrpc.INVALID
        manager.note_credentials(session, request.credentials)
        return Call(manager, session, batch)

    async def _post(self, request: FastRequest, lane: Lane, sent: Exchange | None) -> None:
        """`StreamableHttp._live` for a POST: the exchange, and with `recover_lost` a session
        the upstream lost re-created behind the client's id and the request sent again, once
        (`recovery.py` decides, as for the full path)."""
        session = request.session
        recover = recovery.may_recover(self.fw.options.recover_lost, session)
        try:
            await self._post_once(request, lane, sent, recover)
            return
        except UpstreamRefusedError:
            if not recovery.recovers_refusal(recover, len(self.fw.upstreams)):
                raise
        except SessionLostError:
            pass
        batch = jsonrpc.parse(request.body) if request.body else jsonrpc.INVALID
        credentials = request.credentials
        identity = client_identity(credentials.get("Authorization"), lane.peer)
        waker = Waker(identity, credentials)
        await self.resumer.resume_for(
            waker, session, "upstream_lost", batch.first_id, request.binding
        )
        await self._post_once(self._again(request, lane), lane, None, False)

    def _again(self, request: FastRequest, lane: Lane) -> FastRequest:
        """The request once more, for the session's new binding (and perhaps another member).
        The lane still holds its head: the next request's bytes wait until this one ends."""
        index = lane.index
        member = self.fw.upstream_of(request.session)
        again = self._request(
            lane,
            request.session,
            member,
            index[b"host"][0],
            rules.first_of(index, b"authorization"),
        )
        again.timer = request.timer
        return again

    async def _post_once(
        self, request: FastRequest, lane: Lane, sent: Exchange | None, may_recover: bool
    ) -> None:
        """`StreamableHttp._post` for a live session; `sent`: the request was written already
        (by `start`), its exchange goes on here. With `may_recover`, an answer saying the
        upstream lost the session raises `SessionLostError` before any of it is relayed."""
        if sent is None:
            call = self._begin(request)
            forward = self._forward(request)
        else:
            call = sent.call
            forward = self._forwarded(request, sent)
        try:
            answer = await forward
        except UpstreamError:
            call.unsent()
            raise
        except BaseException:
            call.ended()  # the client left before the answer's head came
            raise
        try:
            call.answered(answer.status)
            await self.relay(request, answer, lane, call.batch, may_recover)
        finally:
            call.ended()
            if not answer.finished or answer.error is not None:
                answer.close()  # an answer not read to its end leaves no reusable connection

    async def _forward(self, request: FastRequest) -> Answer:
        timer = request.timer
        timer.upstream_begins()
        try:
            return await request.pool.exchange(request.upstream)
        except UpstreamRefusedError:
            self.fw.upstreams.refused(request.member)
            raise
        finally:
            timer.upstream_answered()

    async def _forwarded(self, request: FastRequest, sent: Exchange) -> Answer:
        """`_forward` for a request `start` wrote: its head came, or it failed."""
        try:
            if sent.failure is not None:
                raise sent.failure
            await sent.answer.wait_head()
            return sent.answer
        finally:
            request.timer.upstream_answered()

    async def relay(
        self,
        request: FastRequest,
        answer: Answer,
        lane: Lane,
        batch: jsonrpc.Batch,
        may_recover: bool = False,
    ) -> None:
        """`Forwarder.relay` for the exact endpoint's answer to a live session's POST
        (`batch`: what it carried)."""
        session = request.session
        status = answer.status
        version = request.protocol_version
        # The lane takes the exact endpoint's POSTs alone: its answers speak for the session.
        if recovery.accepts_version(version, session, status, speaks=True):
            assert version is not None
            self.manager.note_protocol_version(session, version, batch)
        verdict = recovery.after_head(status, session, speaks=True, may=may_recover)
        if verdict is Verdict.LOST:
            raise SessionLostError  # nothing of the answer relayed; its connection dropped
        if verdict is Verdict.GONE:
            # The upstream lost the session (restart, its own reaper): stop tracking it.
            await self.manager.close(session, CloseReason.UPSTREAM_GONE, upstream_done=True)
        content_type = answer.header(b"content-type") or b""
        stream = content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream"
        if not stream and answer.content_length is not None:
            await self._relay_buffered(request, answer, lane, may_recover)
        else:
            await self._relay_stream(request, answer, lane, stream)

    async def _relay_buffered(
        self, request: FastRequest, answer: Answer, lane: Lane, may_recover: bool
    ) -> None:
        session = request.session
        body = await self.read_answer(request.timer, answer)
        verdict = recovery.after_body(
            answer.status, body, session, self.fw.gone, speaks=True, may=may_recover
        )
        if verdict is Verdict.LOST:
            raise SessionLostError
        if verdict is Verdict.GONE:
            await self.fw.session_gone(session, answer.status, request.body)
        headers = rules.end_to_end(answer.headers, session.id.encode())
        lane.write(wire.buffered_answer(answer.status, answer.reason, headers, body))

    async def read_answer(self, timer: RequestTimer, answer: Answer) -> bytes:
        """A buffered answer's whole body, within `read_timeout` (fast_init reads with it too)."""
        timer.upstream_begins()
        read_timeout = self.fw.upstreams.primary.read_timeout
        try:
            # A body that stalls after its headers is bounded like the headers were.
            if not answer.finished:
                async with asyncio.timeout(read_timeout):
                    await answer.wait_ended()
        except TimeoutError as exc:
            raise body_too_late(read_timeout) from exc
        finally:
            timer.upstream_answered()
        if answer.error is not None:
            raise UpstreamError(f"upstream answer broke off: {answer.error}")
        chunks = answer.chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _relay_stream(
        self, request: FastRequest, answer: Answer, lane: Lane, events: bool
    ) -> None:
        """`relay_stream`: whole SSE events, server pings watched, back-pressure upstream."""
        session = request.session
        timer = request.timer
        headers = rules.end_to_end(answer.headers, session.id.encode())
        inspect = events and (answer.header(b"content-encoding") or b"identity").lower() == (
            b"identity"
        )
        if inspect:
            headers.append((b"X-Accel-Buffering", b"no"))
        # Made first: a head the client may not get raises before the lane is held.
        head = wire.answer_head(answer.status, answer.reason, headers, None)
        # The head waits for what of the body already came: one write, not several.
        lane.hold()
        lane.write(head)
        relay = FastRelay(answer)
        session.relays.add(relay)
        try:
            with streaming(lane, answer, timer):
                await self._pump(answer, lane, session, inspect)
        finally:
            session.relays.discard(relay)

    async def _pump(self, answer: Answer, lane: Lane, session: Session, inspect: bool) -> None:
        splitter = EventSplitter() if inspect else None
        watch = ping_watcher(self.manager, session)

        def sink(data: bytes) -> None:
            if splitter is None:
                if not lane.write(wire.chunk(data)):
                    answer.close()  # the client left (see below)
                return
            for event in splitter.feed(data):
                if event.inspectable:
                    watch(event)
                if not lane.write(wire.chunk(event.raw)):
                    # The client left: the stream ends at this event, as on the full path,
                    # where the handler learns it when a write fails.
                    answer.close()
                    return

        if not await pump(answer, lane, sink):
            return
        # An event the upstream left unfinished by breaking off is not relayed (the full
        # path's relay ends the client's stream cleanly without it).
        if splitter is not None and answer.error is None and (tail := splitter.flush()):
            lane.write(wire.chunk(tail))
        lane.write(wire.LAST_CHUNK)


@contextlib.contextmanager
def streaming(lane: Lane, answer: Answer, timer: RequestTimer) -> Iterator[None]:
    """The lane relays a streamed answer meanwhile: the client's back-pressure pauses the
    upstream's reads, and the upstream's time ends with the stream."""
    timer.upstream_begins()
    lane.on_pause, lane.on_resume = answer.pause, answer.resume
    try:
        yield
    finally:
        lane.flush()
        lane.on_pause = lane.on_resume = None
        timer.upstream_answered()


async def pump(answer: Answer, lane: Lane, sink: Callable[[bytes], None]) -> bool:
    """The answer's body through `sink`: what was read already, then each read as it comes,
    until the upstream ends it. False when the client was gone before that (nothing more
    is to be written to it)."""
    if answer.error is None:
        for data in answer.chunks:
            sink(data)
    # else: it broke off before any of it was relayed, and what came is dropped, as the full
    # path's reader (aiohttp's) raises the error before any data it holds unread.
    answer.chunks = []
    answer.sink = sink
    if not lane.flush():
        return False
    await answer.wait_ended()
    if answer.error is not None:
        log.debug("upstream stream ended abnormally: %s", answer.error)
    return True


def plain_body(answer: Answer) -> bytes | None:
    """The body of an answer that can be written at once, whole: complete, framed by its
    length, not an event stream (those are relayed as they come); else None."""
    if not answer.finished or answer.error is not None or answer.content_length is None:
        return None
    content_type = answer.header(b"content-type") or b""
    if content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream":
        return None
    chunks = answer.chunks
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def rejection_answer(rejection: Rejected) -> bytes:
    """`Rejected.response()` as aiohttp writes it: its headers, then the JSON content type."""
    headers = [(name.encode(), value.encode()) for name, value in rejection.headers.items()]
    headers.append((b"Content-Type", b"application/json"))
    return wire.buffered_answer(rejection.status, b"", headers, rejection.body)


def _credentials(authorization: bytes | None, cookie: bytes | None) -> dict[str, str]:
    """What a later upstream DELETE (or resume) must carry, as `_post` takes them."""
    if authorization is None and cookie is None:
        return {}  # the usual request: nothing to look at
    credentials = {}
    if authorization is not None:
        credentials["Authorization"] = _text(authorization)
    if cookie is not None:
        credentials["Cookie"] = _text(cookie)
    return credentials


def _text(value: bytes) -> str:
    """A header value as aiohttp gives it to the full path."""
    return value.decode("utf-8", "surrogateescape")


__all__ = ["FastPath", "FastRequest"]
