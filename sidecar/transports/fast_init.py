"""The fast path for a new session: an `initialize` served below aiohttp (issue 10).

Creating a session is a proxied POST plus one store insert; through aiohttp's server and
client the HTTP part cost ~90% of its CPU. `plan` takes the `initialize` requests `lane.Lane`
kept (the fast POST's head rules, no `Mcp-Session-Id`, the body one JSON-RPC `initialize`
request), and `serve` does for them what `StreamableHttp._initialize` does (SPEC 2.1, 2.5,
2.6, 2.8): admission, placement on a member with failover past a refusing replica, the
upstream exchange on the raw keep-alive pool (`upstream/wire.py`), and only for a 2xx
carrying a session id, track-or-undo: the session is committed before the answer leaves, or,
if the store fails, closed upstream again and the client answered 503. A session's answer is
relayed by `FastPath.relay` (JSON or SSE, with the session's id and ping watching); an answer
that made no session (an error, a stateless server) is relayed as it came.

Whatever `plan` is unsure of goes to the full path, which stays the reference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import header_rules as rules
from .. import jsonrpc
from ..clients import client_identity
from ..errors import UpstreamError, UpstreamRefusedError, UpstreamTimeoutError
from ..intake import Rejected, RequestTimer
from ..sessions import Session
from ..upstream import Upstream
from ..upstream.wire import Answer
from . import fast
from . import fast_http as wire
from .opening import Opening, open_session

if TYPE_CHECKING:
    from .lane import Lane

log = logging.getLogger("sidecar.proxy")

_UNEXPECTED = jsonrpc.error_body(jsonrpc.SERVER_ERROR, "Internal error in mcp-sidecar")
_CREDENTIALS = (("Authorization", b"authorization"), ("Cookie", b"cookie"))
_DECODER = json.JSONDecoder()
_PARAMS = "params"
# What an `initialize`'s header version is noted with: it starts the handshake, it does not
# end it, so it fills in only a version its params named none of (as the full path's relay).
_NOT_THE_HANDSHAKE_END = jsonrpc.INVALID


@dataclass(slots=True)
class InitRequest:
    """An `initialize` `plan` took; the member is chosen when it is served, as on the full
    path (placement counts the sessions live at that moment)."""

    initialize: jsonrpc.Message
    params_json: str | None  # the params' text in the body, for the resume state
    body: bytes
    headers: rules.Headers
    names: list[bytes]  # the lane's, as its head came: lower-case names, in order
    index: rules.Index  # the lane's: lower-case name: its values
    host: bytes
    identity: str
    peer: bytes
    scheme: bytes
    timer: RequestTimer


def plan(path: fast.FastPath, lane: Lane) -> InitRequest | None:
    """The request, if it is an `initialize` the fast path can serve as the full path would."""
    fw = path.fw
    options = fw.options
    index = lane.index
    hosts = index.get(b"host")
    if (
        not options.fast_path
        or hosts is None
        or len(hosts) != 1
        or lane.url != path.target
        or rules.SESSION in index
        or not _origin_allowed(index, options.allowed_origins)
        or not all(member.url.scheme == "http" for _, member in fw.upstreams)
    ):
        return None
    chunks = lane.body
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    taken = _initialize_of(body)
    if taken is None:
        return None
    initialize, params_json = taken
    authorization = rules.first_of(index, b"authorization")
    identity = client_identity(None if authorization is None else _text(authorization), lane.peer)
    return InitRequest(
        initialize,
        params_json,
        body,
        lane.headers,
        lane.names,
        index,
        hosts[0],
        identity,
        lane.peer_bytes,
        lane.scheme_bytes,
        RequestTimer(),
    )


def _origin_allowed(index: rules.Index, allowed: frozenset[str]) -> bool:
    origin = rules.first_of(index, b"origin")
    return not allowed or origin is None or _text(origin) in allowed


def _initialize_of(body: bytes) -> tuple[jsonrpc.Message, str | None] | None:
    """The body's `initialize` request, if the body is that one request and nothing else: a
    batch, a notification or any other method keeps the full path's handling; with it, its
    params' own JSON text when it could be cut out (`_parsed`)."""
    # Cheap refusals first: a stateless server's every POST comes here without a session id.
    if b'"initialize"' not in body or body.lstrip()[:1] != b"{":
        return None
    parsed = _parsed(body)
    batch, params_json = (jsonrpc.parse(body), None) if parsed is None else parsed
    if not batch.valid or len(batch.messages) != 1:
        return None
    message = batch.messages[0]
    if message.method != "initialize" or not message.is_request:
        return None
    return message, params_json


def _parsed(body: bytes) -> tuple[jsonrpc.Batch, str] | None:
    """The body parsed as `jsonrpc.parse` would, with the text of its top-level `params`
    object: the resume state keeps that text as it came instead of encoding the parsed params
    again. The params are decoded where `"params":` stands, the rest with `null` in their
    place; only if that rest is an object whose `params` is that `null` was the span the
    top-level value (a nested or repeated key leaves something else there). An SDK's
    compact ASCII JSON is then the very text the full path stores; a client's own spacing is
    kept as it came (readers decode the text). None: not sure, `jsonrpc.parse` decides."""
    if not body.isascii():
        return None  # the full path stores non-ASCII as `\u` escapes: encoded again here too
    try:
        text = body.decode("ascii")
        key = text.find('"params":')
        if key < 1 or text[key - 1] not in "{,":
            return None
        start = key + 9
        params, end = _DECODER.raw_decode(text, start)
        rest = json.loads(text[:start] + "null" + text[end:])
    except (ValueError, RecursionError):
        return None
    if (
        not isinstance(params, dict)
        or not isinstance(rest, dict)
        or rest.get(_PARAMS, 0) is not None
    ):
        return None
    rest[_PARAMS] = params
    return jsonrpc.from_json(rest), text[start:end]


def _text(value: bytes) -> str:
    """A header value as aiohttp gives it to the full path."""
    return value.decode("utf-8", "surrogateescape")


# ---- serving --------------------------------------------------------------------------------
async def serve(path: fast.FastPath, request: InitRequest, lane: Lane) -> None:
    """`Forwarder.handle` for a planned `initialize`: its outcome counted the same way."""
    fw = path.fw
    outcome = "forwarded"
    try:
        await _initialize(path, request, lane)
    except Rejected as rejection:
        outcome = "rejected"
        fw.note_rejection("POST", fw.options.mcp_path, None, rejection)
        lane.write(fast.rejection_answer(rejection))
    except UpstreamError as exc:
        outcome = "upstream_error"
        fw.note_upstream_failure("POST", fw.options.mcp_path, exc)
        lane.write(_failure(request, exc))
    except Exception:
        log.exception("unexpected error handling POST %s", fw.options.mcp_path)
        lane.write(wire.json_answer(500, _UNEXPECTED))
    finally:
        fw.count_request("POST", outcome)
        fw.metrics.request_duration.observe(request.timer.own_time())


def _failure(request: InitRequest, exc: UpstreamError) -> bytes:
    """`upstream_failure`: 502 or 504 with a JSON-RPC error echoing the request's id."""
    timeout = isinstance(exc, UpstreamTimeoutError)
    message = "Upstream MCP server timed out" if timeout else "Upstream MCP server unreachable"
    body = jsonrpc.error_body(jsonrpc.SERVER_ERROR, message, request.initialize.id)
    return wire.json_answer(504 if timeout else 502, body)


async def _initialize(path: fast.FastPath, request: InitRequest, lane: Lane) -> None:
    """`opening.open_session` on the raw pool, the answer relayed."""
    agent = rules.first_of(request.index, b"user-agent")
    opening = Opening(
        request.identity,
        request.initialize.id,
        request.initialize.params,
        request.params_json,
        _credentials(request),
        "" if agent is None else _text(agent),
    )

    async def send(member: Upstream) -> _Answered:
        return _Answered(await _exchange(path, request, member), member)

    answered, session, _ = await open_session(path.fw, opening, send)
    answer, member = answered.answer, answered.member
    try:
        if session is None:
            await _relay_untracked(path, request, answer, lane)
        elif not _relay_now(path, request, session, answer, lane):
            session_request = _as_session_request(path, request, session, member)
            await path.relay(session_request, answer, lane, _NOT_THE_HANDSHAKE_END)
    finally:
        if not answer.finished or answer.error is not None:
            answer.close()  # an answer not read to its end leaves no reusable connection


class _Answered:
    """The raw pool's answer to an `initialize`, as `opening` reads it."""

    __slots__ = ("answer", "member")

    def __init__(self, answer: Answer, member: Upstream) -> None:
        self.answer = answer
        self.member = member

    @property
    def status(self) -> int:
        return self.answer.status

    def session_id(self) -> bytes | None:
        return self.answer.header(rules.SESSION)

    def drop(self) -> None:
        self.answer.close()


async def _exchange(path: fast.FastPath, request: InitRequest, member: Upstream) -> Answer:
    """`Forwarder.forward` on the member's wire pool; a refusal marks the member down."""
    data = wire.upstream_request(
        path.prefix_of(member),
        request.headers,
        request.names,
        request.index,
        request.body,
        host=request.host,
        peer=request.peer,
        scheme=request.scheme,
        session=None,
    )
    timer = request.timer
    timer.upstream_begins()
    try:
        return await path.exchange(path.pool(member), data)
    except UpstreamRefusedError:
        path.fw.upstreams.refused(member)
        raise
    finally:
        timer.upstream_answered()


def _credentials(request: InitRequest) -> dict[str, str]:
    """`intake.credentials`: what the client authenticated with, for the sidecar's DELETE."""
    index = request.index
    if b"authorization" not in index and b"cookie" not in index:
        return {}  # the usual case on a benchmark or a local network, without the loop
    return {
        name: _text(value)
        for name, key in _CREDENTIALS
        if (value := rules.first_of(request.index, key)) is not None
    }


def _relay_now(
    path: fast.FastPath, request: InitRequest, session: Session, answer: Answer, lane: Lane
) -> bool:
    """`FastPath.relay` for the usual answer that made a session (2xx, complete, a body with
    its length, not an event stream, no sign the session is gone): written at once, in one
    pass over its headers (`buffered_from`), without building a live session's request for
    it. False, and nothing done, for any other answer."""
    body = fast.plain_body(answer)
    if body is None or path.fw.gone.matches(answer.status, body):
        return False
    version = rules.first_of(request.index, b"mcp-protocol-version")
    if version:  # `relay` notes a non-empty header's version of a 2xx answer
        path.manager.note_protocol_version(session, _text(version), _NOT_THE_HANDSHAKE_END)
    lane.write(
        wire.buffered_from(
            answer.status,
            answer.reason,
            answer.headers,
            answer.names,
            session=session.id.encode(),
            body=body,
        )
    )
    return True


def _as_session_request(
    path: fast.FastPath, request: InitRequest, session: Session, member: Upstream
) -> fast.FastRequest:
    """The request as a live session's fast POST, for `FastPath.relay`. Its body stays
    empty: the full path relays an `initialize`'s answer without the request body, so a
    "session gone" answer to it echoes no id there either."""
    version = rules.first_of(request.index, b"mcp-protocol-version")
    return fast.FastRequest(
        session,
        b"",
        b"",
        path.pool(member),
        member,
        None if version is None else _text(version),
        _credentials(request),
        request.timer,
    )


# ---- an answer that made no session -------------------------------------------------------
async def _relay_untracked(
    path: fast.FastPath, request: InitRequest, answer: Answer, lane: Lane
) -> None:
    """`Forwarder.relay` with no session: the answer as it came, its headers end to end."""
    headers = rules.end_to_end(answer.headers)
    content_type = answer.header(b"content-type") or b""
    stream = content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    if not stream and answer.content_length is not None:
        body = await path.read_answer(request.timer, answer)
        lane.write(wire.buffered_answer(answer.status, answer.reason, headers, body))
        return
    identity = (answer.header(b"content-encoding") or b"identity").lower() == b"identity"
    if stream and identity:
        headers.append((b"X-Accel-Buffering", b"no"))
    head = wire.answer_head(answer.status, answer.reason, headers, None)  # may raise: first
    lane.hold()
    lane.write(head)
    await _pump_raw(request, answer, lane)


async def _pump_raw(request: InitRequest, answer: Answer, lane: Lane) -> None:
    """A streamed answer with no session to watch it for: bytes through as they come."""

    def sink(data: bytes) -> None:
        if not lane.write(wire.chunk(data)):
            answer.close()  # the client left: the stream ends here, as on the full path

    with fast.streaming(lane, answer, request.timer):
        if await fast.pump(answer, lane, sink):
            lane.write(wire.LAST_CHUNK)


__all__ = ["InitRequest", "plan", "serve"]
