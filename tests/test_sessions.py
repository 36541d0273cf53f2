"""Unit tests for `sidecar.sessions`: expiry and activity rules on plain data."""

from __future__ import annotations

import pytest

from sidecar.sessions import (
    MAX_REMEMBERED_PINGS,
    CloseReason,
    Policy,
    Session,
    State,
    Transport,
    short,
    valid_session_id,
)

T0 = 1_000_000.0
EPS = 1e-3


def _session(*, in_flight: int = 0, open_streams: int = 0, **kw: object) -> Session:
    fields: dict[str, object] = {
        "id": "s-1",
        "transport": Transport.STREAMABLE_HTTP,
        "client": "ip:127.0.0.1",
        "created_at": T0,
        "last_activity_at": T0,
    }
    fields.update(kw)
    session = Session(**fields)  # type: ignore[arg-type]
    if in_flight or open_streams:  # the runtime, as the transports set it
        session.in_flight = in_flight
        session.open_streams = open_streams
    return session


# ---- expiry ------------------------------------------------------------------------------


def test_idle_session_expires_just_after_idle_timeout() -> None:
    policy = Policy(idle_timeout=60)
    session = _session()
    assert session.expires_at(policy) == T0 + 60
    assert session.expiry_reason(policy, T0 + 60 - EPS) is None
    # Exactly at the deadline it is still usable: "older than" idle_timeout expires.
    assert session.expiry_reason(policy, T0 + 60) is None
    assert session.expiry_reason(policy, T0 + 60 + EPS) is CloseReason.IDLE_TIMEOUT


def test_activity_moves_the_idle_deadline() -> None:
    policy = Policy(idle_timeout=60)
    session = _session(last_activity_at=T0 + 50)
    assert session.expires_at(policy) == T0 + 110
    assert session.expiry_reason(policy, T0 + 100) is None
    assert session.expiry_reason(policy, T0 + 110 + EPS) is CloseReason.IDLE_TIMEOUT


def test_max_lifetime_expires_an_active_session() -> None:
    policy = Policy(idle_timeout=60, max_lifetime=100)
    session = _session(last_activity_at=T0 + 90)
    assert session.expires_at(policy) == T0 + 100
    assert session.expiry_reason(policy, T0 + 100 - EPS) is None
    assert session.expiry_reason(policy, T0 + 100) is CloseReason.MAX_LIFETIME


def test_max_lifetime_takes_precedence_when_both_apply() -> None:
    policy = Policy(idle_timeout=10, max_lifetime=100)
    session = _session()
    assert session.expires_at(policy) == T0 + 10
    assert session.expiry_reason(policy, T0 + 200) is CloseReason.MAX_LIFETIME


def test_max_lifetime_zero_is_off() -> None:
    policy = Policy(idle_timeout=60, max_lifetime=0)
    session = _session(last_activity_at=T0 + 10_000)
    assert session.expires_at(policy) == T0 + 10_060
    assert session.expiry_reason(policy, T0 + 10_050) is None


def test_persistent_session_never_expires_by_time() -> None:
    policy = Policy(idle_timeout=60, max_lifetime=100)
    session = _session(persistent=True)
    assert session.expires_at(policy) is None
    assert session.expiry_reason(policy, T0 + 1e9) is None


def test_closed_session_has_no_expiry() -> None:
    policy = Policy(idle_timeout=60)
    session = _session(state=State.CLOSED, close_reason=CloseReason.ADMIN, closed_at=T0)
    assert not session.live
    assert session.expires_at(policy) is None
    assert session.expiry_reason(policy, T0 + 1e9) is None


def test_call_in_flight_keeps_the_session_alive_past_idle_timeout() -> None:
    policy = Policy(idle_timeout=60)
    session = _session(in_flight=1)
    assert session.kept_alive(policy)
    assert session.expires_at(policy) is None
    assert session.expiry_reason(policy, T0 + 40 * 60) is None
    session.in_flight = 0
    assert session.expiry_reason(policy, T0 + 40 * 60) is CloseReason.IDLE_TIMEOUT


def test_call_in_flight_does_not_suspend_max_lifetime() -> None:
    policy = Policy(idle_timeout=60, max_lifetime=100)
    session = _session(in_flight=1)
    assert session.expires_at(policy) == T0 + 100
    assert session.expiry_reason(policy, T0 + 100) is CloseReason.MAX_LIFETIME


def test_open_stream_keeps_alive_only_when_configured() -> None:
    session = _session(open_streams=1)
    default = Policy(idle_timeout=60)
    assert not session.kept_alive(default)
    assert session.expiry_reason(default, T0 + 61) is CloseReason.IDLE_TIMEOUT
    keeps = Policy(idle_timeout=60, open_stream_keeps_alive=True)
    assert session.kept_alive(keeps)
    assert session.expires_at(keeps) is None
    assert session.expiry_reason(keeps, T0 + 10_000) is None


def test_idle_seconds_never_negative() -> None:
    session = _session()
    assert session.idle_seconds(T0 + 5) == 5
    assert session.idle_seconds(T0 - 5) == 0


# ---- server pings --------------------------------------------------------------------


def test_remembered_server_pings_are_bounded_oldest_first() -> None:
    session = _session()
    for i in range(MAX_REMEMBERED_PINGS + 10):
        session.remember_server_ping(i)
    assert len(session.server_pings) == MAX_REMEMBERED_PINGS
    assert next(iter(session.server_pings)) == 10
    assert list(session.server_pings)[-1] == MAX_REMEMBERED_PINGS + 9


# ---- session ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["a", "!", "~", "0123456789abcdef", "x" * 256, "".join(chr(c) for c in range(0x21, 0x7F))],
)
def test_valid_session_ids(value: str) -> None:
    assert valid_session_id(value)


@pytest.mark.parametrize(
    "value",
    ["", "x" * 257, "a b", "a\x20", "\x7f", "a\x7fb", "\x1f", "tab\t", "é", "a\nb"],
)
def test_invalid_session_ids(value: str) -> None:
    assert not valid_session_id(value)


def test_short_id_never_shows_the_whole_id() -> None:
    assert short("0123456789abcdef") == "01234567…"
    assert _session(id="abcdefghijk").short_id == "abcdefgh…"
