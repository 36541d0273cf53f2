"""The sweeper's deadline index (`sidecar.deadlines`) and the rule it must keep: a sweep ends
exactly the sessions a walk over all of them would end, with a clock we control.

The manager runs on the in-memory store; the property test drives it with random activity,
calls, pins, hibernation, resumes and reloads, and after every sweep compares with the rule
itself (`Session.expiry_reason` over every session).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.deadlines import Bucket, Deadlines
from sidecar.manager import Limits, SessionManager
from sidecar.metrics import Metrics
from sidecar.sessions import Binding, Dormant, Policy, ResumeState, Session, State, Transport
from sidecar.store.memory import MemoryStore
from tests.fakes import Clock, FakeCloser

IDLE = 100.0


@dataclass
class Item:
    name: str
    due: Bucket | None = None


def test_an_item_is_due_once_when_its_second_has_begun() -> None:
    deadlines = Deadlines()
    early, late = Item("early"), Item("late")
    deadlines.schedule(early, 10.5)
    deadlines.schedule(late, 20.0)
    assert deadlines.pop_due(9.99) == []
    assert deadlines.pop_due(10.0) == [early]
    assert deadlines.pop_due(10.9) == []
    assert deadlines.pop_due(25.0) == [late]
    assert deadlines.next_due() is None


def test_scheduling_later_keeps_the_earlier_entry_and_earlier_moves_it() -> None:
    deadlines = Deadlines()
    item = Item("a")
    deadlines.schedule(item, 50.0)
    deadlines.schedule(item, 80.0)  # a lower bound already filed: nothing to do
    assert deadlines.next_due() == 50.0
    deadlines.schedule(item, 20.0)
    assert deadlines.pop_due(30.0) == [item]
    assert deadlines.pop_due(100.0) == []  # the entry left at 50 was stale


def test_an_unscheduled_item_is_never_due() -> None:
    deadlines = Deadlines()
    item = Item("a")
    deadlines.schedule(item, 5.0)
    deadlines.unschedule(item)
    assert deadlines.pop_due(10.0) == []


# ---- the manager against the rule ----------------------------------------------------------


OPS = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("touch"), st.integers(0, 2)),
    st.tuples(st.just("begin_call"), st.integers(0, 2)),
    st.tuples(st.just("end_call"), st.integers(0, 2)),
    st.tuples(st.just("abandon_call"), st.integers(0, 2)),
    st.tuples(st.just("pin"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("resume"), st.integers(0, 2)),
    # Time moves, then the sweeper runs: the way the sidecar sees time pass.
    st.tuples(st.just("advance"), st.floats(0.0, 2.5 * IDLE)),
    st.tuples(st.just("reload"), st.sampled_from([IDLE / 2, IDLE, 2 * IDLE])),
)


def _manager(hibernate: bool, lifetime: float) -> tuple[SessionManager, Clock]:
    clock = Clock()
    policy = Policy(
        idle_timeout=IDLE,
        max_lifetime=lifetime,
        idle_action="hibernate" if hibernate else "close",
        dormant_ttl=3 * IDLE,
    )
    manager = SessionManager(
        MemoryStore(),
        FakeCloser(),  # type: ignore[arg-type]
        Metrics(),
        policy=policy,
        limits=Limits(),
        tombstone_ttl=10 * IDLE,
        clock=clock,
    )
    return manager, clock


async def _apply(manager: SessionManager, clock: Clock, op: tuple[object, ...]) -> None:
    kind = op[0]
    sessions = {**{s.id: s for s in manager.dormant}, **manager.live}
    target = sessions.get(f"s{op[1]}") if len(op) > 1 and kind != "advance" else None
    if kind == "create" and f"s{op[1]}" not in sessions:
        resume = ResumeState({"protocolVersion": "2025-06-18"}) if op[2] else None
        await manager.create(
            f"s{op[1]}", Transport.STREAMABLE_HTTP, "alice", protocol_version=None, resume=resume
        )
    elif kind == "advance":
        clock.now += float(op[1])  # type: ignore[arg-type]
        await _sweep_and_check(manager, clock)
    elif kind == "reload":
        manager.policy = replace(manager.policy, idle_timeout=float(op[1]))  # type: ignore[arg-type]
    elif target is not None:
        if isinstance(target, Dormant):  # held compact: whole once a request names it
            target = await manager.find(target.id)
        if target is not None:
            await _act(manager, target, op)


async def _act(manager: SessionManager, session: Session, op: tuple[object, ...]) -> None:
    kind = op[0]
    if kind == "resume" and session.dormant:
        await manager.rebind(session, Binding("", f"{session.id}-again"), "hibernated")
    elif not session.live:
        return  # the request path refuses or resumes a dormant id before anything else
    elif kind == "touch":
        manager.touch(session)
    elif kind == "begin_call":
        manager.begin_call(session)
    elif kind == "end_call" and session.in_flight:
        manager.end_call(session)
    elif kind == "abandon_call" and session.in_flight:
        manager.abandon_call(session)
    elif kind == "pin":
        await manager.set_persistent(session, bool(op[2]))


async def _sweep_and_check(manager: SessionManager, clock: Clock) -> None:
    now = clock.now
    before = [*manager.live.values(), *manager.dormant]
    expired = {s.id for s in before if s.expiry_reason(manager.policy, now) is not None}
    # By id, as the manager holds it: a dormant session may be a compact record, and its
    # close reads the whole one back (a new object) before closing it.
    states = {s.id: _state(manager, s.id) for s in before}
    await manager.sweep()
    for session in before:
        changed = _state(manager, session.id) is not states[session.id]
        assert changed == (session.id in expired), (session, now)
    for session in [*manager.live.values(), *manager.dormant]:
        assert session.expiry_reason(manager.policy, now) is None, (session, now)
    assert all(_state(manager, s.id) is not None for s in before)  # live, dormant or closed


def _state(manager: SessionManager, session_id: str) -> State | None:
    if session_id in manager.live:
        return State.LIVE
    if manager.dormant.get(session_id) is not None:
        return State.DORMANT
    return State.CLOSED if session_id in manager.tombstones else None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(OPS, max_size=80),
    hibernate=st.booleans(),
    lifetime=st.sampled_from([0.0, 3 * IDLE]),
)
def test_every_sweep_ends_exactly_the_sessions_past_their_deadline(
    ops: list[tuple[object, ...]], hibernate: bool, lifetime: float
) -> None:
    async def scenario() -> None:
        manager, clock = _manager(hibernate, lifetime)
        for op in ops:
            await _apply(manager, clock, op)
        await _sweep_and_check(manager, clock)

    asyncio.run(scenario())
