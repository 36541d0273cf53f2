"""The SQLite store's WAL checkpoints, off the writer's connection (`sidecar.store.checkpoint`),
on real temporary SQLite files; the failing checkpoint on a real full filesystem."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sidecar.sessions import Session, Transport
from sidecar.store.sqlite import SqliteStore
from tests.peers.disk import fill
from tests.peers.mcp_clients import eventually

T0 = 1_700_000_000.0


def _session(n: int) -> Session:
    return Session(
        id=f"sess-{n:06d}-" + "x" * 32,
        transport=Transport.STREAMABLE_HTTP,
        client="auth:abc",
        created_at=T0,
        last_activity_at=T0,
    )


async def _insert(store: SqliteStore, numbers: range) -> None:
    """Concurrent inserts: one group commit (or a few)."""
    await asyncio.gather(*(store.insert(_session(n)) for n in numbers))


def _caught_up(store: SqliteStore) -> Callable[[], bool]:
    return store.checkpointer.caught_up


def _wal_size(db_path: Path) -> int:
    return os.stat(f"{db_path}-wal").st_size


def _wal_exists(db_path: Path) -> bool:
    return os.path.exists(f"{db_path}-wal")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    """A store whose checkpoint loop looks often and checkpoints any frame it finds."""
    store = SqliteStore(str(db_path))
    store.checkpointer.interval = 0.01
    store.checkpointer.wal_pages = 1
    await store.open()
    yield store
    await store.close()


async def test_the_writer_never_checkpoints_inside_a_commit(db_path: Path) -> None:
    """SQLite's automatic checkpoint is off on the writer: with the loop not looking, 600
    commits (~2,000 WAL pages, twice SQLite's 1,000-page mark) all stay in the WAL."""
    store = SqliteStore(str(db_path))
    store.checkpointer.interval = 3600.0
    await store.open()
    try:
        async with store.db.execute("PRAGMA wal_autocheckpoint") as cursor:
            assert await cursor.fetchone() == (0,)
        for n in range(600):
            await store.insert(_session(n))  # one commit each
        assert _wal_size(db_path) > 1500 * 4096
        busy, frames, done = await store.checkpointer.checkpoint() or (-1, -1, -1)
        assert busy == 0
        assert frames == done > 1500
    finally:
        await store.close()


async def test_background_checkpoint_copies_the_wal_and_the_writer_starts_it_over(
    store: SqliteStore, db_path: Path
) -> None:
    await _insert(store, range(2000))
    await eventually(_caught_up(store), interval=0.005, what="caught up")
    busy, frames, done = store.checkpointer.last or (-1, -1, -1)
    assert busy == 0
    assert frames == done > 0  # every frame copied into the database file
    size = _wal_size(db_path)
    # The next commit finds the WAL checkpointed and writes it from the start again.
    await store.insert(_session(9999))
    await eventually(_caught_up(store), interval=0.005, what="caught up")
    busy, frames, done = store.checkpointer.last or (-1, -1, -1)
    assert busy == 0
    assert 0 < frames == done < 20
    assert _wal_size(db_path) == size
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone() == (2001,)
    db.close()


async def test_the_loop_checkpoints_once_the_wal_holds_sqlites_1000_pages(
    db_path: Path,
) -> None:
    store = SqliteStore(str(db_path))
    store.checkpointer.interval = 0.01
    await store.open()
    try:
        await _insert(store, range(50))  # a few dozen pages
        await eventually(_caught_up(store), interval=0.005, what="caught up")
        assert store.checkpointer.checkpoints == 0  # looked, found nothing due
        for n in range(100, 500):
            await store.insert(_session(n))  # one commit each: past 1,000 pages
        await eventually(_caught_up(store), interval=0.005, what="caught up")
        busy, frames, done = store.checkpointer.last or (-1, -1, -1)
        assert busy == 0
        assert frames == done >= 1000
    finally:
        await store.close()


async def test_a_wal_past_its_limit_is_started_over_by_a_restart_checkpoint(
    store: SqliteStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.checkpointer.wal_limit_frames = 0  # every WAL is past it
    caplog.set_level(logging.INFO, logger="sidecar.store")
    await _insert(store, range(500))
    await eventually(_caught_up(store), interval=0.005, what="caught up")
    assert "a RESTART checkpoint starts it over" in caplog.text
    await store.insert(_session(9999))  # written from the WAL's start
    await eventually(_caught_up(store), interval=0.005, what="caught up")
    busy, frames, done = store.checkpointer.last or (-1, -1, -1)
    assert busy == 0
    assert 0 < frames == done < 20


async def test_closing_stops_the_task_and_leaves_an_empty_wal_beside_a_reader(
    db_path: Path,
) -> None:
    store = SqliteStore(str(db_path))
    await store.open()
    await _insert(store, range(500))
    # Another process's open connection keeps the store's close from being the last one,
    # which would remove the WAL anyway; the final TRUNCATE empties it all the same.
    reader = sqlite3.connect(db_path)
    try:
        assert reader.execute("SELECT COUNT(*) FROM sessions").fetchone() == (500,)
        await store.close()
        assert _wal_size(db_path) == 0
        assert [t for t in asyncio.all_tasks() if t.get_name() == "sqlite-checkpoint"] == []
    finally:
        reader.close()
    assert not _wal_exists(db_path)  # the last connection's close removed it


# ---- a failing checkpoint, on a real full filesystem ----------------------------------------


async def test_a_failing_checkpoint_is_logged_counted_retried_and_writes_go_on(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(str(small_disk / "sessions.db"))
    store.checkpointer.interval = 0.01
    store.checkpointer.wal_pages = 1
    counted: list[int] = []
    store.checkpointer.on_failure = lambda: counted.append(1)
    caplog.set_level(logging.INFO, logger="sidecar.store")
    await store.open()
    try:
        # A WAL that has held 400 rows, checkpointed: later commits reuse its space.
        await _insert(store, range(400))
        await eventually(_caught_up(store), interval=0.005, what="caught up")
        filler = fill(small_disk)
        try:
            # Fit in the WAL's space; checkpointing them needs the database file to grow.
            await _insert(store, range(1000, 1200))
            # Retried at each look, not given up.
            await eventually(lambda: store.checkpointer.failures >= 2, interval=0.005)
            await store.insert(_session(5000))  # the writer goes on meanwhile
        finally:
            filler.unlink()
        await eventually(_caught_up(store), interval=0.005, what="caught up")
    finally:
        await store.close()
    assert len(counted) == store.checkpointer.failures >= 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per run of failures, not one per attempt
    assert "database or disk is full" in warnings[0].getMessage()
    assert "work again" in caplog.text
    with sqlite3.connect(small_disk / "sessions.db") as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone() == (601,)
    db.close()
