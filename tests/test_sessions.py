"""Unit tests for `sidecar.sessions`: expiry and activity rules on plain data."""

from __future__ import annotations

import pytest

from sidecar.jsonrpc import parse
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


def _session(**kw: object) -> Session:
    fields: dict[str, object] = {
        "id": "s-1",
        "transport": Transport.STREAMABLE_HTTP,
        "client": "ip:127.0.0.1",
        "created_at": T0,
        "last_activity_at": T0,
    }
    fields.update(kw)
    return Session(**fields)  # type: ignore[arg-type]


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


# ---- activity ----------------------------------------------------------------------------


def test_requests_and_notifications_show_use() -> None:
    policy = Policy(idle_timeout=60)
    session = _session()
    assert session.shows_use(parse(b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'), policy)
    assert session.shows_use(parse(b'{"jsonrpc":"2.0","method":"notifications/x"}'), policy)
    # A client ping counts by default (ignore_methods is empty).
    assert session.shows_use(parse(b'{"jsonrpc":"2.0","id":2,"method":"ping"}'), policy)


def test_ignored_methods_do_not_show_use() -> None:
    policy = Policy(idle_timeout=60, ignore_methods=frozenset({"ping"}))
    session = _session()
    assert not session.shows_use(parse(b'{"jsonrpc":"2.0","id":1,"method":"ping"}'), policy)
    mixed = b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"x"}]'
    assert session.shows_use(parse(mixed), policy)


def test_answer_to_a_remembered_server_ping_does_not_count_and_is_consumed() -> None:
    policy = Policy(idle_timeout=60)
    session = _session()
    session.remember_server_ping(5)
    session.remember_server_ping("p-2")
    answer = parse(b'{"jsonrpc":"2.0","id":5,"result":{}}')
    assert not session.shows_use(answer, policy)
    assert list(session.server_pings) == ["p-2"]
    # The id is consumed: a second response with the same id is not a ping answer any more.
    assert session.shows_use(answer, policy)


def test_other_responses_count_as_use() -> None:
    # Answers to sampling, elicitation or roots requests show the client at work.
    policy = Policy(idle_timeout=60)
    session = _session()
    session.remember_server_ping(1)
    assert session.shows_use(parse(b'{"jsonrpc":"2.0","id":2,"result":{}}'), policy)
    assert list(session.server_pings) == [1]


def test_batch_of_ping_answer_and_other_response_counts_and_consumes_the_ping() -> None:
    policy = Policy(idle_timeout=60)
    session = _session()
    session.remember_server_ping(1)
    body = b'[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"result":{}}]'
    assert session.shows_use(parse(body), policy)
    assert not session.server_pings


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
