"""Unit tests for `sidecar.store` on real temporary SQLite files: assert the rows, not the calls."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.errors import StoreCorruptError, StoreError, StoreTooNewError
from sidecar.sessions import Binding, CloseReason, Session, State, Transport
from sidecar.store import ActivityRow, PendingClose
from sidecar.store.sqlite import (
    BATCH_ROWS,
    MIGRATIONS,
    SCHEMA_VERSION,
    _batched,
    read_sessions,
)
from sidecar.store.sqlite import SqliteStore as Store

T0 = 1_700_000_000.0


def _session(session_id: str = "sess-1", **kw: object) -> Session:
    fields: dict[str, object] = {
        "id": session_id,
        "transport": Transport.STREAMABLE_HTTP,
        "client": "auth:abc",
        "created_at": T0,
        "last_activity_at": T0 + 1,
        "protocol_version": "2025-06-18",
        "user_agent": "python-httpx/0.28",
        "client_info": "my-ide 1.2",
        "requests": 3,
    }
    fields.update(kw)
    session = Session(**fields)  # type: ignore[arg-type]
    session.credentials = {"Authorization": "Bearer secret"}  # in memory: never stored
    return session


def _fields(s: Session) -> tuple[object, ...]:
    """What the store keeps of a session (Sessions compare by identity)."""
    return (
        s.id,
        s.transport,
        s.client,
        s.created_at,
        s.last_activity_at,
        s.protocol_version,
        s.user_agent,
        s.client_info,
        s.requests,
        s.state,
        s.binding,
    )


def _rows(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return list(db.execute(sql, params))


# Small synchronous file helpers: the files are tiny and local, no thread is worth it.
def _read(path: Path) -> bytes:
    return path.read_bytes()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _is_file(path: Path) -> bool:
    return path.is_file()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "sessions.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    store = Store(str(db_path))
    await store.open()
    yield store
    await store.close()


# ---- opening -------------------------------------------------------------------------------


async def test_open_creates_the_directory_and_schema_in_wal_mode(
    store: Store, db_path: Path
) -> None:
    assert _is_file(db_path)
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"sessions", "pending_closes"}
    assert store.transactions == 0


async def test_reopening_an_existing_store_keeps_its_rows(db_path: Path) -> None:
    first = Store(str(db_path))
    await first.open()
    await first.insert(_session())
    await first.close()
    second = Store(str(db_path))
    await second.open()
    try:
        assert [s.id for s in await second.load(State.LIVE)] == ["sess-1"]
    finally:
        await second.close()


async def test_using_a_store_that_is_not_open_is_a_store_error(db_path: Path) -> None:
    store = Store(str(db_path))
    with pytest.raises(StoreError, match="not open"):
        await store.insert(_session())


async def test_unwritable_directory_names_store_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = Store(str(blocker / "sub" / "sessions.db"))
    with pytest.raises(StoreError, match=r"store\.path"):
        await store.open()


async def test_corrupt_file_is_refused_unchanged_with_a_message_that_says_what_to_do(
    db_path: Path,
) -> None:
    _write(db_path, random.Random(7).randbytes(8192))
    before = _snapshot(db_path.parent)
    store = Store(str(db_path))
    with pytest.raises(StoreCorruptError) as caught:
        await store.open()
    message = str(caught.value)
    assert str(db_path) in message
    assert "Nothing was changed" in message
    assert "backup" in message
    assert "move it aside" in message
    assert "store.path" in message
    assert _snapshot(db_path.parent) == before


async def test_damaged_pages_fail_the_integrity_check_unchanged(db_path: Path) -> None:
    store = Store(str(db_path))
    await store.open()
    for i in range(200):
        await store.insert(_session(f"sess-{i:04d}", user_agent="x" * 200))
    await store.close()
    data = bytearray(_read(db_path))
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) > 4 * page_size
    # Overwrite the body of the third page (a table or index page) with garbage; keep the header.
    data[2 * page_size + 8 : 3 * page_size] = random.Random(3).randbytes(page_size - 8)
    _write(db_path, bytes(data))
    before = _snapshot(db_path.parent)
    with pytest.raises(StoreCorruptError, match="Nothing was changed"):
        await Store(str(db_path)).open()
    assert _snapshot(db_path.parent) == before


async def test_database_from_a_newer_sidecar_is_refused_unchanged(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE future (x)")
        db.execute("PRAGMA user_version=99")
    db.close()
    before = _snapshot(db_path.parent)
    store = Store(str(db_path))
    with pytest.raises(StoreTooNewError) as caught:
        await store.open()
    message = str(caught.value)
    assert "99" in message
    assert "Upgrade mcp-sidecar" in message
    assert "Nothing was changed" in message
    assert _snapshot(db_path.parent) == before
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 99
    db.close()


# ---- writes --------------------------------------------------------------------------------


async def test_insert_writes_every_persisted_field_and_no_credentials(
    store: Store, db_path: Path
) -> None:
    await store.insert(_session(upstream_endpoint=None))
    rows = _rows(db_path, "SELECT * FROM sessions")
    assert rows == [
        (
            "sess-1",
            "streamable_http",
            "auth:abc",
            "python-httpx/0.28",
            "my-ide 1.2",
            "2025-06-18",
            T0,
            T0 + 1,
            3,
            0,
            "live",
            None,
            None,
            None,
            "",  # bound to the only upstream,
            "sess-1",  # whose session id is the client's at creation (SPEC 2.7)
            None,
            None,
            0,
        )
    ]
    assert b"secret" not in _read(db_path)
    assert store.transactions == 1


async def test_insert_mark_closed_write_activity_load_round_trip(
    store: Store, db_path: Path
) -> None:
    a = _session("a")
    b = _session("b", transport=Transport.SSE, upstream_endpoint="/messages/?session_id=b")
    await store.insert(a)
    await store.insert(b)
    await store.write_activity(
        [
            ActivityRow("a", T0 + 50, 7, "2025-11-25"),
            ActivityRow("b", T0 + 60, 9, None),  # None keeps the stored protocol version
        ]
    )
    assert _rows(
        db_path,
        "SELECT id, last_activity_at, requests, protocol_version FROM sessions ORDER BY id",
    ) == [("a", T0 + 50, 7, "2025-11-25"), ("b", T0 + 60, 9, "2025-06-18")]

    b.state = State.CLOSED
    b.close_reason = CloseReason.IDLE_TIMEOUT
    b.closed_at = T0 + 100
    b.last_activity_at = T0 + 61
    b.requests = 10
    await store.mark_closed_many([(b, None)])
    assert _rows(
        db_path,
        "SELECT state, close_reason, closed_at, last_activity_at, requests FROM sessions "
        "WHERE id='b'",
    ) == [("closed", "idle_timeout", T0 + 100, T0 + 61, 10)]
    assert _rows(db_path, "SELECT * FROM pending_closes") == []

    # Activity for a closed session is not written over its final state.
    await store.write_activity([ActivityRow("b", T0 + 999, 99, None)])
    assert _rows(db_path, "SELECT last_activity_at, requests FROM sessions WHERE id='b'") == [
        (T0 + 61, 10)
    ]

    (live,) = await store.load(State.LIVE)
    assert (live.id, live.transport, live.client, live.user_agent, live.client_info) == (
        "a",
        Transport.STREAMABLE_HTTP,
        "auth:abc",
        "python-httpx/0.28",
        "my-ide 1.2",
    )
    assert (live.created_at, live.last_activity_at, live.requests) == (T0, T0 + 50, 7)
    assert live.protocol_version == "2025-11-25"
    assert live.state is State.LIVE
    assert live.close_reason is None
    assert live.closed_at is None
    assert not live.persistent
    assert live.credentials == {}  # never persisted

    (closed,) = await store.load(State.CLOSED)
    assert closed.id == "b"
    assert closed.transport is Transport.SSE
    assert closed.upstream_endpoint == "/messages/?session_id=b"
    assert closed.close_reason is CloseReason.IDLE_TIMEOUT
    assert closed.closed_at == T0 + 100
    assert [s.id for s in await store.load(State.CLOSED, since=T0 + 100)] == ["b"]
    assert await store.load(State.CLOSED, since=T0 + 101) == []

    fetched = await store.get("a")
    assert fetched is not None
    assert fetched.last_activity_at == T0 + 50
    assert await store.get("missing") is None


async def test_mark_closed_records_the_pending_close_in_the_same_transaction(
    store: Store, db_path: Path
) -> None:
    session = _session()
    await store.insert(session)
    session.state = State.CLOSED
    session.close_reason = CloseReason.ADMIN
    session.closed_at = T0 + 5
    before = store.transactions
    await store.mark_closed_many([(session, PendingClose("sess-1", "2025-06-18", 0, T0 + 5))])
    assert store.transactions == before + 1
    assert _rows(db_path, "SELECT * FROM pending_closes") == [
        ("", "sess-1", "2025-06-18", 0, T0 + 5, None)
    ]
    assert _rows(db_path, "SELECT state, close_reason FROM sessions") == [("closed", "admin")]


async def test_pending_closes_save_update_and_drop(store: Store, db_path: Path) -> None:
    await store.save_pending(PendingClose("x", None, 0, T0))
    await store.save_pending(PendingClose("y", "2025-03-26", 0, T0))
    await store.save_pending(PendingClose("x", None, 3, T0 + 8), "HTTP 503")
    assert _rows(db_path, "SELECT * FROM pending_closes ORDER BY session_id") == [
        ("", "x", None, 3, T0 + 8, "HTTP 503"),
        ("", "y", "2025-03-26", 0, T0, None),
    ]
    assert sorted(await store.pending_closes(), key=lambda p: p.session_id) == [
        PendingClose("x", None, 3, T0 + 8),
        PendingClose("y", "2025-03-26", 0, T0),
    ]
    await store.drop_pending(PendingClose("x", None, 0, 0.0))
    assert await store.pending_closes() == [PendingClose("y", "2025-03-26", 0, T0)]
    await store.drop_pending(PendingClose("not-there", None, 0, 0.0))  # dropping twice is harmless
    assert len(await store.pending_closes()) == 1


async def test_set_persistent_is_written_at_once(store: Store, db_path: Path) -> None:
    await store.insert(_session())
    await store.set_persistent("sess-1", True)
    assert _rows(db_path, "SELECT persistent FROM sessions") == [(1,)]
    (loaded,) = await store.load(State.LIVE)
    assert loaded.persistent
    await store.set_persistent("sess-1", False)
    assert _rows(db_path, "SELECT persistent FROM sessions") == [(0,)]


async def _closed(store: Store, session_id: str, closed_at: float) -> None:
    session = _session(session_id)
    await store.insert(session)
    session.state = State.CLOSED
    session.close_reason = CloseReason.IDLE_TIMEOUT
    session.closed_at = closed_at
    await store.mark_closed_many([(session, None)])


async def test_purge_tombstones_keeps_recent_ones_live_ones_and_those_owing_a_close(
    store: Store, db_path: Path
) -> None:
    await _closed(store, "old", T0)
    await _closed(store, "old-owed", T0)
    await _closed(store, "recent", T0 + 100)
    await store.insert(_session("live", created_at=T0 - 1000, last_activity_at=T0 - 1000))
    await store.save_pending(PendingClose("old-owed", None, 2, T0 + 500))
    assert await store.purge_tombstones(older_than=T0 + 50) == 1
    assert _rows(db_path, "SELECT id FROM sessions ORDER BY id") == [
        ("live",),
        ("old-owed",),
        ("recent",),
    ]
    before = store.transactions
    assert await store.purge_tombstones(older_than=T0 + 50) == 0
    assert store.transactions == before  # nothing to delete: no write transaction
    await store.drop_pending(PendingClose("old-owed", None, 0, 0.0))
    assert await store.purge_tombstones(older_than=T0 + 50) == 1
    assert _rows(db_path, "SELECT id FROM sessions ORDER BY id") == [("live",), ("recent",)]


async def test_transactions_count_each_commit_and_skip_empty_flushes(store: Store) -> None:
    assert store.transactions == 0
    await store.insert(_session("a"))
    await store.insert(_session("b"))
    assert store.transactions == 2
    await store.write_activity([])
    assert store.transactions == 2
    await store.write_activity([ActivityRow(i, T0 + 9, 1, None) for i in ("a", "b")])
    assert store.transactions == 3
    await store.save_pending(PendingClose("a", None, 0, T0))
    await store.drop_pending(PendingClose("a", None, 0, 0.0))
    await store.set_persistent("a", True)
    assert store.transactions == 6


async def test_failed_write_rolls_back_and_is_a_store_error(store: Store, db_path: Path) -> None:
    await store.insert(_session())
    with sqlite3.connect(db_path) as other:
        other.execute(
            "CREATE TRIGGER no_updates BEFORE UPDATE ON sessions "
            "BEGIN SELECT RAISE(ABORT, 'read only for the test'); END"
        )
    other.close()
    before = store.transactions
    with pytest.raises(StoreError, match="check disk space and permissions"):
        await store.write_activity([ActivityRow("sess-1", T0 + 9, 9, None)])
    assert store.transactions == before
    assert not store.db.in_transaction
    # The store is still usable afterwards.
    await store.save_pending(PendingClose("sess-1", None, 0, T0))
    assert store.transactions == before + 1


# ---- read-only access (CLI --db) -------------------------------------------------------------


async def test_read_sessions_reads_without_changing_the_file(db_path: Path) -> None:
    store = Store(str(db_path))
    await store.open()
    await store.insert(_session("b", created_at=T0 + 1))
    await store.insert(_session("a", created_at=T0 - 1))
    await _closed(store, "c", T0 + 3)
    await store.close()
    before = _read(db_path)
    # Oldest first, whatever the state.
    assert [s.id for s in read_sessions(str(db_path))] == ["a", "c", "b"]
    assert [s.id for s in read_sessions(str(db_path), State.LIVE)] == ["a", "b"]
    (closed,) = read_sessions(str(db_path), State.CLOSED)
    assert (closed.id, closed.close_reason) == ("c", CloseReason.IDLE_TIMEOUT)
    # The database itself is untouched (SQLite may leave empty -wal/-shm files beside a WAL
    # database opened read-only; they hold no data).
    assert _read(db_path) == before


async def test_read_sessions_sees_committed_rows_while_the_service_runs(
    store: Store, db_path: Path
) -> None:
    await store.insert(_session())
    assert [s.id for s in read_sessions(str(db_path))] == ["sess-1"]
    with (
        pytest.raises(sqlite3.OperationalError, match="readonly"),
        sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db,
    ):
        db.execute("DELETE FROM sessions")


def test_read_sessions_refuses_a_missing_file_without_creating_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(StoreError, match=r"does not exist; pass the service's store.path"):
        read_sessions(str(missing))
    assert not missing.exists()


def test_read_sessions_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreTooNewError, match="99"):
        read_sessions(str(path))


def test_read_sessions_on_a_foreign_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    path.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(StoreError, match="is it an mcp-sidecar database"):
        read_sessions(str(path))


# ---- concurrency -------------------------------------------------------------------------------


async def test_concurrent_writers_all_land_and_concurrent_creations_share_commits(
    store: Store, db_path: Path
) -> None:
    # Requests, the flusher and the closer's parallel attempts share one connection. Each
    # retry record is its own transaction; concurrent inserts are group-committed.
    await asyncio.gather(
        *(store.insert(_session(f"s{i:02d}")) for i in range(20)),
        *(store.save_pending(PendingClose(f"p{i:02d}", None, 0, T0)) for i in range(20)),
    )
    assert 20 < store.transactions < 40
    assert len(_rows(db_path, "SELECT id FROM sessions")) == 20
    assert len(_rows(db_path, "SELECT session_id FROM pending_closes")) == 20


async def test_each_grouped_insert_is_on_disk_when_its_await_returns(
    store: Store, db_path: Path
) -> None:
    async def insert_then_read(session_id: str) -> list[tuple[object, ...]]:
        await store.insert(_session(session_id))
        return _rows(db_path, "SELECT id FROM sessions WHERE id=?", (session_id,))

    found = await asyncio.gather(*(insert_then_read(f"g{i:02d}") for i in range(50)))
    assert all(rows == [(f"g{i:02d}",)] for i, rows in enumerate(found))
    assert store.transactions < 50


async def test_a_group_larger_than_one_statement_is_one_transaction_and_every_row_exact(
    store: Store, db_path: Path
) -> None:
    # More rows than one batched statement holds (BATCH_ROWS): several statements, still one
    # commit after the first insert's own, and every field as it was given.
    await store.insert(_session("first"))
    count = BATCH_ROWS * 2 + 7
    sessions = [
        _session(f"b{i:04d}", created_at=T0 + i / 7, client_info=f"c{i} é", requests=i)
        for i in range(count)
    ]
    before = store.transactions
    await asyncio.gather(*(store.insert(s) for s in sessions))
    assert store.transactions == before + 1
    stored = {s.id: _fields(s) for s in await store.load(State.LIVE)}
    assert all(stored[s.id] == _fields(s) for s in sessions)


async def test_a_group_of_one_statement_that_fails_on_one_row_writes_none_of_them(
    store: Store, db_path: Path
) -> None:
    # A group that is one multi-row INSERT runs without BEGIN/COMMIT (the connection
    # autocommits, one hop instead of three): SQLite still undoes the whole statement, and
    # every caller of the group hears the error.
    await store.insert(_session("first"))
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON sessions WHEN NEW.id = 'g05' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        db.commit()
    before = store.transactions
    outcomes = await asyncio.gather(
        *(store.insert(_session(f"g{i:02d}")) for i in range(10)), return_exceptions=True
    )
    assert all(isinstance(outcome, StoreError) for outcome in outcomes)
    assert _rows(db_path, "SELECT id FROM sessions") == [("first",)]
    assert store.transactions == before
    assert not store.db.in_transaction
    await store.insert(_session("after"))
    assert _rows(db_path, "SELECT id FROM sessions WHERE id = 'after'") == [("after",)]


def test_batched_drops_of_owed_deletes_look_keys_up_not_scan_the_table() -> None:
    # With 100,000 owed DELETEs a scan per group of drops cut the close rate to a fifth.
    [(sql, params)] = _batched([("drop_pending", ("up", f"s{i}"), None) for i in range(3)])
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.executescript(MIGRATIONS[0] + MIGRATIONS[1])
        plan = " ".join(str(row[3]) for row in db.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "SEARCH pending_closes USING" in plan, plan
    assert "SCAN pending_closes" not in plan, plan


async def test_grouped_drops_and_inserts_share_a_commit_and_each_lands(
    store: Store, db_path: Path
) -> None:
    owed = [PendingClose(f"p{i:02d}", None, 0, T0, "up-a" if i % 2 else "") for i in range(30)]
    for pending in owed:
        await store.save_pending(pending)
    kept = PendingClose("p00", None, 0, T0, "up-b")  # same session id, another upstream
    await store.save_pending(kept)
    await store.insert(_session("first"))
    before = store.transactions
    await asyncio.gather(
        *(store.drop_pending(p) for p in owed),
        *(store.insert(_session(f"n{i}")) for i in range(30)),
    )
    assert store.transactions == before + 1
    assert _rows(db_path, "SELECT upstream, session_id FROM pending_closes") == [("up-b", "p00")]
    assert len(_rows(db_path, "SELECT id FROM sessions WHERE id LIKE 'n%'")) == 30


@pytest.mark.parametrize("yields", range(8))
async def test_a_cancelled_write_neither_wedges_the_store_nor_half_happens(
    store: Store, db_path: Path, yields: int
) -> None:
    await store.insert(_session())
    task = asyncio.create_task(store.write_activity([ActivityRow("sess-1", T0 + 50, 50, None)]))
    for _ in range(yields):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # The next write must work (no transaction left open on the shared connection) ...
    await store.save_pending(PendingClose("sess-1", None, 0, T0))
    assert not store.db.in_transaction
    # ... and the cancelled one either committed whole or not at all.
    assert _rows(db_path, "SELECT last_activity_at, requests FROM sessions") in (
        [(T0 + 1, 3)],
        [(T0 + 50, 50)],
    )


async def test_closing_waits_for_a_write_whose_caller_was_cancelled(db_path: Path) -> None:
    # Shutdown cancels the closer's attempts, then closes the store: the write still lands.
    store = Store(str(db_path))
    await store.open()
    task = asyncio.create_task(store.save_pending(PendingClose("owed", None, 1, T0)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await store.close()
    assert _rows(db_path, "SELECT session_id, attempts FROM pending_closes") == [("owed", 1)]


def test_activity_flush_looks_sessions_up_by_id_not_by_scanning_the_batch() -> None:
    """The flush is one UPDATE ... FROM json_each. If SQLite drove it from the state index it
    would scan the whole JSON batch once per live session (quadratic: 1,000 dirty sessions
    took half a second); the plan must walk the batch and look each id up."""
    from sidecar.store.sqlite import _FLUSH_SQL, MIGRATIONS

    db = sqlite3.connect(":memory:")
    for migration in MIGRATIONS:
        db.executescript(migration)
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + _FLUSH_SQL, ("[]",)))
    assert plan.startswith("SCAN j"), plan
    assert "SEARCH s USING INDEX sqlite_autoindex_sessions_1 (id=?)" in plan, plan


async def test_hibernating_many_is_two_statements_and_every_row_exact(
    store: Store, db_path: Path
) -> None:
    """Hibernating all 100,000 sessions took 38 s at a statement per row (each a round trip
    to the connection's thread): the rows now go as JSON arrays, as the closes do."""
    from sidecar.sessions import ResumeState

    count = 1200
    sessions = [_session(f"h{i:04d}", binding=Binding("up", f"u{i}")) for i in range(count)]
    await asyncio.gather(*(store.insert(s) for s in sessions))
    entries: list[tuple[Session, PendingClose | None]] = []
    for i, session in enumerate(sessions):
        session.state = State.DORMANT
        session.binding = None
        session.dormant_since = T0 + 100 + i / 7
        session.last_activity_at = T0 + 50 + i / 3
        session.requests = i
        # Every third one with resume state (quotes and non-ASCII included), the rest none.
        session.resume = (
            ResumeState({"protocolVersion": "2025-06-18", "x": f'"é{i}'}, "debug", [f"r{i}"])
            if i % 3 == 0
            else None
        )
        owed = PendingClose(f"u{i}", "2025-06-18", 0, T0 + 100, "up") if i % 2 else None
        entries.append((session, owed))
    statements: list[str] = []
    await store.db.set_trace_callback(statements.append)
    await store.hibernate_many(entries)
    await store.db.set_trace_callback(None)
    assert [s.split()[0] for s in statements] == ["BEGIN", "UPDATE", "INSERT", "COMMIT"]

    stored = {s.id: s for s in await store.load(State.DORMANT)}
    assert len(stored) == count
    for session in sessions:
        got = stored[session.id]
        assert got.binding is None
        assert (got.dormant_since, got.last_activity_at, got.requests) == (
            session.dormant_since,
            session.last_activity_at,
            session.requests,
        )
        assert got.resume == session.resume
    owed_rows = _rows(db_path, "SELECT session_id FROM pending_closes ORDER BY session_id")
    assert sorted(r[0] for r in owed_rows) == sorted(f"u{i}" for i in range(1, count, 2))


def test_hibernating_looks_sessions_up_by_id_not_by_scanning_the_batch() -> None:
    from sidecar.store.sqlite import _HIBERNATE_SQL

    db = sqlite3.connect(":memory:")
    for migration in MIGRATIONS:
        db.executescript(migration)
    steps = db.execute("EXPLAIN QUERY PLAN " + _HIBERNATE_SQL, ("[]",))
    plan = " | ".join(row[3] for row in steps)
    assert plan.startswith("SCAN j"), plan
    assert "SEARCH s USING" in plan, plan
    assert "sqlite_autoindex_sessions_1 (id=?)" in plan, plan
