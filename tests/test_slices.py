"""Large flushes, sweeps and mass closes are done in bounded slices that yield to the loop.

At 100,000 sessions any of them done in one go holds the event loop for tens or hundreds of
milliseconds (`bench/stalls.py` measures it). What is pinned here is the behaviour that keeps
it short, never a duration: the work is cut into bounded batches, another task gets a turn
between them (counted by that task itself), and nothing is lost or done twice on the way:
every row reaches the store in one transaction, every session is closed and owes its
DELETE once, even when a request or a cancellation falls between two runs.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.deadlines import Bucket, Deadlines
from sidecar.manager import ANNOUNCE_RUN, FLUSH_RUN, SWEEP_SLICE, Limits, Outcome, SessionManager
from sidecar.metrics import Metrics
from sidecar.pacing import TURN_BUDGET, Pacing
from sidecar.sessions import CloseReason, Policy, Session, State, Transport
from sidecar.store import ActivityRow, PendingClose
from sidecar.store.redis import FLUSH_SLICE as REDIS_FLUSH_SLICE
from sidecar.store.redis import RedisStore
from sidecar.store.sqlite import FLUSH_SLICE, SqliteStore
from tests.fakes import T0, Clock, FakeCloser
from tests.peers.redis_server import RedisServer
from tests.test_pacing import Ticks

IDLE = 600.0
ALICE = "auth:alice"


@dataclass
class Turns:
    """A task beside the work under test, counting its own turns on the loop."""

    count: int = 0

    async def run(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)


@pytest.fixture
async def turns() -> AsyncIterator[Turns]:
    beside = Turns()
    task = asyncio.create_task(beside.run())
    yield beside
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@dataclass
class Harness:
    manager: SessionManager
    store: SqliteStore
    closer: FakeCloser
    clock: Clock
    path: Path

    async def create(self, count: int) -> list[Session]:
        return list(
            await asyncio.gather(
                *(
                    self.manager.create(
                        f"s{i:05d}", Transport.STREAMABLE_HTTP, ALICE, protocol_version="2025-06-18"
                    )
                    for i in range(count)
                )
            )
        )

    def column(self, sql: str) -> list[object]:
        with sqlite3.connect(self.path) as db:
            values = [row[0] for row in db.execute(sql)]
        db.close()
        return values


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    path = tmp_path / "sessions.db"
    store = SqliteStore(str(path))
    await store.open()
    clock = Clock()
    closer = FakeCloser()
    manager = SessionManager(
        store,
        closer,  # type: ignore[arg-type]
        Metrics(),
        policy=Policy(idle_timeout=IDLE),
        limits=Limits(),
        tombstone_ttl=7 * 86400,
        clock=clock,
    )
    yield Harness(manager, store, closer, clock, path)
    await store.close()


def _record_turns_at(turns: Turns) -> tuple[list[int], Callable[[], None]]:
    """A `between_slices` hook noting the other task's turn count at each slice's end."""
    seen: list[int] = []
    return seen, lambda: seen.append(turns.count)


# ---- the activity flush ------------------------------------------------------------------------


async def test_a_large_flush_is_built_in_runs_with_turns_between_and_written_in_one_transaction(
    harness: Harness, turns: Turns
) -> None:
    count = 3 * FLUSH_RUN + 5
    sessions = await harness.create(count)
    harness.clock.now = T0 + 10
    for session in sessions:
        harness.manager.touch(session)
    seen, hook = _record_turns_at(turns)
    harness.manager.between_slices = hook
    before = harness.store.transactions

    assert await harness.manager.flush() == count

    assert len(seen) == math.ceil(count / FLUSH_RUN)
    # The other task ran between every two runs (its count moved each time).
    assert all(later > earlier for earlier, later in itertools.pairwise(seen))
    assert harness.store.transactions == before + 1  # SPEC 2.6: one commit per flush
    assert set(harness.column("SELECT last_activity_at FROM sessions")) == {T0 + 10}


async def test_the_sqlite_flush_is_bounded_statements_in_one_transaction(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "sessions.db"))
    await store.open()
    try:
        count = 2 * FLUSH_SLICE + 3
        for first in range(0, count, 500):
            await asyncio.gather(
                *(
                    store.insert(_session(f"s{i:05d}"))
                    for i in range(first, min(count, first + 500))
                )
            )
        statements: list[str] = []
        await store.db.set_trace_callback(statements.append)
        await store.write_activity(
            [ActivityRow(f"s{i:05d}", T0 + 5, 7, None) for i in range(count)]
        )
        await store.db.set_trace_callback(None)
        updates = [s for s in statements if s.lstrip().startswith("UPDATE sessions AS s")]
        assert len(updates) == math.ceil(count / FLUSH_SLICE)
        assert sum(1 for s in statements if s == "COMMIT") == 1
        loaded = await store.load(State.LIVE)
        assert {(s.last_activity_at, s.requests) for s in loaded} == {(T0 + 5, 7)}
        assert len(loaded) == count
    finally:
        await store.close()


async def test_the_redis_flush_is_encoded_in_slices_with_turns_between_and_sent_once(
    redis_server: RedisServer, turns: Turns
) -> None:
    store = RedisStore(redis_server.url, key_prefix="slices:")
    await store.open()
    try:
        count = 2 * REDIS_FLUSH_SLICE + 3
        for i in range(count):
            await store.insert(_session(f"s{i:05d}"))
        before_turns, before = turns.count, store.transactions
        await store.write_activity(
            [ActivityRow(f"s{i:05d}", T0 + 5, 7, None) for i in range(count)]
        )
        assert store.transactions == before + 1  # one script call, applied atomically
        assert turns.count - before_turns >= math.ceil(count / REDIS_FLUSH_SLICE)
        for i in (0, REDIS_FLUSH_SLICE, count - 1):
            got = await store.get(f"s{i:05d}")
            assert got is not None
            assert (got.last_activity_at, got.requests) == (T0 + 5, 7)
    finally:
        await store.close()


def _session(session_id: str) -> Session:
    return Session(
        id=session_id,
        transport=Transport.STREAMABLE_HTTP,
        client=ALICE,
        created_at=T0,
        last_activity_at=T0,
        protocol_version="2025-06-18",
        requests=1,
    )


# ---- the sweep's due run -----------------------------------------------------------------------


@dataclass(eq=False)
class Item:
    name: str
    due: Bucket | None = None


def test_a_due_run_hands_out_bounded_slices_across_buckets_each_item_once() -> None:
    deadlines = Deadlines()
    items = [Item(f"i{n}") for n in range(7)]
    for n, item in enumerate(items):
        deadlines.schedule(item, 10.0 + n // 3)  # buckets of 3, 3 and 1
    stale = Item("moved")
    deadlines.schedule(stale, 11.0)
    deadlines.schedule(stale, 10.0)  # moved earlier: its entry at 11 is stale
    later = Item("later")
    deadlines.schedule(later, 50.0)

    run = deadlines.take_due(12.5)
    slices = []
    while batch := run.take(3):
        slices.append(batch)
        # Filed again while the run goes on: a new bucket, not handed out again by this run.
        deadlines.schedule(batch[0], 12.0)
    assert run.exhausted
    assert [len(s) for s in slices] == [3, 3, 2]
    assert sorted(i.name for s in slices for i in s) == sorted([*(i.name for i in items), "moved"])
    assert deadlines.pop_due(12.5) == [s[0] for s in slices]
    assert deadlines.pop_due(100.0) == [later]


def test_a_due_run_stopped_half_way_gives_back_the_rest() -> None:
    deadlines = Deadlines()
    items = [Item(f"i{n}") for n in range(5)]
    for item in items:
        deadlines.schedule(item, 10.0)
    run = deadlines.take_due(10.0)
    first = run.take(2)
    rest = run.rest()
    assert first + rest == items
    assert all(item.due is None for item in items)
    assert run.exhausted


# ---- mass closes -------------------------------------------------------------------------------


async def test_a_request_between_two_runs_of_a_mass_close_closes_its_session_once(
    harness: Harness,
) -> None:
    count = 2 * ANNOUNCE_RUN + 3
    sessions = await harness.create(count)
    last = sessions[-1]
    harness.clock.now = T0 + IDLE + 1
    raced: list[Outcome] = []

    async def request_for_the_last() -> None:
        # Its turn comes once the first run is flipped and before the last one is.
        while sessions[0].state is not State.CLOSED:  # noqa: ASYNC110 - polls a condition
            await asyncio.sleep(0)
        assert last.state is State.LIVE
        raced.append((await harness.manager.resolve(last.id, ALICE)).outcome)

    racer = asyncio.create_task(request_for_the_last())
    await harness.manager.close_many(sessions, CloseReason.IDLE_TIMEOUT)
    await racer

    assert raced == [Outcome.EXPIRED]
    assert harness.manager.live == {}
    assert sorted(p.session_id for p in harness.closer.scheduled) == sorted(s.id for s in sessions)
    assert harness.column("SELECT DISTINCT state FROM sessions") == ["closed"]
    assert len(harness.column("SELECT session_id FROM pending_closes")) == count


async def test_a_sweep_cancelled_between_runs_still_persists_and_owes_what_it_flipped(
    harness: Harness,
) -> None:
    count = SWEEP_SLICE + 2 * ANNOUNCE_RUN
    sessions = await harness.create(count)
    harness.clock.now = T0 + IDLE + 1
    sweep = asyncio.create_task(harness.manager.sweep())
    while sessions[0].state is not State.CLOSED:  # noqa: ASYNC110 - polls a condition
        await asyncio.sleep(0)
    sweep.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sweep
    # The shielded close of the slice under way finishes on its own: the whole slice is
    # flipped, written and owes its DELETEs, though the sweep itself was cancelled.
    while len(harness.closer.scheduled) < SWEEP_SLICE:  # noqa: ASYNC110 - polls a condition
        await asyncio.sleep(0)
    flipped = [s for s in sessions if s.state is State.CLOSED]
    assert len(flipped) == SWEEP_SLICE
    closed_rows = harness.column("SELECT id FROM sessions WHERE state = 'closed'")
    assert sorted(closed_rows) == sorted(s.id for s in flipped)
    assert sorted(p.session_id for p in harness.closer.scheduled) == sorted(closed_rows)
    # The rest were filed again: the next sweep ends them, each once.
    assert await harness.manager.sweep() == count - SWEEP_SLICE
    assert len(harness.closer.scheduled) == count
    assert harness.manager.live == {}


# ---- turns bounded by time, behind due timers ----------------------------------------------------


def _runs(seen: list[int]) -> list[int]:
    """Lengths of the runs of items done with no turn of the other task between them."""
    return [len(list(run)) for _, run in itertools.groupby(seen)]


async def test_closes_slow_to_announce_yield_after_each_close_not_after_a_run(
    harness: Harness, turns: Turns
) -> None:
    """A turn ends when its time is used, not only after ANNOUNCE_RUN closes: announcing
    each close here takes twice the budget (by the turn's injected clock), so every close
    is announced in a turn of its own; each is still closed, written and owed once."""
    count = ANNOUNCE_RUN + 5
    sessions = await harness.create(count)
    ticks = Ticks()
    harness.manager.pacing = Pacing(clock=ticks)
    seen: list[int] = []

    def slow_listener(session: Session, reason: CloseReason, now: float) -> None:
        seen.append(turns.count)
        ticks.now += 2 * TURN_BUDGET

    harness.manager.close_listeners.append(slow_listener)
    await harness.manager.close_many(sessions, CloseReason.IDLE_TIMEOUT)

    assert _runs(seen) == [1] * count
    assert harness.manager.pacing.yields >= count - 1
    assert len(harness.closer.scheduled) == count
    assert harness.column("SELECT DISTINCT state FROM sessions") == ["closed"]
    assert len(harness.column("SELECT session_id FROM pending_closes")) == count


async def test_a_timer_due_during_a_turn_of_closes_runs_before_the_next_turn(
    harness: Harness,
) -> None:
    """What a request waits for is one turn: the timers that came due during a turn run
    before the next turn (`asyncio.sleep(0)` would have run the next turn first)."""
    count = 2 * ANNOUNCE_RUN + 3
    sessions = await harness.create(count)
    harness.manager.pacing = Pacing(clock=Ticks())  # time stands still: turns of ANNOUNCE_RUN
    announced: list[Session] = []
    timer_saw: list[int] = []
    loop = asyncio.get_running_loop()

    def listener(session: Session, reason: CloseReason, now: float) -> None:
        if not announced:
            loop.call_at(loop.time() - 1, lambda: timer_saw.append(len(announced)))
        announced.append(session)

    harness.manager.close_listeners.append(listener)
    await harness.manager.close_many(sessions, CloseReason.IDLE_TIMEOUT)

    assert timer_saw == [ANNOUNCE_RUN]
    assert len(announced) == count


async def test_hibernations_slow_to_announce_yield_after_each_one(
    harness: Harness, turns: Turns
) -> None:
    count = ANNOUNCE_RUN + 5
    sessions = await harness.create(count)
    harness.manager.policy = Policy(idle_timeout=IDLE, idle_action="hibernate")
    ticks = Ticks()
    harness.manager.pacing = Pacing(clock=ticks)
    seen: list[int] = []
    schedule = harness.closer.schedule

    def slow_schedule(pending: PendingClose, credentials: Mapping[str, str]) -> None:
        seen.append(turns.count)
        ticks.now += 2 * TURN_BUDGET
        schedule(pending, credentials)

    harness.closer.schedule = slow_schedule  # type: ignore[method-assign]
    await harness.manager.hibernate_many(sessions)

    assert _runs(seen) == [1] * count
    assert len(harness.manager.dormant) == count
    assert harness.manager.live == {}
    assert harness.column("SELECT DISTINCT state FROM sessions") == ["dormant"]
    assert len(harness.column("SELECT session_id FROM pending_closes")) == count
