"""A new session opened by an `initialize`: one flow for both ways in (SPEC 2.1, 2.5, 2.6,
2.8).

Admission (limits, `evict_idle`), placement on the replica with the fewest live sessions with
failover past one that refuses the connection, and, for a 2xx carrying a session id only
(the Python SDK's 400 carries a throw-away id that must never be tracked), track-or-undo:

* an id the sidecar cannot track (`untrackable.py`) is closed upstream with its exact bytes
  and the client answered 502;
* otherwise the session is committed to the store before the answer leaves, or, when the
  store fails, closed upstream again at once and the client answered 503: the client never
  holds an id the sidecar could not commit.

The aiohttp handler (`StreamableHttp._initialize`) and the fast lane (`fast_init`) send the
request and relay the answer each their own way; what happens between is `open_session`.
An edge hands over how to send (`send`, to one member) and reads its answer through
`Answered`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .. import jsonrpc, untrackable
from ..admission import LimitReachedError
from ..clients import initialize_client
from ..errors import StoreError, UpstreamRefusedError
from ..sessions import Session, Transport, short
from ..upstream import Upstream
from .forwarder import Forwarder
from .rejections import limit_rejection, store_rejection
from .resume import initial_resume_state

log = logging.getLogger("sidecar.proxy")


class Answered(Protocol):
    """An upstream's answer to the `initialize`, as the edge that sent it reads it."""

    @property
    def status(self) -> int: ...

    def session_id(self) -> bytes | None:
        """Its `Mcp-Session-Id`, the bytes as they came (blanks around them not included)."""

    def drop(self) -> None:
        """It will not be relayed: its connection is freed."""


A = TypeVar("A", bound=Answered)


@dataclass(frozen=True, slots=True)
class Opening:
    """What the client's request says of the session it opens (never its body's bytes)."""

    identity: str
    request_id: jsonrpc.RequestId | None
    params: Any  # the `initialize` params: version, capabilities, clientInfo
    params_json: str | None  # their text in the body, kept for the resume state when at hand
    credentials: dict[str, str]
    user_agent: str


async def open_session(
    fw: Forwarder, opening: Opening, send: Callable[[Upstream], Awaitable[A]]
) -> tuple[A, Session | None, str]:
    """Admitted, placed and sent, then tracked or undone: the answer, the session it opened
    (None: no session, or an error the client gets as it came), and the member's name."""
    manager = fw.manager
    try:
        await manager.admit(opening.identity)
    except LimitReachedError as exc:
        raise limit_rejection(exc, opening.request_id) from exc
    try:
        name, answer = await _placed(fw, send)
        upstream_id = answer.session_id()
        session = None
        if upstream_id is not None and 200 <= answer.status < 300:
            member = fw.upstreams.member(name)
            await refuse_untrackable(
                fw,
                answer,
                upstream_id,
                credentials=opening.credentials,
                member=member,
                request_id=opening.request_id,
            )
            session = await _track_or_undo(fw, opening, answer, upstream_id.decode(), name)
        elif 200 <= answer.status < 300:
            fw.metrics.stateless_requests.inc()
    finally:
        manager.release(opening.identity)
    return answer, session, name


async def _placed(fw: Forwarder, send: Callable[[Upstream], Awaitable[A]]) -> tuple[str, A]:
    """Sent to the member `place()` picks; a replica that refuses the connection never saw
    the request, so the next healthy one is tried (SPEC 2.8)."""
    pool = fw.upstreams
    for _ in range(len(pool) - 1):
        name = fw.place()
        try:
            return name, await send(pool.at(name))
        except UpstreamRefusedError:
            if not any(r.up for r in pool.replicas):
                raise
    name = fw.place()
    return name, await send(pool.at(name))


async def refuse_untrackable(
    fw: Forwarder,
    answer: Answered,
    upstream_id: bytes,
    *,
    credentials: dict[str, str],
    member: Upstream | None,
    request_id: jsonrpc.RequestId | None,
) -> None:
    """A new upstream session whose id the sidecar cannot track (`untrackable.py`): closed
    upstream with its exact bytes, the client's 502 raised. The backstop asks it too."""
    why = untrackable.why_untrackable(upstream_id)
    if why is None:
        return
    answer.drop()
    raise await fw.refuse_untrackable(upstream_id, why, credentials, member, request_id)


async def _track_or_undo(
    fw: Forwarder, opening: Opening, answer: Answered, upstream_id: str, name: str
) -> Session:
    try:
        client_info, version = initialize_client(opening.params)
        return await fw.manager.create(
            upstream_id,
            Transport.STREAMABLE_HTTP,
            opening.identity,
            protocol_version=version,
            user_agent=opening.user_agent[:200],
            client_info=client_info,
            credentials=opening.credentials,
            resume=initial_resume_state(opening.params, opening.params_json),
            upstream=name,
        )
    except StoreError as exc:
        fw.manager.store_failed("insert", exc)
        answer.drop()
        log.warning(
            "cannot record session %s (store failed); closing it upstream", short(upstream_id)
        )
        await fw.close_orphan(upstream_id, opening.credentials, fw.upstreams.member(name))
        raise store_rejection(opening.request_id) from exc
