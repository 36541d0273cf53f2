"""WAL checkpoints of the SQLite store, off the request path.

SQLite's automatic checkpoint (every 1,000 WAL pages) runs inside whichever commit crosses that
mark, on the writer's connection and thread: its fsyncs (~9 ms on a quiet disk, seconds on a
loaded one) then hold a whole group commit of `initialize`s, each waiting for its row to be
durable before it answers, and the activity flush behind them. The store turns it off on its
writer (`wal_autocheckpoint=0`) and this task does the work instead, on a connection (and so a
thread) of its own: a PASSIVE checkpoint never takes the write lock, so commits keep appending
to the WAL while it copies pages into the database file and syncs it.

Durability is what it was: with `synchronous=NORMAL` a commit is in the WAL when it returns,
which is what survives a kill -9; checkpoints only move committed pages into the database file.
How full the WAL is comes from the WAL-index header in the `-shm` file (SQLite's documented
format), read without a lock: asking SQLite would take a checkpoint. A checkpoint that fails
(a full disk, an I/O error) is logged and counted and tried again at the
next look; it never reaches a writer. Each checkpoint opens its own short-lived connection, so
no file of a filesystem that failed stays open here (it could not be unmounted and mounted
again, as the writer's reopening after an I/O error expects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import aiosqlite

from ..aio import uncancellable

log = logging.getLogger("sidecar.store")

# Checkpoint when the WAL holds this many frames (pages) not yet copied: SQLite's
# own automatic threshold, so the writer starts the WAL over (and syncs its header, the one
# fsync left on the writer) as often as before, and the checkpoints' copying and fsyncs move
# off it. Looked at four times a second, and only after a commit: idle, nothing is done.
WAL_PAGES = 1000
INTERVAL = 0.25

# The writer starts the WAL over only when a transaction begins with every frame checkpointed.
# A PASSIVE checkpoint runs beside the writes, so under writes without a pause (a long burst of
# `initialize`s), or while a reader needs old frames (a long read, the CLI's `--db`), it never
# quite catches up and the WAL grows. Past this many frames (64 MiB of 4 KiB pages) a RESTART
# checkpoint follows the PASSIVE one: it blocks new write transactions while it copies the
# tail the PASSIVE one left and waits for readers, so the next commit starts the WAL over.
# One such pause per 16,384 pages, where SQLite's own checkpoint paused a commit every 1,000.
# (A TRUNCATE here cost the writer ~57 ms against ~10 ms: shrinking a 64 MiB file on ext4.
# The file keeps its size, reused; the final checkpoint at close truncates it.)
WAL_LIMIT_FRAMES = 16_384

# How long a RESTART (or the final TRUNCATE) waits for the writer and readers: it blocks new
# write transactions meanwhile, so briefly; the next look tries again.
BLOCKING_WAIT = 0.2


class Checkpointer:
    """The store's background checkpoint task (started at open, stopped at close)."""

    def __init__(
        self,
        path: str,
        commits: Callable[[], int],
        interval: float = INTERVAL,
        wal_pages: int = WAL_PAGES,
        wal_limit_frames: int = WAL_LIMIT_FRAMES,
    ) -> None:
        self.path = path
        # `mode=rw`: never creates the file (a store directory that went away stays gone).
        self._uri = Path(path).absolute().as_uri() + "?mode=rw"
        self._shm = path + "-shm"
        self.interval = interval
        self.wal_pages = wal_pages
        self.wal_limit_frames = wal_limit_frames
        self.checkpoints = 0  # completed checkpoints (PASSIVE, RESTART or TRUNCATE)
        self.failures = 0  # failed ones: logged, counted, tried again
        # The last one's (busy, WAL frames, frames checkpointed), and the commits the loop had
        # seen when its last checkpoint began (-1: none yet).
        self.last: tuple[int, int, int] | None = None
        self.checkpointed = -1
        self.looked = -1  # the commits at the last look that found nothing due
        self.on_failure: Callable[[], None] = _nothing  # metrics hook
        self._commits = commits
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.checkpointed = self.looked = -1
        self._task = asyncio.create_task(self._run(), name="sqlite-checkpoint")

    async def stop(self) -> None:
        """Cancel the loop (a checkpoint under way finishes), then, if it was running, a
        final TRUNCATE, so a stopped sidecar leaves a small WAL even when another process
        keeps the file open (the writer's close, as the last connection, removes it)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await self.checkpoint("TRUNCATE")

    def caught_up(self) -> bool:
        """Has the loop dealt with every commit (checkpointed it, or found nothing due)?"""
        return self._commits() in (self.checkpointed, self.looked)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            commits = self._commits()
            if commits in (self.checkpointed, self.looked):
                continue
            frames = _wal_frames(self._shm)
            if frames is _TORN:
                continue  # a commit was writing the header: the next look reads it again
            if frames is not None and not self._due(*frames):
                self.looked = commits
                continue
            # Due, or the WAL index is not what this code knows: checkpoint, never let it grow.
            if await uncancellable(self.checkpoint()) is not None:
                self.checkpointed = commits  # a failed one stays due: tried at the next look

    def _due(self, written: int, copied: int) -> bool:
        # Frames not yet copied: the whole WAL after a restart, as SQLite counts; only the new
        # ones while writes never pause (the WAL is not started over, PASSIVE copies as it goes).
        return written - copied >= self.wal_pages

    async def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int] | None:
        """One checkpoint: SQLite's (busy, WAL frames, frames checkpointed), or None when it
        failed (logged and counted, never raised). A PASSIVE one that finds the WAL past
        `wal_limit_frames` is followed by a RESTART one."""
        try:
            result = await self._checkpoint(mode)
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            return None
        self.checkpoints += 1
        self.last = result
        if self._failing:
            self._failing = False
            log.info("WAL checkpoints of %s work again", self.path)
        return result

    async def _checkpoint(self, mode: str) -> tuple[int, int, int]:
        db = await aiosqlite.connect(self._uri, uri=True, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout={int(BLOCKING_WAIT * 1000)}")
            result = await _wal_checkpoint(db, mode)
            if mode == "PASSIVE" and result[1] > self.wal_limit_frames:
                log.info(
                    "the WAL of %s passed %d frames (%d, %d checkpointed); a RESTART "
                    "checkpoint starts it over",
                    self.path,
                    self.wal_limit_frames,
                    result[1],
                    result[2],
                )
                result = await _wal_checkpoint(db, "RESTART")
            return result
        finally:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.close()

    def _failed(self, exc: sqlite3.Error | OSError) -> None:
        self.failures += 1
        self.on_failure()
        # One warning per run of failures (a full disk fails at every look until freed).
        if not self._failing:
            self._failing = True
            log.warning(
                "WAL checkpoint of %s failed (%s); writes go on into the WAL, tried again "
                "every %gs; check disk space",
                self.path,
                exc,
                self.interval,
            )


async def _wal_checkpoint(db: aiosqlite.Connection, mode: str) -> tuple[int, int, int]:
    async with db.execute(f"PRAGMA wal_checkpoint({mode})") as cursor:
        row = await cursor.fetchone()
    assert row is not None  # the pragma always answers one row
    return int(row[0]), int(row[1]), int(row[2])


# The WAL-index header at the start of the `-shm` file (https://sqlite.org/walformat.html,
# 2.5.1; native byte order): two copies of 48 bytes, then the checkpoint info. Read without a
# lock, as SQLite's own readers first do: a copy torn by a concurrent commit differs from the
# other and is ignored.
_HEADER = struct.Struct("=I4xI4xI")  # iVersion, iChange, mxFrame (isInit is byte 12)
_WAL_INDEX_VERSION = 3007000


_TORN = (-1, -1)


def _wal_frames(shm: str) -> tuple[int, int] | None:
    """Frames in the WAL and frames already checkpointed; `_TORN` when the two copies of the
    header differ (a commit is writing them); None when the file cannot be read as a WAL
    index of the known version."""
    try:
        with open(shm, "rb") as f:
            data = f.read(100)
    except OSError:
        return None
    if len(data) < 100 or data[12] != 1:
        return None
    if data[:48] != data[48:96]:
        return _TORN
    version, _, mx_frame = _HEADER.unpack_from(data)
    if version != _WAL_INDEX_VERSION:
        return None
    (backfilled,) = struct.unpack_from("=I", data, 96)
    return mx_frame, backfilled


def _nothing() -> None:
    pass
