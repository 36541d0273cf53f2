"""What an upstream answer says about its session, and when a session the upstream lost is
re-created instead of closed (SPEC 2.1, 2.7 `upstream.recover_lost`): the rules both ways in
ask, the full path (`StreamableHttp._live`, `Forwarder.relay`) and the fast path
(`FastPath._post`, `FastPath.relay`).

An answer is `Verdict.RELAY` (nothing about the session), `GONE` (the upstream lost it: the
session is closed `upstream_gone` and the client told so) or `LOST` (the same, with
`recover_lost`: re-created behind the client's id and the request sent again, once, only
before anything of the answer reached the client). Only the upstream's MCP endpoint itself
speaks about a session (`speaks`: the exact path and an endpoint method; a 404 elsewhere is
a router's "no such route"). No I/O here: the callers read the answer, close, re-create and
send.
"""

from __future__ import annotations

import enum

from .gone import GonePatterns
from .sessions import Session


class Verdict(enum.Enum):
    RELAY = "relay"
    GONE = "gone"
    LOST = "lost"


def after_head(status: int, session: Session, *, speaks: bool, may: bool) -> Verdict:
    """The answer's head: a 404 from the endpoint itself says the session is gone."""
    if status != 404 or not session.live or not speaks:
        return Verdict.RELAY
    return Verdict.LOST if recovers(may, session) else Verdict.GONE


def after_body(
    status: int, body: bytes, session: Session, gone: GonePatterns, *, speaks: bool, may: bool
) -> Verdict:
    """A buffered answer's body: a non-compliant "session not found" (`gone.py`) too."""
    if not speaks or not gone.matches(status, body):
        return Verdict.RELAY
    return Verdict.LOST if recovers(may, session) else Verdict.GONE


def accepts_version(version: str | None, session: Session, status: int, *, speaks: bool) -> bool:
    """Whether the answer shows the upstream accepted the request's `MCP-Protocol-Version`
    (a 2xx of the endpoint itself; Express's CORS layer answers any OPTIONS 204), when it is
    not the session's already (the usual request: nothing more is asked)."""
    return bool(version) and version != session.protocol_version and 200 <= status < 300 and speaks


def may_recover(recover_lost: bool, session: Session) -> bool:
    """Whether a request of this session may re-create its upstream session: the setting is
    on and the sidecar stored what to replay (the client's `initialize`)."""
    return recover_lost and session.resume is not None


def recovers(may: bool, session: Session) -> bool:
    """An answer said the upstream lost the session (the exact endpoint's 404, or a "session
    gone" sign): re-create it and send the request again (True), or close it (False). A
    session closed meanwhile is not brought back."""
    return may and session.live


def recovers_refusal(may: bool, replicas: int) -> bool:
    """A connection refused before the request was written never reached the replica: with
    another replica to go to, the session is re-created there and the request sent, once."""
    return may and replicas > 1


def resumes_first(may: bool, replica_up: bool) -> bool:
    """Its replica is down (SPEC 2.8): re-created on a healthy one before sending."""
    return may and not replica_up
