"""Dormant sessions held as compact records (`sessions.Dormant`, `dormant.py`).

A hibernated session is kept in memory as id, client, label and deadline only; the rest is
in the store and read back, once, when a request (or an admin, or the sweep closing it)
needs it whole. These tests run the manager on the three real stores (SQLite, in-memory,
and a `redis-server` of the test's own) with an injected clock: what a wake reads, what a
lost row answers, how the dormant TTL ends a compact record, and what a store that cannot
answer does. The same paths end to end, with FastMCP and a real client, are in
`test_hibernate.py`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_client

from sidecar.errors import StoreError
from sidecar.manager import Limits, Outcome, SessionManager
from sidecar.metrics import Metrics
from sidecar.sessions import (
    Binding,
    CloseReason,
    Dormant,
    Policy,
    ResumeState,
    Session,
    State,
    Transport,
)
from sidecar.store import Store
from sidecar.store.memory import MemoryStore
from sidecar.store.redis import RedisStore
from sidecar.store.sqlite import SqliteStore
from tests.fakes import T0, Clock, FakeCloser
from tests.peers.redis_server import RedisServer

IDLE = 600.0
TTL = 3600.0
ALICE = "auth:alice"
RESUME = ResumeState(
    {"protocolVersion": "2025-06-18", "clientInfo": {"name": "ide", "version": "1.0"}},
    log_level="warning",
    subscriptions=["file:///a"],
)


class Reads:
    """Counts the store's reads of sessions by id (what waking a compact record costs) and
    can make them fail."""

    def __init__(self, store: Store) -> None:
        self.count = 0
        self.failing = False
        one, many = store.get, store.get_many

        async def get(session_id: str) -> Session | None:
            self._read()
            return await one(session_id)

        async def get_many(session_ids: Sequence[str]) -> dict[str, Session]:
            self._read()
            return await many(session_ids)

        store.get = get  # type: ignore[method-assign]
        store.get_many = get_many  # type: ignore[method-assign]

    def _read(self) -> None:
        self.count += 1
        if self.failing:
            raise StoreError("database is locked")


@dataclass
class Harness:
    manager: SessionManager
    store: Store
    reads: Reads
    closer: FakeCloser
    clock: Clock
    metrics: Metrics
    lose: Callable[[str], Awaitable[None]]

    async def dormant(self, session_id: str, requests: int = 1) -> Session:
        """A session created with its resume state, used, then hibernated by the sweeper."""
        session = await self.manager.create(
            session_id,
            Transport.STREAMABLE_HTTP,
            ALICE,
            protocol_version="2025-06-18",
            user_agent="ide-http/1.0",
            client_info="ide 1.0",
            resume=RESUME,
        )
        for _ in range(requests - 1):
            self.manager.count_request(session)
        await self.manager.flush()
        self.clock.now += IDLE + 1
        await self.manager.sweep()
        return session


Factory = Callable[[], Any]


def _backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Store, Any]:
    """A new store, and how to lose one session's record from it behind the sidecar's back."""
    if kind == "sqlite":
        path = tmp_path / "sessions.db"

        async def lose_row(session_id: str) -> None:
            with sqlite3.connect(path) as db:
                db.execute("DELETE FROM sessions WHERE id=?", (session_id,))
            db.close()

        return SqliteStore(str(path)), lose_row
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")

        async def lose_key(session_id: str) -> None:
            client = redis_client.Redis.from_url(server.url)
            await client.delete(f"dormant:s:{session_id}")
            await client.aclose()

        return RedisStore(server.url, key_prefix="dormant:"), lose_key
    memory = MemoryStore()

    async def lose_record(session_id: str) -> None:
        memory.sessions.pop(session_id)

    return memory, lose_record


@pytest.fixture(params=["sqlite", "memory", "redis"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    stores: list[Store] = []

    async def build() -> Harness:
        store, lose = _backend(request.param, tmp_path, request)
        await store.open()
        stores.append(store)
        clock, closer, metrics = Clock(), FakeCloser(), Metrics()
        manager = SessionManager(
            store,
            closer,  # type: ignore[arg-type]
            metrics,
            policy=Policy(idle_timeout=IDLE, idle_action="hibernate", dormant_ttl=TTL),
            limits=Limits(),
            tombstone_ttl=7 * 86400,
            clock=clock,
        )
        return Harness(manager, store, Reads(store), closer, clock, metrics, lose)

    yield build
    for store in stores:
        await store.close()


async def test_a_hibernated_session_is_held_compact_and_its_wake_reads_the_store_once(
    make: Factory,
) -> None:
    h: Harness = await make()
    await h.dormant("s1")
    record = h.manager.dormant.get("s1")
    assert isinstance(record, Dormant)
    assert (record.client, record.label) == (ALICE, "ide-http/1.0 (ide 1.0)")
    assert h.reads.count == 0  # hibernating reads nothing back

    first = await h.manager.resolve("s1", ALICE)
    again = await h.manager.resolve("s1", ALICE)
    assert first.outcome is again.outcome is Outcome.DORMANT
    woken = first.session
    assert woken is not None
    assert again.session is woken  # one object per id: a resume is serialised on it
    assert await h.manager.load_resume_state(woken) == RESUME
    assert (woken.user_agent, woken.protocol_version, woken.created_at) == (
        "ide-http/1.0",
        "2025-06-18",
        T0,
    )
    assert h.reads.count == 1

    assert await h.manager.rebind(woken, Binding("", "upstream-2"), "hibernated")
    assert h.manager.live["s1"] is woken
    assert h.manager.dormant.get("s1") is None


async def test_another_identity_is_refused_without_reading_the_store(make: Factory) -> None:
    h: Harness = await make()
    await h.dormant("s1")
    assert (await h.manager.resolve("s1", "auth:mallory")).outcome is Outcome.BINDING
    assert h.reads.count == 0
    assert isinstance(h.manager.dormant.get("s1"), Dormant)


async def test_a_dormant_id_the_store_lost_answers_as_when_the_record_stayed_whole(
    make: Factory,
) -> None:
    # Before compact records, a lost row still resolved dormant from memory and its wake
    # found nothing to resume from (the client then hears 404, resume_failed).
    h: Harness = await make()
    await h.dormant("s1")
    await h.lose("s1")
    resolution = await h.manager.resolve("s1", ALICE)
    assert resolution.outcome is Outcome.DORMANT
    session = resolution.session
    assert session is not None
    assert (session.id, session.client, session.dormant) == ("s1", ALICE, True)
    assert await h.manager.load_resume_state(session) is None
    if h.store.shared:
        # A close on a shared store must win the claim on the stored record, which is gone:
        # the session is dropped instead, as before (SPEC 2.8).
        return

    await h.manager.close(session, CloseReason.RESUME_FAILED)
    tombstone = h.manager.tombstones.get("s1")
    assert tombstone is not None
    assert (tombstone.reason, tombstone.label) == (
        CloseReason.RESUME_FAILED,
        "ide-http/1.0 (ide 1.0)",
    )
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.EXPIRED


async def test_dormant_ttl_closes_a_compact_record_with_its_reason_and_stored_counters(
    make: Factory,
) -> None:
    h: Harness = await make()
    await h.dormant("s1", requests=3)
    # Its old upstream session was owed its DELETE when it hibernated: once, then nothing.
    assert [p.session_id for p in h.closer.scheduled] == ["s1"]
    h.clock.now += TTL - 1
    assert await h.manager.sweep() == 0
    assert isinstance(h.manager.dormant.get("s1"), Dormant)
    assert h.reads.count == 0  # a record not yet due is looked at without the store

    h.clock.now += 1
    assert await h.manager.sweep() == 1
    assert h.manager.dormant.get("s1") is None
    assert [p.session_id for p in h.closer.scheduled] == ["s1"]
    stored = await h.store.get("s1")
    assert stored is not None
    assert (stored.state, stored.close_reason, stored.closed_at) == (
        State.CLOSED,
        CloseReason.DORMANT_TTL,
        h.clock.now,
    )
    assert (stored.requests, stored.last_activity_at) == (3, T0)  # as stored, not reset
    tombstone = h.manager.tombstones.get("s1")
    assert tombstone is not None
    assert tombstone.label == "ide-http/1.0 (ide 1.0)"
    sample = h.metrics.registry.get_sample_value(
        "mcp_sidecar_sessions_closed_total", {"reason": "dormant_ttl"}
    )
    assert sample == 1
    assert (await h.manager.resolve("s1", ALICE)).outcome is Outcome.EXPIRED


async def test_a_wake_the_store_cannot_answer_raises_and_the_next_one_works(
    make: Factory,
) -> None:
    h: Harness = await make()
    await h.dormant("s1")
    h.reads.failing = True
    with pytest.raises(StoreError):  # the transport answers 503 with Retry-After
        await h.manager.resolve("s1", ALICE)
    assert isinstance(h.manager.dormant.get("s1"), Dormant)
    h.reads.failing = False
    resolution = await h.manager.resolve("s1", ALICE)
    assert resolution.outcome is Outcome.DORMANT
    assert resolution.session is not None
    assert await h.manager.load_resume_state(resolution.session) == RESUME


async def test_a_ttl_close_the_store_cannot_read_is_made_by_the_next_sweep(
    make: Factory,
) -> None:
    h: Harness = await make()
    await h.dormant("s1")
    await h.dormant("s2")
    h.clock.now += TTL + IDLE
    h.reads.failing = True
    assert await h.manager.sweep() == 0
    assert h.reads.count == 1  # the slice's records are read together
    assert {type(e) for e in h.manager.dormant} == {Dormant}
    h.reads.failing = False
    assert await h.manager.sweep() == 2
    assert len(h.manager.dormant) == 0
    assert {r.reason for r in map(h.manager.tombstones.__getitem__, ["s1", "s2"])} == {
        CloseReason.DORMANT_TTL
    }


async def test_a_reload_files_compact_records_under_the_new_ttl(make: Factory) -> None:
    h: Harness = await make()
    await h.dormant("s1")
    h.manager.policy = Policy(idle_timeout=IDLE, idle_action="hibernate", dormant_ttl=60)
    h.clock.now += 60
    assert await h.manager.sweep() == 1
    assert h.manager.tombstones["s1"].reason is CloseReason.DORMANT_TTL


async def test_restored_dormant_sessions_are_compact_and_wake_whole(make: Factory) -> None:
    h: Harness = await make()
    await h.dormant("s1")
    restarted = SessionManager(
        h.store,
        FakeCloser(),  # type: ignore[arg-type]
        Metrics(),
        policy=h.manager.policy,
        limits=Limits(),
        tombstone_ttl=7 * 86400,
        clock=h.clock,
    )
    await restarted.restore()
    record = restarted.dormant.get("s1")
    assert isinstance(record, Dormant)
    assert record.dormant_since == T0 + IDLE + 1
    before = h.reads.count
    found = await restarted.find("s1")  # the admin API acts on it whole
    assert found is not None
    assert found.dormant
    assert found.resume == RESUME
    assert h.reads.count == before + 1


async def test_a_session_resumed_before_its_hibernation_is_announced_keeps_what_it_holds(
    make: Factory,
) -> None:
    """A request can resume a session between the store's hibernation write and the
    announcement of it (a mass hibernation yields in turns there): the session is live
    again, so it keeps its credentials, calls in flight and resume state."""
    h: Harness = await make()
    session = await h.manager.create(
        "s1",
        Transport.STREAMABLE_HTTP,
        ALICE,
        protocol_version="2025-06-18",
        credentials={"Authorization": "Bearer t"},
        resume=RESUME,
    )
    write = h.store.hibernate_many

    async def written_then_woken(entries: Any) -> None:
        await write(entries)
        assert session.state is State.DORMANT
        assert await h.manager.rebind(session, Binding("", "upstream-2"), "hibernated")

    h.store.hibernate_many = written_then_woken  # type: ignore[method-assign]
    h.clock.now += IDLE + 1
    await h.manager.hibernate_many([session])
    assert session.live
    assert session.binding == Binding("", "upstream-2")
    assert session.credentials == {"Authorization": "Bearer t"}
    assert session.resume is not None
    assert session.resume.log_level == RESUME.log_level
    # The hibernated binding is still owed its DELETE.
    assert [pending.session_id for pending in h.closer.scheduled] == ["s1"]
