"""A v1 database written by the previous release opens under v2 with every session intact.

The v1 files here are built with plain `sqlite3` from `MIGRATIONS[0]`, in WAL mode and with
rows exactly as the v1 release wrote them, so the test does not depend on the code it checks.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from sidecar.errors import StoreCorruptError, StoreError, StoreTooNewError
from sidecar.sessions import Binding, CloseReason, Session, State, Transport
from sidecar.store import PendingClose
from sidecar.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore, read_sessions

T0 = 1_700_000_000.0

V1_COLUMNS = (
    "id",
    "transport",
    "client",
    "user_agent",
    "client_info",
    "protocol_version",
    "created_at",
    "last_activity_at",
    "requests",
    "persistent",
    "state",
    "close_reason",
    "closed_at",
    "upstream_endpoint",
)

# The rows as the v1 release's `insert`, `write_activity` and `mark_closed` left them.
V1_SESSIONS: dict[str, dict[str, object]] = {
    "live-streamable": {
        "transport": "streamable_http",
        "client": "auth:abc",
        "user_agent": "python-httpx/0.28",
        "client_info": "my-ide 1.2",
        "protocol_version": "2025-06-18",
        "created_at": T0,
        "last_activity_at": T0 + 40,
        "requests": 12,
        "persistent": 0,
        "state": "live",
        "close_reason": None,
        "closed_at": None,
        "upstream_endpoint": None,
    },
    "live-sse": {
        "transport": "sse",
        "client": "ip:10.0.0.7",
        "user_agent": "node",
        "client_info": "inspector 0.9",
        "protocol_version": "2024-11-05",
        "created_at": T0 + 1,
        "last_activity_at": T0 + 30,
        "requests": 4,
        "persistent": 0,
        "state": "live",
        "close_reason": None,
        "closed_at": None,
        "upstream_endpoint": "/messages/?session_id=0f3c9a",
    },
    "closed-1": {
        "transport": "streamable_http",
        "client": "auth:def",
        "user_agent": "curl/8.5",
        "client_info": "",
        "protocol_version": "2025-03-26",
        "created_at": T0 + 2,
        "last_activity_at": T0 + 20,
        "requests": 2,
        "persistent": 0,
        "state": "closed",
        "close_reason": "idle_timeout",
        "closed_at": T0 + 100,
        "upstream_endpoint": None,
    },
    "pinned": {
        "transport": "streamable_http",
        "client": "auth:abc",
        "user_agent": "python-httpx/0.28",
        "client_info": "batch-job 3",
        "protocol_version": None,
        "created_at": T0 + 3,
        "last_activity_at": T0 + 3,
        "requests": 0,
        "persistent": 1,
        "state": "live",
        "close_reason": None,
        "closed_at": None,
        "upstream_endpoint": None,
    },
}

# The closed session's DELETE, still owed after two failed attempts.
V1_PENDING = ("closed-1", "2025-03-26", 2, T0 + 200, "HTTP 503")


def _write_v1(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")  # as the v1 release ran it
        db.executescript(MIGRATIONS[0])
        db.execute("PRAGMA user_version=1")
        for session_id, row in V1_SESSIONS.items():
            db.execute(
                f"INSERT INTO sessions ({', '.join(V1_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(V1_COLUMNS))})",
                (session_id, *(row[c] for c in V1_COLUMNS[1:])),
            )
        db.execute(
            "INSERT INTO pending_closes "
            "(session_id, protocol_version, attempts, next_attempt_at, last_error) "
            "VALUES (?, ?, ?, ?, ?)",
            V1_PENDING,
        )
    db.close()


def _user_version(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
    db.close()
    return version


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _v1_fields(session: Session) -> dict[str, object]:
    """A session's fields in the v1 row's terms, to compare with `V1_SESSIONS`."""
    return {
        "transport": session.transport.value,
        "client": session.client,
        "user_agent": session.user_agent,
        "client_info": session.client_info,
        "protocol_version": session.protocol_version,
        "created_at": session.created_at,
        "last_activity_at": session.last_activity_at,
        "requests": session.requests,
        "persistent": int(session.persistent),
        "state": session.state.value,
        "close_reason": None if session.close_reason is None else session.close_reason.value,
        "closed_at": session.closed_at,
        "upstream_endpoint": session.upstream_endpoint,
    }


def _assert_as_v1_wrote_them(sessions: list[Session]) -> None:
    by_id = {s.id: s for s in sessions}
    assert sorted(by_id) == sorted(V1_SESSIONS)
    for session_id, row in V1_SESSIONS.items():
        session = by_id[session_id]
        assert _v1_fields(session) == row, session_id
        # Every v1 session keeps its own id as its upstream id (SPEC 2.7).
        assert session.binding == Binding("", session_id), session_id
        assert session.resume is None
        assert session.dormant_since is None
        assert session.resumes == 0
        assert session.runtime is None


@pytest.fixture
def v1_path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "sessions.db"
    path.parent.mkdir()
    _write_v1(path)
    assert _user_version(path) == 1
    return path


async def test_v1_database_opens_under_v2_with_every_session_intact(v1_path: Path) -> None:
    store = SqliteStore(str(v1_path))
    await store.open()
    try:
        sessions = [s for state in State for s in await store.load(state)]
        _assert_as_v1_wrote_them(sessions)
        assert sorted(s.id for s in await store.load(State.LIVE)) == [
            "live-sse",
            "live-streamable",
            "pinned",
        ]
        (closed,) = await store.load(State.CLOSED, since=T0 + 100)
        assert (closed.id, closed.close_reason) == ("closed-1", CloseReason.IDLE_TIMEOUT)
        sse = await store.get("live-sse")
        assert sse is not None
        assert sse.transport is Transport.SSE
        assert sse.upstream_endpoint == "/messages/?session_id=0f3c9a"
        assert sse.binding == Binding("", "live-sse")
        pinned = await store.get("pinned")
        assert pinned is not None
        assert pinned.persistent is True

        assert await store.pending_closes() == [
            PendingClose("closed-1", "2025-03-26", 2, T0 + 200, upstream="")
        ]
    finally:
        await store.close()

    assert _user_version(v1_path) == SCHEMA_VERSION == 2
    with sqlite3.connect(v1_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        # The column the store API does not return is kept too.
        assert db.execute(
            "SELECT upstream, session_id, protocol_version, attempts, next_attempt_at, "
            "last_error FROM pending_closes"
        ).fetchall() == [("", *V1_PENDING)]
    db.close()


async def test_migrated_database_keeps_working_under_the_v2_contract(v1_path: Path) -> None:
    """After the migration the owed DELETE still protects its tombstone, and the new
    (upstream, session_id) key and binding columns take writes."""
    store = SqliteStore(str(v1_path))
    await store.open()
    try:
        assert await store.purge_tombstones(older_than=T0 + 10_000) == 0
        (owed,) = await store.pending_closes()
        await store.save_pending(PendingClose("closed-1", None, 0, T0, upstream="up-b"))
        assert len(await store.pending_closes()) == 2
        await store.drop_pending(owed)
        assert await store.pending_closes() == [
            PendingClose("closed-1", None, 0, T0, upstream="up-b")
        ]

        session = await store.get("live-streamable")
        assert session is not None
        session.state = State.DORMANT
        session.binding = None
        session.dormant_since = T0 + 500
        await store.hibernate_many([(session, None)])
        session.state = State.LIVE
        session.binding = Binding("up-b", "upstream-new")
        session.dormant_since = None
        session.resumes = 1
        await store.rebind(session)
        again = await store.get("live-streamable")
        assert again is not None
        assert again.binding == Binding("up-b", "upstream-new")
        assert again.resumes == 1
        assert again.client_info == "my-ide 1.2"
    finally:
        await store.close()


async def test_v1_rows_left_in_the_write_ahead_log_by_a_killed_v1_survive_the_migration(
    tmp_path: Path,
) -> None:
    """The v1 process was killed before a checkpoint: its last commits are only in -wal."""
    running = tmp_path / "running"
    running.mkdir()
    killed = tmp_path / "killed"
    killed.mkdir()
    _write_v1(running / "sessions.db")
    db = sqlite3.connect(running / "sessions.db", isolation_level=None)
    try:
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute(
            "INSERT INTO sessions (id, transport, client, created_at, last_activity_at) "
            "VALUES ('only-in-wal', 'streamable_http', 'auth:xyz', ?, ?)",
            (T0 + 9, T0 + 9),
        )
        db.execute("UPDATE sessions SET requests=13 WHERE id='live-streamable'")
        # What the disk holds at the kill: the database file and its log (no shared memory).
        for name in ("sessions.db", "sessions.db-wal"):
            shutil.copyfile(running / name, killed / name)
    finally:
        db.close()
    assert (killed / "sessions.db-wal").stat().st_size > 0

    store = SqliteStore(str(killed / "sessions.db"))
    await store.open()
    try:
        wal_only = await store.get("only-in-wal")
        assert wal_only is not None
        assert wal_only.binding == Binding("", "only-in-wal")
        updated = await store.get("live-streamable")
        assert updated is not None
        assert updated.requests == 13
        assert len([s for state in State for s in await store.load(state)]) == 5
    finally:
        await store.close()
    assert _user_version(killed / "sessions.db") == 2


def test_read_sessions_reads_a_v1_file_without_migrating_it(v1_path: Path) -> None:
    before = v1_path.read_bytes()

    sessions = read_sessions(str(v1_path))

    _assert_as_v1_wrote_them(sessions)
    assert [s.id for s in sessions] == ["live-streamable", "live-sse", "closed-1", "pinned"]
    assert [s.id for s in read_sessions(str(v1_path), State.CLOSED)] == ["closed-1"]
    assert _user_version(v1_path) == 1
    assert v1_path.read_bytes() == before


async def test_read_sessions_on_a_v1_file_sees_the_bindings_the_migration_makes(
    v1_path: Path, tmp_path: Path
) -> None:
    migrated_path = tmp_path / "migrated.db"
    shutil.copyfile(v1_path, migrated_path)
    store = SqliteStore(str(migrated_path))
    await store.open()
    try:
        migrated = {s.id: s for state in State for s in await store.load(state)}
    finally:
        await store.close()

    read = {s.id: s for s in read_sessions(str(v1_path))}

    assert sorted(read) == sorted(migrated)
    for session_id, session in read.items():
        assert _v1_fields(session) == _v1_fields(migrated[session_id])
        assert session.binding == migrated[session_id].binding
        assert session.resume == migrated[session_id].resume
        assert session.resumes == migrated[session_id].resumes
    assert _user_version(v1_path) == 1


async def test_a_database_from_a_newer_schema_is_refused_and_left_unchanged(
    v1_path: Path,
) -> None:
    with sqlite3.connect(v1_path) as db:
        db.execute("PRAGMA user_version=3")
    db.close()
    before = _snapshot(v1_path.parent)

    store = SqliteStore(str(v1_path))
    with pytest.raises(StoreTooNewError) as caught:
        await store.open()

    message = str(caught.value)
    assert "3" in message
    assert "Nothing was changed" in message
    assert _snapshot(v1_path.parent) == before
    assert _user_version(v1_path) == 3


async def test_a_database_locked_by_another_process_is_reported_locked_not_corrupt(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v1.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("PRAGMA user_version=1")
        db.commit()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's write lock, held
        store = SqliteStore(str(path))
        with pytest.raises(StoreError, match="locked by another process") as caught:
            await store.open()
        assert not isinstance(caught.value, StoreCorruptError)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
