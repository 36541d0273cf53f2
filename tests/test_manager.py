"""Unit tests for `sidecar.manager`: the session table's decisions, with a clock we control.

A real `Store` on a temporary file and real `Metrics`; only the closer is a double, because
what it must receive (which DELETEs are owed, with what) is exactly what is under test here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from sidecar.errors import StoreError
from sidecar.manager import (
    ANNOUNCE_RUN,
    SWEEP_SLICE,
    LimitReachedError,
    Limits,
    Outcome,
    SessionManager,
)
from sidecar.metrics import Metrics
from sidecar.sessions import CloseReason, Policy, ResumeState, Session, State, Transport
from sidecar.store import PendingClose
from sidecar.store.sqlite import SqliteStore as Store
from tests.fakes import T0, Clock

IDLE = 600.0
EPS = 1e-3
ALICE = "auth:alice"
BOB = "auth:bob"


@dataclass
class FakeCloser:
    scheduled: list[tuple[PendingClose, dict[str, str]]] = field(default_factory=list)

    def schedule(self, pending: PendingClose, credentials: Mapping[str, str]) -> None:
        self.scheduled.append((pending, dict(credentials)))


@dataclass
class Harness:
    manager: SessionManager
    store: Store
    closer: FakeCloser
    clock: Clock
    metrics: Metrics
    path: Path

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as db:
            result = list(db.execute(sql, params))
        db.close()
        return result

    def row(self, session_id: str) -> dict[str, Any]:
        with sqlite3.connect(self.path) as db:
            db.row_factory = sqlite3.Row
            found = db.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        db.close()
        assert found is not None, session_id
        return dict(found)

    def closed_count(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "mcp_sidecar_sessions_closed_total", {"reason": reason}
        )
        return value or 0.0

    async def create(self, session_id: str, identity: str = ALICE, **kw: Any) -> Session:
        kw.setdefault("protocol_version", "2025-06-18")
        return await self.manager.create(session_id, Transport.STREAMABLE_HTTP, identity, **kw)


Factory = Callable[..., Any]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Factory]:
    stores: list[Store] = []

    async def build(
        *,
        policy: Policy | None = None,
        limits: Limits | None = None,
        tombstone_ttl: float = 7 * 86400,
        clock: Clock | None = None,
        path: Path | None = None,
    ) -> Harness:
        db = path or tmp_path / "sessions.db"
        store = Store(str(db))
        await store.open()
        stores.append(store)
        clock = clock or Clock()
        closer = FakeCloser()
        metrics = Metrics()
        manager = SessionManager(
            store,
            closer,  # type: ignore[arg-type]
            metrics,
            policy=policy or Policy(idle_timeout=IDLE),
            limits=limits or Limits(),
            tombstone_ttl=tombstone_ttl,
            clock=clock,
        )
        return Harness(manager, store, closer, clock, metrics, db)

    yield build
    for store in stores:
        await store.close()


# ---- request-time expiry -------------------------------------------------------------------------


async def test_session_just_inside_idle_timeout_resolves_live(make: Factory) -> None:
    h = await make()
    session = await h.create("s1")
    h.clock.now = T0 + IDLE - EPS
    resolution = await h.manager.resolve("s1", ALICE)
    assert resolution.outcome is Outcome.LIVE
    assert resolution.session is session
    assert h.closer.scheduled == []
    assert h.row("s1")["state"] == "live"


async def test_session_just_past_idle_timeout_is_closed_at_request_time_without_a_sweep(
    make: Factory,
) -> None:
    h = await make()
    session = await h.create("s1", credentials={"Authorization": "Bearer t"})
    h.clock.now = T0 + IDLE + EPS
    resolution = await h.manager.resolve("s1", ALICE)
    assert resolution.outcome is Outcome.EXPIRED
    assert resolution.session is None
    assert "s1" not in h.manager.live
    assert session.state is State.CLOSED
    assert session.credentials == {}  # handed to the closer, not kept
    row = h.row("s1")
    assert (row["state"], row["close_reason"], row["closed_at"]) == (
        "closed",
        "idle_timeout",
        T0 + IDLE + EPS,
    )
    assert h.closer.scheduled == [
        (PendingClose("s1", "2025-06-18", 0, T0 + IDLE + EPS), {"Authorization": "Bearer t"})
    ]
    assert h.rows("SELECT session_id, protocol_version, attempts FROM pending_closes") == [
        ("s1", "2025-06-18", 0)
    ]
    assert h.closed_count("idle_timeout") == 1
    # From now on it is a tombstone: still 404, and the client that keeps coming is noted.
    again = await h.manager.resolve("s1", ALICE)
    assert again.outcome is Outcome.EXPIRED
    assert len(h.closer.scheduled) == 1


async def test_activity_postpones_request_time_expiry(make: Factory) -> None:
    h = await make()
    session = await h.create("s1")
    h.clock.now = T0 + IDLE - 1
    h.manager.touch(session)
    h.clock.now = T0 + 2 * IDLE - 2
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.LIVE
    h.clock.now = T0 + 2 * IDLE
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.EXPIRED


async def test_call_in_flight_keeps_a_session_live_and_its_end_is_activity(
    make: Factory,
) -> None:
    h = await make()
    session = await h.create("s1")
    h.manager.begin_call(session)
    h.clock.now = T0 + 4 * IDLE
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.LIVE
    h.manager.end_call(session)
    assert session.in_flight == 0
    assert session.last_activity_at == T0 + 4 * IDLE
    h.clock.now = T0 + 5 * IDLE - EPS
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.LIVE


async def test_max_lifetime_closes_with_its_own_reason(make: Factory) -> None:
    h = await make(policy=Policy(idle_timeout=IDLE, max_lifetime=100))
    session = await h.create("s1")
    h.clock.now = T0 + 99
    h.manager.touch(session)
    h.clock.now = T0 + 100
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.EXPIRED
    assert h.row("s1")["close_reason"] == "max_lifetime"


# ---- binding, unknown and closed ids -------------------------------------------------------------


async def test_other_identity_gets_binding_and_the_session_is_untouched(make: Factory) -> None:
    h = await make()
    session = await h.create("s1", ALICE)
    resolution = await h.manager.resolve("s1", BOB)
    assert resolution.outcome is Outcome.BINDING
    assert resolution.session is None
    assert session.live
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.LIVE


async def test_bind_to_none_lets_any_identity_use_the_session(make: Factory) -> None:
    h = await make(limits=Limits(bind_to="none"))
    session = await h.create("s1", ALICE)
    resolution = await h.manager.resolve("s1", BOB)
    assert resolution.outcome is Outcome.LIVE
    assert resolution.session is session


async def test_unknown_id_is_unknown(make: Factory) -> None:
    h = await make()
    assert (await h.manager.resolve("never-seen", ALICE)).outcome is Outcome.UNKNOWN
    assert h.manager.stuck.snapshot() == []


async def test_tombstoned_id_is_expired_and_the_client_is_recorded_as_stuck(
    make: Factory,
) -> None:
    h = await make()
    session = await h.create("s1", user_agent="python-httpx/0.28", client_info="ide 1.0")
    await h.manager.close(session, CloseReason.ADMIN)
    assert "s1" in h.manager.tombstones
    for step in range(3):
        h.clock.now = T0 + 10 + step
        assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.EXPIRED
    assert h.manager.stuck.snapshot() == [
        {
            "client": "python-httpx/0.28 (ide 1.0)",
            "requests": 3,
            "sessions": 1,
            "first_seen": T0 + 10,
            "last_seen": T0 + 12,
        }
    ]


async def test_recreating_a_tombstoned_id_makes_it_live_again(make: Factory) -> None:
    h = await make()
    session = await h.create("s1")
    await h.manager.close(session, CloseReason.ADMIN)
    await h.create("s1")
    assert "s1" not in h.manager.tombstones
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.LIVE


async def test_tombstones_in_memory_are_capped_oldest_first_and_stay_in_the_store(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sidecar.tombstones.MAX_TOMBSTONES_IN_MEMORY", 3)
    h = await make()
    for n in range(5):
        h.clock.now = T0 + n
        await h.manager.close(await h.create(f"s{n}"), CloseReason.ADMIN)
    assert list(h.manager.tombstones) == ["s2", "s3", "s4"]
    # A forgotten id is answered as unknown: the same 404 under unknown = "reject".
    assert (await h.manager.resolve("s0", ALICE)).outcome is Outcome.UNKNOWN
    assert (await h.manager.resolve("s4", ALICE)).outcome is Outcome.EXPIRED
    assert h.row("s0")["state"] == "closed"


# ---- closing -------------------------------------------------------------------------------------


class _Relay:
    def __init__(self) -> None:
        self.long_lived = True
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


async def test_close_aborts_relays_and_commits_before_returning(make: Factory) -> None:
    h = await make()
    session = await h.create("s1")
    relays = [_Relay(), _Relay()]
    session.relays.update(relays)
    await h.manager.close(session, CloseReason.CLIENT_DELETE, upstream_done=True)
    assert [r.aborted for r in relays] == [1, 1]
    assert session.relays == set()
    assert h.row("s1")["close_reason"] == "client_delete"
    assert h.closer.scheduled == []  # the client's own DELETE already reached the upstream
    assert h.rows("SELECT * FROM pending_closes") == []
    # Closing twice does nothing more.
    await h.manager.close(session, CloseReason.ADMIN)
    assert h.row("s1")["close_reason"] == "client_delete"
    assert h.closed_count("client_delete") == 1
    assert h.closed_count("admin") == 0


async def test_upstream_gone_and_legacy_sessions_owe_no_upstream_delete(make: Factory) -> None:
    h = await make()
    gone = await h.create("s1")
    legacy = await h.manager.create("s2", Transport.SSE, ALICE, protocol_version="2024-11-05")
    await h.manager.close(gone, CloseReason.UPSTREAM_GONE)
    await h.manager.close(legacy, CloseReason.ADMIN)
    assert h.closer.scheduled == []
    assert h.rows("SELECT * FROM pending_closes") == []


# ---- limits --------------------------------------------------------------------------------------


async def test_concurrent_creations_share_commits_and_each_is_on_disk_when_it_returns(
    make: Factory,
) -> None:
    h = await make()
    await h.create("first")  # the first commit runs alone; the others queue behind it
    before = h.store.transactions

    async def create_then_read(session_id: str) -> list[tuple[Any, ...]]:
        await h.create(session_id)
        return h.rows("SELECT id, state FROM sessions WHERE id=?", (session_id,))

    ids = [f"group-{i:02d}" for i in range(64)]
    found = await asyncio.gather(*(create_then_read(i) for i in ids))
    assert found == [[(i, "live")] for i in ids]
    assert h.store.transactions - before < len(ids)


def _tracked(h: Harness, session_id: str) -> tuple[bool, bool]:
    """Whether the session is in memory, and whether the store has its row."""
    stored = h.rows("SELECT id FROM sessions WHERE id=?", (session_id,))
    return session_id in h.manager.live, stored == [(session_id,)]


async def _cancelled_mid_way(h: Harness, session_id: str, turns: int) -> None:
    """Create `session_id` and cancel its caller after `turns` loop turns, then let every
    write queued meanwhile end (a later creation's commit comes after that group's)."""
    task = asyncio.create_task(h.create(session_id))
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(StoreError):  # refused if it shared the group of a refused row
        await h.create("after")


@pytest.mark.parametrize("turns", range(8))
async def test_a_creation_whose_caller_is_cancelled_is_tracked_in_memory_and_store_or_neither(
    make: Factory, turns: int
) -> None:
    """A client that disconnects during the insert must not leave its session in the store
    but not in memory (it would never expire nor be DELETEd upstream), nor the reverse."""
    h = await make()
    await h.create("first")  # a commit under way, so that later inserts wait in the queue
    await _cancelled_mid_way(h, "s1", turns)
    assert _tracked(h, "s1") in ((True, True), (False, False))
    if turns > 0:  # once started, the insert is queued: the session is created whole
        assert _tracked(h, "s1") == (True, True)
        assert h.manager.admission.per_client[ALICE] == 3


@pytest.mark.parametrize("turns", range(1, 6))
async def test_a_failed_insert_whose_caller_is_cancelled_leaves_the_session_nowhere(
    make: Factory, turns: int
) -> None:
    h = await make()
    with sqlite3.connect(h.path) as db:  # the store refuses this one row, as a full disk would
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON sessions WHEN NEW.id = 's1' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    db.close()
    await _cancelled_mid_way(h, "s1", turns)
    assert _tracked(h, "s1") == (False, False)
    await h.create("later")  # and the store still works
    assert _tracked(h, "later") == (True, True)


async def _admitted(h: Harness, session_id: str, identity: str = ALICE) -> Session:
    await h.manager.admit(identity)
    try:
        return await h.create(session_id, identity)
    finally:
        h.manager.release(identity)


async def test_reject_at_max_sessions_raises_and_closes_nothing(make: Factory) -> None:
    h = await make(limits=Limits(max_sessions=2))
    await _admitted(h, "s1")
    await _admitted(h, "s2", BOB)
    with pytest.raises(LimitReachedError) as caught:
        await h.manager.admit("auth:carol")
    assert caught.value.scope == "max_sessions"
    assert set(h.manager.live) == {"s1", "s2"}
    assert h.closer.scheduled == []


async def test_admitted_but_unanswered_initializes_count_towards_the_limit(
    make: Factory,
) -> None:
    h = await make(limits=Limits(max_sessions=1))
    await h.manager.admit(ALICE)
    with pytest.raises(LimitReachedError):
        await h.manager.admit(BOB)
    h.manager.release(ALICE)
    await h.manager.admit(BOB)
    h.manager.release(BOB)


async def test_an_initialize_admitted_with_no_limit_counts_once_a_reload_sets_one(
    make: Factory,
) -> None:
    """With no limit `admit` checks nothing, but it still reserves: a limit a reload sets
    while that initialize is unanswered counts it, for all and for its client."""
    h = await make()
    await h.manager.admit(ALICE)
    h.manager.limits = Limits(max_sessions=1)
    with pytest.raises(LimitReachedError):
        await h.manager.admit(BOB)
    h.manager.limits = Limits(max_sessions_per_client=1)
    with pytest.raises(LimitReachedError):
        await h.manager.admit(ALICE)
    h.manager.release(ALICE)
    await h.manager.admit(ALICE)
    h.manager.release(ALICE)


async def test_one_clients_pending_initializes_do_not_count_against_another_client(
    make: Factory,
) -> None:
    h = await make(limits=Limits(max_sessions_per_client=1))
    await h.manager.admit(ALICE)
    await h.manager.admit(BOB)  # Alice's pending initialize is hers alone
    with pytest.raises(LimitReachedError) as caught:
        await h.manager.admit(ALICE)
    assert caught.value.scope == "max_sessions_per_client"
    h.manager.release(ALICE)
    h.manager.release(BOB)


@pytest.mark.parametrize("on_limit", ["reject", "evict_idle"])
async def test_concurrent_initializes_at_the_limit_never_overshoot_it(
    make: Factory, on_limit: Literal["reject", "evict_idle"]
) -> None:
    """Admission is atomic with its eviction: however the admits interleave, live sessions
    plus pending initializes never exceed max_sessions or max_sessions_per_client."""
    h = await make(limits=Limits(max_sessions=4, max_sessions_per_client=3, on_limit=on_limit))
    for n, who in enumerate((ALICE, ALICE, BOB, BOB)):
        await _admitted(h, f"old{n}", who)
        h.clock.now += 1
    clients = [ALICE, BOB, "auth:carol"] * 6
    admitted: list[str] = []

    async def attempt(who: str) -> None:
        try:
            await h.manager.admit(who)
        except LimitReachedError:
            return
        admitted.append(who)

    await asyncio.gather(*(attempt(who) for who in clients))
    assert len(h.manager.live) + len(admitted) <= 4
    for who in (ALICE, BOB, "auth:carol"):
        mine = sum(1 for s in h.manager.live.values() if s.client == who)
        assert mine + admitted.count(who) <= 3
    if on_limit == "reject":
        assert admitted == []
    else:
        assert admitted  # evicting made room
    for who in admitted:
        h.manager.release(who)


async def test_evict_idle_closes_the_least_recently_active_non_persistent_idle_session(
    make: Factory,
) -> None:
    h = await make(limits=Limits(max_sessions=4, on_limit="evict_idle"))
    oldest_persistent = await _admitted(h, "persistent")
    await h.manager.set_persistent(oldest_persistent, True)
    h.clock.now += 1
    busy = await _admitted(h, "busy")
    h.manager.begin_call(busy)
    h.clock.now += 1
    victim = await _admitted(h, "victim")
    h.clock.now += 1
    recent = await _admitted(h, "recent")
    h.clock.now += 1
    await _admitted(h, "new", BOB)
    assert victim.state is State.CLOSED
    assert h.row("victim")["close_reason"] == "evicted"
    assert [p.session_id for p, _ in h.closer.scheduled] == ["victim"]
    assert set(h.manager.live) == {"persistent", "busy", "recent", "new"}
    assert recent.live
    assert h.closed_count("evicted") == 1


async def test_evict_idle_with_no_candidate_rejects(make: Factory) -> None:
    h = await make(limits=Limits(max_sessions=2, on_limit="evict_idle"))
    pinned = await _admitted(h, "pinned")
    await h.manager.set_persistent(pinned, True)
    busy = await _admitted(h, "busy")
    h.manager.begin_call(busy)
    with pytest.raises(LimitReachedError):
        await h.manager.admit(BOB)
    assert set(h.manager.live) == {"pinned", "busy"}


async def test_per_client_limit_applies_to_that_client_only(make: Factory) -> None:
    h = await make(limits=Limits(max_sessions_per_client=1))
    await _admitted(h, "a1", ALICE)
    with pytest.raises(LimitReachedError) as caught:
        await h.manager.admit(ALICE)
    assert caught.value.scope == "max_sessions_per_client"
    await _admitted(h, "b1", BOB)
    # Closing frees the slot.
    await h.manager.close(h.manager.live["a1"], CloseReason.ADMIN)
    await _admitted(h, "a2", ALICE)
    assert set(h.manager.live) == {"b1", "a2"}


async def test_per_client_eviction_takes_the_clients_own_session(make: Factory) -> None:
    h = await make(limits=Limits(max_sessions_per_client=1, on_limit="evict_idle"))
    await _admitted(h, "b1", BOB)  # older, but another client's
    h.clock.now += 1
    await _admitted(h, "a1", ALICE)
    h.clock.now += 1
    await _admitted(h, "a2", ALICE)
    assert set(h.manager.live) == {"b1", "a2"}
    assert h.row("a1")["close_reason"] == "evicted"


# ---- write-behind --------------------------------------------------------------------------------


async def test_ten_thousand_touches_are_one_flush_transaction(make: Factory) -> None:
    h = await make()
    sessions = [await h.create(f"s{i:02d}") for i in range(50)]
    before = h.store.transactions
    for n in range(10_000):
        h.clock.now = T0 + 1 + n * 0.01
        session = sessions[n % 50]
        h.manager.touch(session)
        h.manager.count_request(session)
    assert h.store.transactions == before  # nothing written on the request path
    assert await h.manager.flush() == 50
    assert h.store.transactions == before + 1
    rows = h.rows("SELECT id, last_activity_at, requests FROM sessions ORDER BY id")
    assert len(rows) == 50
    for i, (session_id, last_activity, requests) in enumerate(rows):
        last_n = 9_950 + i  # the last touch of session i
        assert session_id == f"s{i:02d}"
        assert last_activity == pytest.approx(T0 + 1 + last_n * 0.01, abs=1e-6)
        assert last_activity == sessions[i].last_activity_at
        assert requests == 1 + 200
    # Nothing dirty any more: no transaction at all.
    assert await h.manager.flush() == 0
    assert h.store.transactions == before + 1
    flushes = h.metrics.registry.get_sample_value("mcp_sidecar_store_flush_duration_seconds_count")
    assert flushes == 1


async def test_the_dirty_marks_are_never_walked_by_the_garbage_collector(make: Factory) -> None:
    """Every young collection walked a tracked container of the dirty ids whole: up to
    100,000 of them after a burst, several times a flush. A map of strings is not tracked."""
    h = await make()
    sessions = [await h.create(f"s{i:02d}") for i in range(20)]
    for session in sessions:
        h.manager.touch(session)
        h.manager.note_setup(session, ResumeState({"protocolVersion": "2025-06-18"}))
    dirty = (h.manager._dirty, h.manager._resume_dirty)
    assert all(len(ids) == 20 for ids in dirty)
    assert not any(gc.is_tracked(ids) for ids in dirty)
    assert await h.manager.flush() == 20
    assert not any(gc.is_tracked(ids) for ids in (h.manager._dirty, h.manager._resume_dirty))


async def test_flush_with_nothing_dirty_writes_nothing(make: Factory) -> None:
    h = await make()
    await h.create("s1")
    before = h.store.transactions
    assert await h.manager.flush() == 0
    assert h.store.transactions == before


async def test_flush_skips_sessions_closed_since_they_were_touched(make: Factory) -> None:
    h = await make()
    a = await h.create("a")
    b = await h.create("b")
    h.clock.now = T0 + 5
    h.manager.touch(a)
    h.manager.touch(b)
    await h.manager.close(b, CloseReason.ADMIN)
    assert await h.manager.flush() == 1
    assert h.rows("SELECT id, last_activity_at FROM sessions ORDER BY id") == [
        ("a", T0 + 5),
        ("b", T0 + 5),
    ]


# ---- sweep and persistence flags -----------------------------------------------------------------


async def test_sweep_closes_only_expired_sessions(make: Factory) -> None:
    h = await make(policy=Policy(idle_timeout=IDLE, max_lifetime=10 * IDLE))
    await h.create("idle")
    pinned = await h.create("pinned")
    await h.manager.set_persistent(pinned, True)
    busy = await h.create("busy")
    h.manager.begin_call(busy)
    h.clock.now = T0 + IDLE - 10
    fresh = await h.create("fresh")
    h.clock.now = T0 + IDLE + EPS
    assert await h.manager.sweep() == 1
    assert set(h.manager.live) == {"pinned", "busy", "fresh"}
    assert h.row("idle")["close_reason"] == "idle_timeout"
    assert [p.session_id for p, _ in h.closer.scheduled] == ["idle"]
    assert fresh.live
    h.clock.now = T0 + 10 * IDLE
    assert await h.manager.sweep() == 2  # busy hits max_lifetime; fresh is idle
    assert h.row("busy")["close_reason"] == "max_lifetime"
    assert h.row("fresh")["close_reason"] == "idle_timeout"
    assert set(h.manager.live) == {"pinned"}
    assert await h.manager.sweep() == 0


async def test_a_mass_expiry_lets_other_tasks_run_between_short_runs_of_closes(
    make: Factory,
) -> None:
    """Ending thousands of sessions at once must not hold the event loop: a task beside the
    sweep gets turns while the closes are being announced, at most ANNOUNCE_RUN apart, the
    hook between slices runs after each slice, and every session still ends once with its
    DELETE owed."""
    h = await make()
    count = 3 * SWEEP_SLICE + 7
    await asyncio.gather(*(h.create(f"s{i}") for i in range(count)))
    turns = 0
    seen: list[int] = []  # the other task's turns as each close was announced
    h.manager.close_listeners.append(lambda session, reason, now: seen.append(turns))
    slices: list[int] = []
    h.manager.between_slices = lambda: slices.append(len(seen))

    async def beside() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(beside())
    try:
        h.clock.now = T0 + IDLE + EPS
        assert await h.manager.sweep() == count
    finally:
        task.cancel()
    assert len(seen) == count
    assert h.manager.live == {}
    assert len(h.closer.scheduled) == count
    longest = max(len(list(run)) for _, run in itertools.groupby(seen))
    assert longest <= ANNOUNCE_RUN
    # The server freezes the heap between slices (heap.settle): once after each store write.
    assert slices == [SWEEP_SLICE, 2 * SWEEP_SLICE, 3 * SWEEP_SLICE, count]


async def test_sweep_forgets_tombstones_past_their_ttl(make: Factory) -> None:
    h = await make(tombstone_ttl=100)
    session = await h.create("s1")
    await h.manager.close(session, CloseReason.ADMIN)
    h.clock.now = T0 + 100
    await h.manager.sweep()
    assert "s1" in h.manager.tombstones
    h.clock.now = T0 + 101
    await h.manager.sweep()
    assert "s1" not in h.manager.tombstones
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.UNKNOWN


async def test_set_persistent_is_written_and_stops_expiry(make: Factory) -> None:
    h = await make()
    session = await h.create("s1")
    await h.manager.set_persistent(session, True)
    assert h.row("s1")["persistent"] == 1
    h.clock.now = T0 + 100 * IDLE
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.LIVE
    await h.manager.set_persistent(session, False)
    assert h.row("s1")["persistent"] == 0
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.EXPIRED


async def test_persistent_default_applies_to_new_sessions(make: Factory) -> None:
    h = await make(limits=Limits(persistent_default=True))
    session = await h.create("s1")
    assert session.persistent
    assert h.row("s1")["persistent"] == 1


# ---- restore -------------------------------------------------------------------------------------


async def test_restore_picks_up_where_the_last_run_left_off(make: Factory, tmp_path: Path) -> None:
    path = tmp_path / "restart.db"
    first = await make(path=path, tombstone_ttl=1000)
    live = await first.create("live")
    await first.create("stale")
    await first.manager.create("legacy", Transport.SSE, ALICE, protocol_version="2024-11-05")
    pinned = await first.create("pinned")
    await first.manager.set_persistent(pinned, True)
    tomb = await first.create("tomb")
    await first.manager.close(tomb, CloseReason.ADMIN)
    ancient = await first.create("ancient")
    await first.manager.close(ancient, CloseReason.ADMIN)
    # An upstream DELETE still owed from the last run, with its retry count.
    await first.store.save_pending(PendingClose("tomb", "2025-06-18", 4, T0 + 30))
    await first.store.drop_pending(PendingClose("ancient", None, 0, T0))
    first.clock.now = T0 + IDLE - 10
    first.manager.touch(live)
    await first.manager.flush()
    await first.store.close()

    # Down for a while: "stale" expired meanwhile, "live" did not, "ancient"'s tombstone aged out.
    clock = Clock(T0 + IDLE + 60)
    second = await make(path=path, tombstone_ttl=2 * IDLE, clock=clock)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE sessions SET closed_at=? WHERE id='ancient'", (T0 - 2 * IDLE,))
    db.close()
    await second.manager.restore()
    m = second.manager

    assert set(m.live) == {"live", "pinned"}
    restored = m.live["live"]
    assert restored.last_activity_at == T0 + IDLE - 10
    assert restored.protocol_version == "2025-06-18"
    assert (await m.resolve("live", ALICE)).outcome is Outcome.LIVE

    stale = second.row("stale")
    assert (stale["state"], stale["close_reason"], stale["closed_at"]) == (
        "closed",
        "idle_timeout",
        clock.now,
    )
    legacy = second.row("legacy")
    assert (legacy["state"], legacy["close_reason"]) == ("closed", "restart")

    scheduled = sorted(
        (p.session_id, p.protocol_version, p.attempts) for p, _ in second.closer.scheduled
    )
    # The expired session's DELETE is owed now; the old pending close resumes with its count;
    # the legacy session owes none (its stream died with the old process). Each exactly once.
    assert scheduled == [("stale", "2025-06-18", 0), ("tomb", "2025-06-18", 4)]
    assert all(credentials == {} for _, credentials in second.closer.scheduled)
    assert sorted(r[0] for r in second.rows("SELECT session_id FROM pending_closes")) == [
        "stale",
        "tomb",
    ]

    assert set(m.tombstones) == {"tomb", "stale", "legacy"}
    assert m.tombstones["tomb"].reason is CloseReason.ADMIN
    for session_id in ("tomb", "stale", "legacy"):
        assert (await m.resolve(session_id, ALICE)).outcome is Outcome.EXPIRED
    assert (await m.resolve("ancient", ALICE)).outcome is Outcome.UNKNOWN
    assert second.closed_count("idle_timeout") == 1
    assert second.closed_count("restart") == 1
    assert m.health_counts()["live"] == 2
    assert m.health_counts()["persistent"] == 1
