"""When a session the upstream lost is re-created instead of closed (SPEC 2.7,
`upstream.recover_lost`): the one rule both paths ask, the full path (`StreamableHttp._live`,
`Forwarder.relay`) and the fast path (`FastPath._post`, `FastPath.relay`).

A lost session is re-created behind the client's id and the request sent again, once, only
before anything of the upstream's answer reached the client. No I/O here: the callers do the
re-creating (`Resumer.resume_for`) and the sending.
"""

from __future__ import annotations

from .sessions import Session


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
