"""The `Store` contract, run against every backend: what a reader gets back after each write.

Every test goes through the interface only (`load`, `get`, `pending_closes`), so a new backend
is checked by adding its name to `BACKENDS` and a line to `make_store`. The Redis backend runs
against a real `redis-server` of the test's own (`tests/peers/redis_server.py`). Faults are
backend-specific and tested at the end of the file.
"""

from __future__ import annotations

import asyncio
import copy
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import fields, replace
from pathlib import Path

import pytest
import redis.asyncio as redis_client

from sidecar.errors import StoreError, StoreTooNewError
from sidecar.sessions import (
    Binding,
    CloseReason,
    ResumeState,
    Runtime,
    Session,
    State,
    Transport,
)
from sidecar.store import ActivityRow, PendingClose, Store
from sidecar.store.memory import MemoryStore
from sidecar.store.redis import RedisStore
from sidecar.store.sqlite import SqliteStore
from tests.peers.redis_server import RedisServer

T0 = 1_700_000_000.0

BACKENDS = ["sqlite", "memory", "redis"]


def make_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    """A new, unopened store of the named backend."""
    if backend == "sqlite":
        return SqliteStore(str(tmp_path / "state" / "sessions.db"))
    if backend == "memory":
        return MemoryStore()
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return RedisStore(server.url, key_prefix="contract:")
    raise ValueError(f"no factory for the store backend {backend!r}")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    store = make_store(request.param, tmp_path, request)
    await store.open()
    yield store
    await store.close()


def _resume(level: str | None = "debug") -> ResumeState:
    return ResumeState(
        initialize={
            "protocolVersion": "2025-06-18",
            "capabilities": {"roots": {"listChanged": True}},
            "clientInfo": {"name": "my-ide", "version": "1.2"},
        },
        log_level=level,
        subscriptions=["file:///a.txt", "file:///b.txt"],
    )


def _session(session_id: str = "client-1", **kw: object) -> Session:
    values: dict[str, object] = {
        "id": session_id,
        "transport": Transport.STREAMABLE_HTTP,
        "client": "auth:abc",
        "created_at": T0,
        "last_activity_at": T0 + 1,
        "protocol_version": "2025-06-18",
        "user_agent": "python-httpx/0.28",
        "client_info": "my-ide 1.2",
        "requests": 3,
        "binding": Binding("up-a", f"{session_id}@upstream"),
        "resume": _resume(),
    }
    values.update(kw)
    return Session(**values)  # type: ignore[arg-type]


def _record(session: Session) -> dict[str, object]:
    """Every persisted field of a session (all but the process-only runtime)."""
    return {f.name: getattr(session, f.name) for f in fields(Session) if f.name != "runtime"}


async def _get(store: Store, session_id: str) -> Session:
    got = await store.get(session_id)
    assert got is not None, f"{session_id} is not in the store"
    return got


def _closed(session: Session, at: float, reason: CloseReason) -> Session:
    closed = replace(session, runtime=None, resume=copy.deepcopy(session.resume))
    closed.state = State.CLOSED
    closed.close_reason = reason
    closed.closed_at = at
    return closed


async def _insert_closed(store: Store, session_id: str, closed_at: float, **kw: object) -> Session:
    session = _session(session_id, **kw)
    await store.insert(session)
    closed = _closed(session, closed_at, CloseReason.IDLE_TIMEOUT)
    await store.mark_closed_many([(closed, None)])
    return closed


async def _insert_dormant(store: Store, session_id: str, since: float) -> Session:
    session = _session(session_id)
    await store.insert(session)
    dormant = replace(session, runtime=None, resume=_resume())
    dormant.state = State.DORMANT
    dormant.binding = None
    dormant.dormant_since = since
    await store.hibernate_many([(dormant, None)])
    return dormant


def _by_key(pending: list[PendingClose]) -> dict[tuple[str, str], PendingClose]:
    return {p.key: p for p in pending}


# ---- insert, get, load ---------------------------------------------------------------------


async def test_inserted_session_reads_back_with_every_field_binding_and_resume(
    store: Store,
) -> None:
    session = _session(
        "client-1",
        binding=Binding("up-b", "upstream-77"),
        persistent=True,
        upstream_endpoint=None,
    )
    await store.insert(session)

    got = await _get(store, "client-1")
    assert _record(got) == _record(session)
    assert got.binding == Binding("up-b", "upstream-77")
    assert got.resume == _resume()
    (loaded,) = await store.load(State.LIVE)
    assert _record(loaded) == _record(session)
    assert await store.get("missing") is None


async def test_insert_then_tells_its_listener_once_the_row_is_durable(store: Store) -> None:
    """The manager tracks a new session from this answer (no task of its own per creation):
    it must come once, after the row can be read back, with no one awaiting anything."""
    heard: list[BaseException | None] = []
    told = asyncio.Event()

    def done(error: BaseException | None) -> None:
        heard.append(error)
        told.set()

    store.insert_then(_session("client-1"), done)
    await told.wait()
    assert heard == [None]
    assert _record(await _get(store, "client-1")) == _record(_session("client-1"))


async def test_legacy_session_keeps_its_upstream_endpoint(store: Store) -> None:
    session = _session(
        "legacy-1",
        transport=Transport.SSE,
        upstream_endpoint="/messages/?session_id=abc",
        resume=None,
    )
    await store.insert(session)
    got = await _get(store, "legacy-1")
    assert got.transport is Transport.SSE
    assert got.upstream_endpoint == "/messages/?session_id=abc"
    assert got.resume is None
    assert _record(got) == _record(session)


async def test_credentials_are_never_persisted(store: Store) -> None:
    session = _session(runtime=Runtime(credentials={"Authorization": "Bearer secret"}))
    assert session.credentials == {"Authorization": "Bearer secret"}
    await store.insert(session)

    got = await _get(store, "client-1")
    assert got.runtime is None
    assert got.credentials == {}
    (loaded,) = await store.load(State.LIVE)
    assert loaded.runtime is None


async def test_a_read_is_a_copy_not_the_stored_record(store: Store) -> None:
    await store.insert(_session())
    first = await _get(store, "client-1")
    first.requests = 999
    assert first.resume is not None
    first.resume.subscriptions.append("file:///mutated")
    again = await _get(store, "client-1")
    assert again.requests == 3
    assert again.resume == _resume()


# ---- closing and hibernating -----------------------------------------------------------------


async def test_mark_closed_many_closes_all_and_records_their_pending_closes_in_one_write(
    store: Store,
) -> None:
    a = _session("a", binding=Binding("up-a", "ua"))
    b = _session("b", binding=Binding("up-b", "ub"))
    keep = _session("keep")
    for session in (a, b, keep):
        await store.insert(session)
    closed_a = _closed(a, T0 + 10, CloseReason.ADMIN)
    closed_a.last_activity_at = T0 + 9
    closed_a.requests = 11
    closed_b = _closed(b, T0 + 12, CloseReason.CLIENT_DELETE)
    owed_a = PendingClose("ua", "2025-06-18", 0, T0 + 10, upstream="up-a")
    owed_b = PendingClose("ub", None, 0, T0 + 12, upstream="up-b")

    before = store.transactions
    await store.mark_closed_many([(closed_a, owed_a), (closed_b, owed_b)])
    assert store.transactions == before + 1

    got_a = await _get(store, "a")
    assert (got_a.state, got_a.close_reason, got_a.closed_at) == (
        State.CLOSED,
        CloseReason.ADMIN,
        T0 + 10,
    )
    assert (got_a.last_activity_at, got_a.requests) == (T0 + 9, 11)
    got_b = await _get(store, "b")
    assert (got_b.state, got_b.close_reason, got_b.closed_at) == (
        State.CLOSED,
        CloseReason.CLIENT_DELETE,
        T0 + 12,
    )
    assert sorted(s.id for s in await store.load(State.CLOSED)) == ["a", "b"]
    assert [s.id for s in await store.load(State.LIVE)] == ["keep"]
    assert _by_key(await store.pending_closes()) == {
        ("up-a", "ua"): owed_a,
        ("up-b", "ub"): owed_b,
    }


async def test_mark_closed_many_without_pending_closes_records_none(store: Store) -> None:
    session = _session()
    await store.insert(session)
    await store.mark_closed_many([(_closed(session, T0 + 5, CloseReason.EVICTED), None)])
    assert (await _get(store, "client-1")).state is State.CLOSED
    assert await store.pending_closes() == []


async def test_hibernate_many_makes_sessions_dormant_and_owes_the_old_bindings_delete(
    store: Store,
) -> None:
    session = _session("client-1", binding=Binding("up-b", "upstream-42"))
    other = _session("client-2", binding=Binding("up-a", "upstream-43"))
    await store.insert(session)
    await store.insert(other)
    dormant = replace(session, runtime=None, resume=_resume(level="warning"))
    dormant.state = State.DORMANT
    dormant.binding = None
    dormant.dormant_since = T0 + 300
    dormant.last_activity_at = T0 + 200
    dormant.requests = 8
    dormant_other = replace(other, runtime=None, resume=_resume())
    dormant_other.state = State.DORMANT
    dormant_other.binding = None
    dormant_other.dormant_since = T0 + 301
    owed = PendingClose("upstream-42", "2025-06-18", 0, T0 + 300, upstream="up-b")
    owed_other = PendingClose("upstream-43", "2025-06-18", 0, T0 + 301, upstream="up-a")

    before = store.transactions
    await store.hibernate_many([(dormant, owed), (dormant_other, owed_other)])
    assert store.transactions == before + 1

    got = await _get(store, "client-1")
    assert got.state is State.DORMANT
    assert got.binding is None
    assert got.dormant_since == T0 + 300
    assert (got.last_activity_at, got.requests) == (T0 + 200, 8)
    assert got.resume == _resume(level="warning")
    assert (got.id, got.client, got.created_at) == ("client-1", "auth:abc", T0)
    assert sorted(s.id for s in await store.load(State.DORMANT)) == ["client-1", "client-2"]
    assert await store.load(State.LIVE) == []
    (pending,) = [p for p in await store.pending_closes() if p.upstream == "up-b"]
    assert pending == owed
    assert pending.session_id == "upstream-42" != got.id
    assert _by_key(await store.pending_closes()) == {
        ("up-b", "upstream-42"): owed,
        ("up-a", "upstream-43"): owed_other,
    }


async def test_rebind_makes_a_dormant_session_live_with_its_new_binding(store: Store) -> None:
    dormant = await _insert_dormant(store, "client-1", since=T0 + 300)
    resumed = replace(dormant, runtime=None, resume=_resume())
    resumed.state = State.LIVE
    resumed.binding = Binding("up-c", "upstream-new-9")
    resumed.dormant_since = None
    resumed.protocol_version = "2025-11-25"
    resumed.resumes = 1

    await store.rebind(resumed)

    got = await _get(store, "client-1")
    assert got.state is State.LIVE
    assert got.binding == Binding("up-c", "upstream-new-9")
    assert got.upstream_id == "upstream-new-9" != got.id
    assert got.dormant_since is None
    assert got.protocol_version == "2025-11-25"
    assert got.resumes == 1
    assert got.resume == _resume()
    assert [s.id for s in await store.load(State.LIVE)] == ["client-1"]
    assert await store.load(State.DORMANT) == []


def _resumed(dormant: Session, upstream_id: str) -> Session:
    resumed = replace(dormant, runtime=None, resume=_resume())
    resumed.state = State.LIVE
    resumed.binding = Binding("up-c", upstream_id)
    resumed.dormant_since = None
    resumed.resumes = dormant.resumes + 1
    return resumed


async def test_only_the_first_of_two_rebinds_of_one_dormant_session_wins_a_shared_store(
    store: Store,
) -> None:
    # SPEC 2.8: two sidecars woke the same dormant id at once, each with its own new upstream
    # session; the second must learn it lost (and close its own), not overwrite the first.
    dormant = await _insert_dormant(store, "client-1", since=T0 + 300)

    first = await store.rebind(_resumed(dormant, "upstream-first"))
    second = await store.rebind(_resumed(dormant, "upstream-second"))

    assert first is True
    assert second is (not store.shared)  # alone on its store, a sidecar cannot be beaten
    got = await _get(store, "client-1")
    assert got.state is State.LIVE
    expected = "upstream-first" if store.shared else "upstream-second"
    assert got.binding == Binding("up-c", expected)
    assert [s.id for s in await store.load(State.LIVE)] == ["client-1"]


async def test_a_lost_session_is_rebound_only_from_the_binding_it_still_has(store: Store) -> None:
    dormant = await _insert_dormant(store, "client-1", since=T0 + 300)
    assert await store.rebind(_resumed(dormant, "upstream-a"))
    live = await _get(store, "client-1")

    # Resumed from its current binding: wins. From one replaced meanwhile: loses when shared.
    won = await store.rebind(_resumed(live, "upstream-b"), Binding("up-c", "upstream-a"))
    stale = await store.rebind(_resumed(live, "upstream-c"), Binding("up-c", "upstream-a"))

    assert won is True
    assert stale is (not store.shared)
    got = await _get(store, "client-1")
    assert got.upstream_id == ("upstream-b" if store.shared else "upstream-c")


async def test_a_closed_session_is_not_rebound_on_a_shared_store(store: Store) -> None:
    dormant = await _insert_dormant(store, "client-1", since=T0 + 300)
    await store.mark_closed_many([(_closed(dormant, T0 + 400, CloseReason.ADMIN), None)])

    rebound = await store.rebind(_resumed(dormant, "upstream-late"))

    assert rebound is (not store.shared)
    if store.shared:
        assert (await _get(store, "client-1")).state is State.CLOSED


# ---- write-behind activity -----------------------------------------------------------------


async def test_write_activity_updates_live_rows_and_leaves_closed_ones_alone(
    store: Store,
) -> None:
    await store.insert(_session("live", client_info="", resume=None))
    await store.insert(_session("kept", client_info="old-ide 0.1"))
    closed = await _insert_closed(store, "closed", T0 + 50)
    closed_before = _record(await _get(store, "closed"))
    new_resume = _resume(level="error")

    await store.write_activity(
        [
            ActivityRow("live", T0 + 60, 7, "2025-11-25", "my-ide 2.0", new_resume.to_json()),
            # Empty or None values keep what the row has.
            ActivityRow("kept", T0 + 61, 4, None, "", None),
            ActivityRow("closed", T0 + 999, 99, "2025-11-25", "late-ide", new_resume.to_json()),
        ]
    )

    live = await _get(store, "live")
    assert (live.last_activity_at, live.requests) == (T0 + 60, 7)
    assert live.protocol_version == "2025-11-25"
    assert live.client_info == "my-ide 2.0"
    assert live.resume == new_resume
    kept = await _get(store, "kept")
    assert (kept.last_activity_at, kept.requests) == (T0 + 61, 4)
    assert kept.protocol_version == "2025-06-18"
    assert kept.client_info == "old-ide 0.1"
    assert kept.resume == _resume()
    assert _record(await _get(store, "closed")) == closed_before
    assert closed_before["last_activity_at"] == closed.last_activity_at


async def test_write_activity_for_an_unknown_session_changes_nothing(store: Store) -> None:
    await store.insert(_session())
    before = _record(await _get(store, "client-1"))
    await store.write_activity([ActivityRow("nobody", T0 + 60, 7, None)])
    assert _record(await _get(store, "client-1")) == before
    assert await store.get("nobody") is None


# ---- pending closes ------------------------------------------------------------------------


async def test_pending_closes_are_keyed_by_upstream_and_upstream_session_id(
    store: Store,
) -> None:
    on_a = PendingClose("same-id", "2025-06-18", 0, T0, upstream="up-a")
    on_b = PendingClose("same-id", None, 1, T0 + 1, upstream="up-b")
    await store.save_pending(on_a)
    await store.save_pending(on_b)
    assert _by_key(await store.pending_closes()) == {
        ("up-a", "same-id"): on_a,
        ("up-b", "same-id"): on_b,
    }

    retried = PendingClose("same-id", "2025-06-18", 3, T0 + 8, upstream="up-a")
    await store.save_pending(retried, "HTTP 503")
    assert _by_key(await store.pending_closes()) == {
        ("up-a", "same-id"): retried,
        ("up-b", "same-id"): on_b,
    }

    await store.drop_pending(on_b)
    assert await store.pending_closes() == [retried]
    await store.drop_pending(on_b)  # dropping twice is harmless
    assert await store.pending_closes() == [retried]
    await store.drop_pending(retried)
    assert await store.pending_closes() == []


# ---- tombstones and the closed list ----------------------------------------------------------


async def test_purge_tombstones_removes_old_closed_rows_except_those_still_owing_a_delete(
    store: Store,
) -> None:
    await _insert_closed(store, "old", T0)
    await _insert_closed(store, "old-owed", T0, binding=Binding("up-b", "upstream-owed"))
    await _insert_closed(store, "recent", T0 + 100)
    await store.insert(_session("live", created_at=T0 - 1000, last_activity_at=T0 - 1000))
    await _insert_dormant(store, "dormant", since=T0 - 500)
    owed = PendingClose("upstream-owed", None, 2, T0 + 500, upstream="up-b")
    await store.save_pending(owed)

    assert await store.purge_tombstones(older_than=T0 + 50) == 1

    assert await store.get("old") is None
    assert sorted(s.id for s in await store.load(State.CLOSED)) == ["old-owed", "recent"]
    assert [s.id for s in await store.load(State.LIVE)] == ["live"]
    assert [s.id for s in await store.load(State.DORMANT)] == ["dormant"]
    assert await store.purge_tombstones(older_than=T0 + 50) == 0

    await store.drop_pending(owed)
    assert await store.purge_tombstones(older_than=T0 + 50) == 1
    assert [s.id for s in await store.load(State.CLOSED)] == ["recent"]
    assert await store.pending_closes() == []


async def test_load_closed_since_filters_by_closed_at(store: Store) -> None:
    await _insert_closed(store, "early", T0 + 10)
    await _insert_closed(store, "late", T0 + 20)
    await store.insert(_session("live"))

    assert sorted(s.id for s in await store.load(State.CLOSED)) == ["early", "late"]
    assert [s.id for s in await store.load(State.CLOSED, since=T0 + 20)] == ["late"]
    assert sorted(s.id for s in await store.load(State.CLOSED, since=T0 + 10)) == [
        "early",
        "late",
    ]
    assert await store.load(State.CLOSED, since=T0 + 21) == []
    (late,) = await store.load(State.CLOSED, since=T0 + 15)
    assert (late.close_reason, late.closed_at) == (CloseReason.IDLE_TIMEOUT, T0 + 20)


async def test_set_persistent_is_read_back(store: Store) -> None:
    await store.insert(_session("a"))
    await store.insert(_session("b"))
    await store.set_persistent("a", True)
    assert (await _get(store, "a")).persistent is True
    assert (await _get(store, "b")).persistent is False
    await store.set_persistent("a", False)
    assert (await _get(store, "a")).persistent is False


# ---- faults: each write either happens whole or raises StoreError having changed nothing ----

Write = Callable[[Store], Awaitable[object]]


def _live_closed() -> Session:
    closed = _session("live", binding=Binding("up-a", "u-live"))
    closed.state = State.CLOSED
    closed.close_reason = CloseReason.ADMIN
    closed.closed_at = T0 + 900
    return closed


def _live_dormant() -> Session:
    dormant = _session("live", binding=None)
    dormant.state = State.DORMANT
    dormant.binding = None
    dormant.dormant_since = T0 + 900
    return dormant


def _dormant_resumed() -> Session:
    resumed = _session("dormant", binding=Binding("up-c", "u-new"), resumes=1)
    return resumed


WRITES: dict[str, Write] = {
    "insert": lambda s: s.insert(_session("new")),
    "mark_closed_many": lambda s: s.mark_closed_many(
        [(_live_closed(), PendingClose("u-live", None, 0, T0 + 900, upstream="up-a"))]
    ),
    "hibernate_many": lambda s: s.hibernate_many(
        [(_live_dormant(), PendingClose("u-live", None, 0, T0 + 900, upstream="up-a"))]
    ),
    "rebind": lambda s: s.rebind(_dormant_resumed()),
    "set_persistent": lambda s: s.set_persistent("live", True),
    "write_activity": lambda s: s.write_activity([ActivityRow("live", T0 + 900, 50, "x")]),
    "save_pending": lambda s: s.save_pending(PendingClose("u-other", None, 0, T0, "up-z")),
    "drop_pending": lambda s: s.drop_pending(PendingClose("u-owed", None, 0, T0, "up-b")),
    "purge_tombstones": lambda s: s.purge_tombstones(T0 + 10_000),
}


async def _populate(store: Store) -> None:
    await store.insert(_session("live", binding=Binding("up-a", "u-live")))
    await _insert_dormant(store, "dormant", since=T0 + 5)
    await _insert_closed(store, "closed", T0 + 6)
    await store.save_pending(PendingClose("u-owed", None, 1, T0 + 7, upstream="up-b"))


async def _contents(store: Store) -> tuple[list[dict[str, object]], list[PendingClose]]:
    sessions = [
        _record(s) for state in State for s in sorted(await store.load(state), key=lambda s: s.id)
    ]
    pending = sorted(await store.pending_closes(), key=lambda p: p.key)
    return sessions, pending


def _forbid_sqlite_writes(path: Path) -> None:
    """Another connection makes every change to either table fail, as a broken disk would."""
    with sqlite3.connect(path) as db:
        for table in ("sessions", "pending_closes"):
            for event in ("INSERT", "UPDATE", "DELETE"):
                db.execute(
                    f"CREATE TRIGGER no_{event.lower()}_{table} BEFORE {event} ON {table} "
                    "BEGIN SELECT RAISE(ABORT, 'writes refused by the test'); END"
                )
    db.close()


@pytest.mark.parametrize("write", list(WRITES))
async def test_sqlite_failed_write_is_a_store_error_and_changes_nothing(
    tmp_path: Path, write: str
) -> None:
    store = SqliteStore(str(tmp_path / "sessions.db"))
    await store.open()
    try:
        await _populate(store)
        before = await _contents(store)
        transactions = store.transactions
        _forbid_sqlite_writes(tmp_path / "sessions.db")

        with pytest.raises(StoreError, match="check disk space and permissions"):
            await WRITES[write](store)

        assert store.transactions == transactions
        assert not store.db.in_transaction
        assert await _contents(store) == before
    finally:
        await store.close()


async def test_sqlite_mark_closed_many_is_all_or_none(tmp_path: Path) -> None:
    """The pending close of the second session fails: neither session is closed."""
    store = SqliteStore(str(tmp_path / "sessions.db"))
    await store.open()
    try:
        a = _session("a", binding=Binding("up-a", "ua"))
        b = _session("b", binding=Binding("up-a", "ub"))
        await store.insert(a)
        await store.insert(b)
        with sqlite3.connect(tmp_path / "sessions.db") as db:
            db.execute(
                "CREATE TRIGGER refuse_ub BEFORE INSERT ON pending_closes "
                "WHEN NEW.session_id = 'ub' "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
        db.close()
        with pytest.raises(StoreError):
            await store.mark_closed_many(
                [
                    (_closed(a, T0 + 9, CloseReason.ADMIN), PendingClose("ua", None, 0, T0)),
                    (_closed(b, T0 + 9, CloseReason.ADMIN), PendingClose("ub", None, 0, T0)),
                ]
            )
        assert sorted(s.id for s in await store.load(State.LIVE)) == ["a", "b"]
        assert await store.load(State.CLOSED) == []
        assert await store.pending_closes() == []
    finally:
        await store.close()


async def test_sqlite_write_to_a_closed_store_is_a_store_error(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "sessions.db"))
    await store.open()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.insert(_session())
    await store.open()
    try:
        assert await store.get("client-1") is None
    finally:
        await store.close()


@pytest.mark.parametrize("write", list(WRITES))
async def test_memory_fail_writes_raises_store_error_and_changes_nothing(write: str) -> None:
    store = MemoryStore()
    await store.open()
    await _populate(store)
    before = await _contents(store)
    transactions = store.transactions
    store.fail_writes = True

    with pytest.raises(StoreError):
        await WRITES[write](store)

    assert store.transactions == transactions
    assert await _contents(store) == before


async def _refuse_redis_writes(url: str, refuse: bool) -> None:
    """ACL: the store's (default) user may read but not write, so every write script fails
    at its first write command, as a Redis that refuses writes (a read-only replica after a
    failover, a permission change) would."""
    client = redis_client.Redis.from_url(url)
    try:
        await client.execute_command("ACL", "SETUSER", "default", "-@write" if refuse else "+@all")
    finally:
        await client.aclose()


@pytest.mark.parametrize("write", list(WRITES))
async def test_redis_failed_write_is_a_store_error_and_changes_nothing(
    redis_server: RedisServer, write: str
) -> None:
    store = RedisStore(redis_server.url, key_prefix="faults:")
    await store.open()
    try:
        await _populate(store)
        before = await _contents(store)
        transactions = store.transactions
        await _refuse_redis_writes(redis_server.url, refuse=True)

        with pytest.raises(StoreError, match="Redis store"):
            await WRITES[write](store)

        assert store.transactions == transactions
        assert await _contents(store) == before
        await _refuse_redis_writes(redis_server.url, refuse=False)
        await WRITES[write](store)  # the same store works again once Redis does
    finally:
        await store.close()


async def test_redis_stopped_is_a_store_error_and_the_same_store_recovers(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, key_prefix="faults:")
    await store.open()
    try:
        await store.insert(_session("before"))
        redis_server.stop()
        with pytest.raises(StoreError, match="Redis store"):
            await store.insert(_session("during"))
        with pytest.raises(StoreError, match="Redis store"):
            await store.get("before")
        redis_server.start()  # an empty Redis on the same port: no persistence in the tests
        await store.insert(_session("after"))
        assert [s.id for s in await store.load(State.LIVE)] == ["after"]
    finally:
        await store.close()


async def test_redis_schema_from_a_newer_sidecar_stops_the_open(redis_server: RedisServer) -> None:
    client = redis_client.Redis.from_url(redis_server.url)
    try:
        await client.set("newer:schema", "99")
    finally:
        await client.aclose()
    store = RedisStore(redis_server.url, key_prefix="newer:")
    with pytest.raises(StoreTooNewError, match="schema version 99"):
        await store.open()
    other = RedisStore(redis_server.url, key_prefix="other:")
    await other.open()  # another prefix is another store on the same Redis
    await other.close()


async def test_redis_unreachable_at_open_names_the_url_without_its_password() -> None:
    from tests.peers.processes import free_port

    store = RedisStore(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError, match="check that it is running") as caught:
        await store.open()
    assert "hunter2" not in str(caught.value)


async def test_load_slices_reads_what_load_does_in_slices_closed_ones_oldest_first(
    store: Store,
) -> None:
    for n in range(5):
        await store.insert(_session(f"live-{n}"))
    await _insert_closed(store, "closed-late", T0 + 30)
    await _insert_closed(store, "closed-early", T0 + 10)
    await _insert_closed(store, "closed-middle", T0 + 20)
    await _insert_closed(store, "closed-too-old", T0)
    await _insert_dormant(store, "dormant", since=T0 - 500)

    live = [page async for page in store.load_slices(State.LIVE, 2)]
    assert [len(page) for page in live] == [2, 2, 1]
    assert sorted(s.id for page in live for s in page) == [f"live-{n}" for n in range(5)]
    closed = [page async for page in store.load_slices(State.CLOSED, 2, since=T0 + 5)]
    assert [[s.id for s in page] for page in closed] == [
        ["closed-early", "closed-middle"],
        ["closed-late"],
    ]
    (dormant,) = [page async for page in store.load_slices(State.DORMANT, 2)]
    assert [s.id for s in dormant] == ["dormant"]
    assert dormant[0].resume == (await store.get("dormant")).resume  # type: ignore[union-attr]


async def test_get_many_reads_the_named_sessions_as_get_does_and_leaves_out_unknown_ids(
    store: Store,
) -> None:
    await store.insert(_session("live-1"))
    await _insert_dormant(store, "dormant-1", since=T0 + 5)
    await _insert_closed(store, "closed-1", T0 + 10)
    found = await store.get_many(["dormant-1", "nobody", "live-1", "closed-1"])
    assert sorted(found) == ["closed-1", "dormant-1", "live-1"]
    for session_id, session in found.items():
        one = await store.get(session_id)
        assert one is not None
        assert (session.state, session.resume, session.dormant_since, session.requests) == (
            one.state,
            one.resume,
            one.dormant_since,
            one.requests,
        )
    assert found["dormant-1"].resume == _resume()
    assert await store.get_many([]) == {}
