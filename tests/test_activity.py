"""Unit tests for `sidecar.activity`: what a client message means for its session's clock.

`classify` is pure: it reports answers to relayed server pings but forgets nothing; the
manager's `note_use` does that (tested here too, on an in-memory store).
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.activity import classify
from sidecar.jsonrpc import parse
from sidecar.manager import Limits, SessionManager
from sidecar.metrics import Metrics
from sidecar.sessions import Policy, Session, Transport
from sidecar.store import PendingClose
from sidecar.store.memory import MemoryStore

POLICY = Policy(idle_timeout=60)


def test_requests_and_notifications_show_use() -> None:
    assert classify(parse(b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'), POLICY, ()).counts
    assert classify(parse(b'{"jsonrpc":"2.0","method":"notifications/x"}'), POLICY, ()).counts
    # A client ping counts by default (ignore_methods is empty).
    assert classify(parse(b'{"jsonrpc":"2.0","id":2,"method":"ping"}'), POLICY, ()).counts


def test_requests_are_calls_and_notifications_are_not() -> None:
    body = b'[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","method":"n"}]'
    assert classify(parse(body), POLICY, ()).calls == (1,)


def test_ignored_methods_do_not_show_use_nor_make_calls() -> None:
    policy = Policy(idle_timeout=60, ignore_methods=frozenset({"ping"}))
    ping = classify(parse(b'{"jsonrpc":"2.0","id":1,"method":"ping"}'), policy, ())
    assert (ping.counts, ping.calls) == (False, ())
    mixed = b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"x"}]'
    use = classify(parse(mixed), policy, ())
    assert (use.counts, use.calls) == (True, (2,))


def test_answer_to_a_remembered_server_ping_does_not_count_and_is_reported() -> None:
    pings = {5: None, "p-2": None}
    use = classify(parse(b'{"jsonrpc":"2.0","id":5,"result":{}}'), POLICY, pings)
    assert (use.counts, use.ping_answers) == (False, (5,))
    assert list(pings) == [5, "p-2"]  # classify forgets nothing: it is a question, not an act


def test_other_responses_count_as_use() -> None:
    # Answers to sampling, elicitation or roots requests show the client at work.
    use = classify(parse(b'{"jsonrpc":"2.0","id":2,"result":{}}'), POLICY, {1: None})
    assert (use.counts, use.ping_answers) == (True, ())


def test_malformed_bodies_never_count() -> None:
    assert not classify(parse(b"{not json"), POLICY, ()).counts


class _Closer:
    def schedule(self, pending: PendingClose, credentials: Mapping[str, str]) -> None:
        raise AssertionError("nothing is closed here")


async def _manager_with_session() -> tuple[SessionManager, Session]:
    clock = [1000.0]
    manager = SessionManager(
        MemoryStore(),
        _Closer(),  # type: ignore[arg-type]
        Metrics(),
        policy=POLICY,
        limits=Limits(),
        tombstone_ttl=60,
        clock=lambda: clock[0],
    )
    session = await manager.create(
        "s-1", Transport.STREAMABLE_HTTP, "ip:1", protocol_version="2025-06-18"
    )
    return manager, session


async def test_the_manager_forgets_answered_pings_and_moves_the_clock_only_on_use() -> None:
    manager, session = await _manager_with_session()
    manager.remember_server_ping(session, 1)
    manager.remember_server_ping(session, 2)
    before = session.last_activity_at
    manager.clock = lambda: before + 30
    answer = parse(b'[{"jsonrpc":"2.0","id":1,"result":{}}]')
    manager.note_use(session, classify(answer, POLICY, session.server_pings))
    assert list(session.server_pings) == [2]
    assert session.last_activity_at == before
    # The id is consumed: the same answer again is no longer a ping answer, so it counts.
    manager.note_use(session, classify(answer, POLICY, session.server_pings))
    assert session.last_activity_at == before + 30
