"""The SQLite store (the default backend): the only module that knows SQL.

Durability rules (SPEC 2.6): creating and closing a session are committed before the client
sees the answer; activity times are written behind, all dirty sessions in one transaction per
`store.flush_interval`, so the request rate never becomes the transaction rate. The database
runs in WAL mode with `synchronous=NORMAL`: a crash can lose at most the last transactions'
fsync, never corrupt the file, and readers (the CLI's `--db`) never block the service.
Checkpoints run off the writer's connection, in a task of their own (`checkpoint.py`).

The schema is versioned with `PRAGMA user_version` and migrated forward; a database from a
newer sidecar, or a damaged file, stops the start with a message that says what to do.
Nothing is deleted silently: tombstones are purged only past `tombstone_ttl`, and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from ..aio import Outcome, uncancellable
from ..errors import StoreCorruptError, StoreError, StoreTooNewError
from ..pacing import yield_turn
from ..sessions import Binding, CloseReason, ResumeState, Session, State, Transport
from .checkpoint import Checkpointer
from .records import ActivityRow, PendingClose
from .unshared import UnsharedStore

log = logging.getLogger("sidecar.store")

SCHEMA_VERSION = 2

# Each entry upgrades the schema from version i to i+1 (index 0: empty file -> 1).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        id               TEXT PRIMARY KEY,
        transport        TEXT NOT NULL,
        client           TEXT NOT NULL,
        user_agent       TEXT NOT NULL DEFAULT '',
        client_info      TEXT NOT NULL DEFAULT '',
        protocol_version TEXT,
        created_at       REAL NOT NULL,
        last_activity_at REAL NOT NULL,
        requests         INTEGER NOT NULL DEFAULT 0,
        persistent       INTEGER NOT NULL DEFAULT 0,
        state            TEXT NOT NULL DEFAULT 'live',
        close_reason     TEXT,
        closed_at        REAL,
        upstream_endpoint TEXT
    );
    CREATE INDEX sessions_by_state ON sessions (state, closed_at);
    CREATE TABLE pending_closes (
        session_id       TEXT PRIMARY KEY,
        protocol_version TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL,
        last_error       TEXT
    );
    """,
    # v2 (SPEC 2.7): the client's id is the key, the upstream session behind it a binding
    # that resuming replaces; what a resume replays; dormant sessions. Every v1 session keeps
    # its id as its upstream id. Owed DELETEs are keyed by the upstream session they close.
    """
    ALTER TABLE sessions ADD COLUMN upstream TEXT;
    ALTER TABLE sessions ADD COLUMN upstream_session_id TEXT;
    ALTER TABLE sessions ADD COLUMN resume TEXT;
    ALTER TABLE sessions ADD COLUMN dormant_since REAL;
    ALTER TABLE sessions ADD COLUMN resumes INTEGER NOT NULL DEFAULT 0;
    UPDATE sessions SET upstream = '', upstream_session_id = id;
    CREATE TABLE pending_closes_v2 (
        upstream         TEXT NOT NULL DEFAULT '',
        session_id       TEXT NOT NULL,
        protocol_version TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL,
        last_error       TEXT,
        PRIMARY KEY (upstream, session_id)
    );
    INSERT INTO pending_closes_v2
        (upstream, session_id, protocol_version, attempts, next_attempt_at, last_error)
        SELECT '', session_id, protocol_version, attempts, next_attempt_at, last_error
        FROM pending_closes;
    DROP TABLE pending_closes;
    ALTER TABLE pending_closes_v2 RENAME TO pending_closes;
    """,
)

# The write-behind flush: each JSON element is [last_activity_at, requests, protocol_version,
# client_info, id, resume]; NULL or empty values keep what the row has. The unary `+` keeps
# SQLite from using the state index, which would make it scan the JSON array once per live row
# (1,000 rows: 570 ms); this way it walks the array and looks each id up (2 ms).
_FLUSH_SQL = """
    UPDATE sessions AS s SET
        last_activity_at = json_extract(j.value, '$[0]'),
        requests = json_extract(j.value, '$[1]'),
        protocol_version = COALESCE(json_extract(j.value, '$[2]'), s.protocol_version),
        client_info = COALESCE(NULLIF(json_extract(j.value, '$[3]'), ''), s.client_info),
        resume = COALESCE(json_extract(j.value, '$[5]'), s.resume)
    FROM json_each(?) AS j
    WHERE s.id = json_extract(j.value, '$[4]') AND +s.state = 'live'
"""

_CLOSE_SQL = """
    UPDATE sessions AS s SET
        state = 'closed',
        close_reason = json_extract(j.value, '$[0]'),
        closed_at = json_extract(j.value, '$[1]'),
        last_activity_at = json_extract(j.value, '$[2]'),
        requests = json_extract(j.value, '$[3]')
    FROM json_each(?) AS j
    WHERE s.id = json_extract(j.value, '$[4]')
"""

# Each JSON element is [dormant_since, last_activity_at, requests, resume, id]; the resume state
# is written as it is, NULL included (a dormant session's resume state lives only here).
_HIBERNATE_SQL = """
    UPDATE sessions AS s SET
        state = 'dormant',
        dormant_since = json_extract(j.value, '$[0]'),
        upstream = NULL,
        upstream_session_id = NULL,
        last_activity_at = json_extract(j.value, '$[1]'),
        requests = json_extract(j.value, '$[2]'),
        resume = json_extract(j.value, '$[3]')
    FROM json_each(?) AS j
    WHERE s.id = json_extract(j.value, '$[4]')
"""

_PENDING_SQL = """
    INSERT OR REPLACE INTO pending_closes
        (upstream, session_id, protocol_version, attempts, next_attempt_at, last_error)
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),
        json_extract(value, '$[2]'), json_extract(value, '$[3]'),
        json_extract(value, '$[4]'), NULL
    FROM json_each(?)
"""

_COLUMNS = (
    "id, transport, client, user_agent, client_info, protocol_version, created_at, "
    "last_activity_at, requests, persistent, state, close_reason, closed_at, upstream_endpoint, "
    "upstream, upstream_session_id, resume, dormant_since, resumes"
)
_V1_COLUMNS = _COLUMNS.split(", upstream,", maxsplit=1)[0] + ", '', id, NULL, NULL, 0"


# Group commit: the rows of a group go to SQLite as one multi-row statement (up to
# BATCH_ROWS rows each, parameters bound as usual), so a group of any size costs a few hops to
# aiosqlite's thread and a few sqlite3_step calls, not one of each per row: each hop and each
# step re-takes the GIL from the busy event loop. Per kind: the statement up to its rows, the
# width of a row, and what follows the rows.
_BATCHED: dict[str, tuple[str, int, str]] = {
    "insert": (
        f"INSERT OR REPLACE INTO sessions ({_COLUMNS}) VALUES ",
        _COLUMNS.count(",") + 1,
        "",
    ),
    # Through a subquery: `IN (VALUES ...)` itself made SQLite scan the whole table (100,000
    # owed rows: every drop a full scan), the SELECT lets it look each key up.
    "drop_pending": (
        "DELETE FROM pending_closes WHERE (upstream, session_id) IN "
        "(SELECT column1, column2 FROM (VALUES ",
        2,
        "))",
    ),
}
# Rows per batched statement: 500 x 19 parameters stay under SQLite's default limit (32,766).
BATCH_ROWS = 500


# Rows per statement of the activity flush (one transaction still holds them all): each is
# encoded as JSON on the event loop, ~2 ms for 500.
FLUSH_SLICE = 500

# How long a write waits for another process's lock before it fails: an `initialize` waits
# on this write, so it must end in a 503 within a bounded time, not hang (SPEC 2.5).
BUSY_TIMEOUT = 2.0

# The writer's per-connection settings (a reopened connection needs them again; journal_mode
# is kept in the file). No automatic checkpoint: its fsyncs would run inside whichever commit
# crossed SQLite's 1,000 pages, holding every `initialize` of that group; `Checkpointer` does it.
_WRITER_PRAGMAS = ("PRAGMA synchronous=NORMAL", "PRAGMA wal_autocheckpoint=0")


class SqliteStore(UnsharedStore):
    """Async access to the session database through one aiosqlite connection."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self.transactions = 0  # write transactions committed: for metrics and benchmarks
        # One connection, many writers (requests, flusher, closer attempts): without this, a
        # second BEGIN lands inside the first transaction and one COMMIT ends the other's.
        self._write_lock = asyncio.Lock()
        # Group commit: single-row writes queued while a transaction runs share the next one;
        # each row's `done` hears how that transaction ended.
        self._queued: list[tuple[str, Sequence[Any], Outcome]] = []
        self._committer: asyncio.Task[None] | None = None
        # Set when a write failed with an I/O error (SQLITE_IOERR): the connection's file
        # handles may point at a filesystem that went away (shut down, remounted), so the
        # next write opens a fresh connection first. `_closed`: closed on purpose, never
        # reopened behind the owner's back.
        self._reconnect = False
        self._closed = False
        self.checkpointer = Checkpointer(path, lambda: self.transactions)

    # ---- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        self._closed = False
        self._prepare_directory()
        try:
            self._db = await self._connect()
            await self._check_integrity()
            await self._migrate()
            # WAL only once the file is known to be ours: switching rewrites its header, and
            # a refused file (corrupt, newer schema) must be left exactly as it was.
            await self._db.execute("PRAGMA journal_mode=WAL")
            for pragma in _WRITER_PRAGMAS:
                await self._db.execute(pragma)
        except sqlite3.OperationalError as exc:
            await self.close()
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise _unusable(self.path, exc) from exc
            # A healthy file that another process holds locked is not damaged: say so.
            raise StoreError(
                f"{self.path} is locked by another process ({exc}); stop whatever holds it "
                "(another mcp-sidecar on the same store.path?) and start again"
            ) from exc
        except sqlite3.DatabaseError as exc:
            await self.close()
            raise _unusable(self.path, exc) from exc
        except StoreError:
            await self.close()
            raise
        self.checkpointer.start()

    async def close(self) -> None:
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
        self._closed = True
        async with self._write_lock:  # a write already under way (shielded) finishes first
            await self.checkpointer.stop()  # after the last write: its final TRUNCATE
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()

    async def _connect(self, *pragmas: str) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT)
        try:
            for pragma in (f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}", *pragmas):
                await db.execute(pragma)
        except BaseException:
            await db.close()  # a half-set-up connection must not keep the file open
            raise
        return db

    async def _reopen(self) -> None:
        """A fresh connection after an I/O error (called under the write lock).

        The old one is closed first, whatever it says: its open files keep a filesystem that
        was shut down from being unmounted and mounted again. While the new one cannot be
        opened (the filesystem is still gone) the flag stays and the next write tries again."""
        if self._closed:
            return
        old, self._db = self._db, None
        if old is not None:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await old.close()
        try:
            db = await self._connect(*_WRITER_PRAGMAS)
        except sqlite3.Error as exc:
            raise StoreError(
                f"reopening {self.path} after an I/O error failed ({exc}); check the disk"
            ) from exc
        log.info("reopened %s after an I/O error", self.path)
        self._db = db
        self._reconnect = False

    def _prepare_directory(self) -> None:
        parent = Path(self.path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the directory {parent} for store.path ({exc.strerror}); "
                "create it with write access for the service user, or set store.path"
            ) from exc

    async def _check_integrity(self) -> None:
        async with self.db.execute("PRAGMA quick_check") as cursor:
            row = await cursor.fetchone()
        if row is None or row[0] != "ok":
            raise StoreCorruptError(
                f"{self.path} failed SQLite's integrity check ({row[0] if row else 'no result'}). "
                "Nothing was changed. Restore it from a backup, or move it aside to start "
                "with an empty store (store.path)."
            )

    async def _migrate(self) -> None:
        version = await self._user_version()
        if version > SCHEMA_VERSION:
            raise StoreTooNewError(
                f"{self.path} has schema version {version}, written by a newer mcp-sidecar; "
                f"this version understands up to {SCHEMA_VERSION}. Upgrade mcp-sidecar, or "
                "point store.path at another file. Nothing was changed."
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            log.info("migrating %s to schema version %d", self.path, target)
            await self.db.executescript(
                f"BEGIN; {MIGRATIONS[target - 1]}; PRAGMA user_version={target}; COMMIT;"
            )

    async def _user_version(self) -> int:
        async with self.db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the session store is not open")
        return self._db

    # ---- writes ------------------------------------------------------------------------
    async def _write(
        self,
        statements: Iterable[tuple[str, Sequence[Any]]],
    ) -> None:
        """Run statements in one transaction; any failure rolls the whole of it back.

        Shielded: a caller cancelled mid-transaction (shutdown cancels the closer's attempts)
        must not leave the shared connection inside an open transaction; the write finishes.
        """
        await uncancellable(self._transaction(list(statements)))

    async def _transaction(
        self,
        statements: list[tuple[str, Sequence[Any]]],
    ) -> None:
        async with self._write_lock:
            if self._reconnect:
                await self._reopen()
            db = self.db
            try:
                if len(statements) == 1:
                    # The connection autocommits: one statement is a transaction of its own,
                    # all or nothing, in one hop to aiosqlite's thread instead of three (a
                    # group commit of `initialize`s is usually one multi-row INSERT).
                    await db.execute(*statements[0])
                else:
                    await db.execute("BEGIN IMMEDIATE")
                    for sql, params in statements:
                        await db.execute(sql, params)
                    await db.execute("COMMIT")
            except sqlite3.Error as exc:
                if _is_io_error(exc):
                    self._reconnect = True
                # The ROLLBACK fails too when the disk is gone; the write's error is the news.
                with contextlib.suppress(sqlite3.Error):
                    if db.in_transaction:
                        await db.execute("ROLLBACK")
                raise StoreError(
                    f"writing to {self.path} failed ({exc}); check disk space and permissions"
                ) from exc
            self.transactions += 1

    async def _write_grouped(self, batch: str, row: Sequence[Any]) -> None:
        """One row of a batched statement (`_BATCHED`), durable when this returns, in a
        transaction it may share.

        Concurrent `initialize`s each need their session committed before they answer
        (SPEC 2.6); one transaction each capped creation at ~730/s. Rows that arrive while a
        transaction is under way wait for the next one, which commits them all: each caller
        still hears only after its own row is on disk, or gets the StoreError that rolled the
        whole group back. A caller that goes away does not take its row out of the queue: the
        row is written all the same, as `_write` finishes a cancelled caller's transaction.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(batch, row, functools.partial(_settle, future))
        await future

    def _enqueue(self, batch: str, row: Sequence[Any], done: Outcome) -> None:
        self._queued.append((batch, row, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued(), name="sqlite-group")

    async def _commit_queued(self) -> None:
        while self._queued:
            group, self._queued = self._queued, []
            try:
                await uncancellable(self._transaction(_batched(group)))
            except BaseException as exc:
                _tell(group, exc)
                if not isinstance(exc, StoreError):
                    raise
            else:
                _tell(group, None)

    async def insert(self, session: Session) -> None:
        await self._write_grouped("insert", _row(session))

    def insert_then(self, session: Session, done: Outcome) -> None:
        """The insert joins the group commit with no task or future of its own: an
        `initialize` hears from the committer itself (issue 10: a task per creation was
        ~5% of its CPU)."""
        self._enqueue("insert", _row(session), done)

    async def mark_closed_many(self, closes: Sequence[tuple[Session, PendingClose | None]]) -> None:
        """Close sessions and record the DELETEs they owe, all in one transaction: either
        every close is on disk or none is (the caller keeps those for a later retry)."""
        if not closes:
            return
        # Two statements, the rows passed as JSON arrays (as the flush does): a statement
        # per row cost a round trip to the connection's thread each, 1,000 of them per slice
        # of a mass expiry, each a GIL hand-off with the event loop.
        ended = [
            (s.close_reason, s.closed_at, s.last_activity_at, s.requests, s.id) for s, _ in closes
        ]
        owed = [_pending_params(p) for _, p in closes if p is not None]
        statements: list[tuple[str, Sequence[Any]]] = [(_CLOSE_SQL, (json.dumps(ended),))]
        if owed:
            statements.append((_PENDING_SQL, (json.dumps(owed),)))
        await self._write(statements)

    async def hibernate_many(self, sessions: Sequence[tuple[Session, PendingClose | None]]) -> None:
        """Dormant: no upstream binding, the DELETE of the old one owed, in one transaction.

        Two statements, the rows as JSON arrays, as `mark_closed_many` does: a statement per
        row cost a round trip to the connection's thread each (hibernating 100,000 took 38 s).
        """
        if not sessions:
            return
        going = [
            (s.dormant_since, s.last_activity_at, s.requests, _resume_json(s), s.id)
            for s, _ in sessions
        ]
        owed = [_pending_params(p) for _, p in sessions if p is not None]
        statements: list[tuple[str, Sequence[Any]]] = [(_HIBERNATE_SQL, (json.dumps(going),))]
        if owed:
            statements.append((_PENDING_SQL, (json.dumps(owed),)))
        await self._write(statements)

    async def rebind(self, session: Session, previous: Binding | None = None) -> bool:
        """A resumed session: live again, bound to the upstream session just created.
        Unconditional: no other sidecar shares this file, so nobody can have beaten it."""
        binding = session.binding
        assert binding is not None
        await self._write(
            [
                (
                    "UPDATE sessions SET state=?, dormant_since=NULL, upstream=?, "
                    "upstream_session_id=?, protocol_version=?, resumes=? WHERE id=?",
                    (
                        State.LIVE.value,
                        binding.upstream,
                        binding.session_id,
                        session.protocol_version,
                        session.resumes,
                        session.id,
                    ),
                )
            ]
        )
        return True

    async def set_persistent(self, session_id: str, persistent: bool) -> None:
        await self._write(
            [("UPDATE sessions SET persistent=? WHERE id=?", (int(persistent), session_id))]
        )

    async def write_activity(self, rows: Sequence[ActivityRow]) -> None:
        """The write-behind flush: every dirty session in one transaction."""
        if not rows:
            return
        # One statement for all rows, the rows passed as one JSON array: executemany runs the
        # statement row by row, handing the GIL back and forth with the busy event loop each
        # time (1,000 rows took ~3 s under load; this takes ~3 ms).
        # In slices that yield, all in one transaction: serialising 100,000 rows at once held
        # the event loop for hundreds of milliseconds.
        statements: list[tuple[str, Sequence[Any]]] = []
        for first in range(0, len(rows), FLUSH_SLICE):
            chunk = json.dumps([_activity_params(r) for r in rows[first : first + FLUSH_SLICE]])
            statements.append((_FLUSH_SQL, (chunk,)))
            await yield_turn()
        await self._write(statements)

    async def save_pending(self, pending: PendingClose, error: str | None = None) -> None:
        await self._write([_pending_upsert(pending, error)])

    async def drop_pending(self, pending: PendingClose) -> None:
        """Grouped: closing many sessions upstream at once must not cost a commit each."""
        await self._write_grouped("drop_pending", (pending.upstream, pending.session_id))

    async def purge_tombstones(self, older_than: float) -> int:
        """Delete closed sessions closed before `older_than` that owe no upstream DELETE."""
        async with self.db.execute(
            "SELECT COUNT(*) FROM sessions WHERE state='closed' AND closed_at < ? AND "
            "COALESCE(upstream_session_id, id) NOT IN (SELECT session_id FROM pending_closes)",
            (older_than,),
        ) as cursor:
            row = await cursor.fetchone()
        count = int(row[0]) if row else 0
        if count:
            await self._write(
                [
                    (
                        "DELETE FROM sessions WHERE state='closed' AND closed_at < ? AND "
                        "COALESCE(upstream_session_id, id) NOT IN "
                        "(SELECT session_id FROM pending_closes)",
                        (older_than,),
                    )
                ]
            )
        return count

    # ---- reads -------------------------------------------------------------------------
    async def load(self, state: State, since: float | None = None) -> list[Session]:
        """Sessions in `state`; for closed ones, only those closed at or after `since`."""
        sql = f"SELECT {_COLUMNS} FROM sessions WHERE state=?"
        params: list[Any] = [state.value]
        if since is not None:
            sql += " AND closed_at >= ?"
            params.append(since)
        async with self.db.execute(sql, params) as cursor:
            return [_session(row) async for row in cursor]

    async def load_slices(
        self, state: State, size: int, since: float | None = None
    ) -> AsyncIterator[list[Session]]:
        """Keyset pages, each its own short query: no statement stays open across the
        writes that requests make meanwhile. Live and dormant rows go by rowid (a range on
        the table itself, `+state` keeps the planner off the state index, which would sort
        every page); closed ones by (closed_at, rowid), the order of that index."""
        if state is State.CLOSED:
            pages = self._closed_pages(size, since)
        else:
            pages = self._rowid_pages(state, size)
        async for rows in pages:
            yield [_session(row[1:]) for row in rows]

    async def _rowid_pages(self, state: State, size: int) -> AsyncIterator[list[Any]]:
        after = 0
        while True:
            rows = await self._fetch(
                f"SELECT rowid, {_COLUMNS} FROM sessions WHERE +state=? AND rowid>? "
                "ORDER BY rowid LIMIT ?",
                (state.value, after, size),
            )
            if not rows:
                return
            after = rows[-1][0]
            yield rows

    async def _closed_pages(self, size: int, since: float | None) -> AsyncIterator[list[Any]]:
        last: tuple[float, int] = (-math.inf if since is None else since, -1)
        while True:
            rows = await self._fetch(
                f"SELECT rowid, {_COLUMNS} FROM sessions WHERE state='closed' "
                "AND (closed_at, rowid) > (?, ?) ORDER BY closed_at, rowid LIMIT ?",
                (*last, size),
            )
            if not rows:
                return
            last = (rows[-1][13], rows[-1][0])  # closed_at, after the rowid
            yield rows

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        try:
            async with self.db.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"reading {self.path} failed ({exc})") from exc

    async def get(self, session_id: str) -> Session | None:
        async with self.db.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE id=?", (session_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return _session(row) if row else None

    async def get_many(self, session_ids: Sequence[str]) -> dict[str, Session]:
        if not session_ids:
            return {}
        # One statement, the ids passed as a JSON array: a `get` each cost a round trip to
        # the connection's thread, ~5x the time of the closes they were read for.
        async with self.db.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(session_ids)),),
        ) as cursor:
            rows = await cursor.fetchall()
        return {s.id: s for s in map(_session, rows)}

    async def pending_closes(self) -> list[PendingClose]:
        async with self.db.execute(
            "SELECT session_id, protocol_version, attempts, next_attempt_at, upstream "
            "FROM pending_closes"
        ) as cursor:
            return [
                PendingClose(r[0], r[1], int(r[2]), float(r[3]), r[4] or "") async for r in cursor
            ]


# SQLite's primary result code for an I/O error; extended codes (SQLITE_IOERR_WRITE, ...)
# carry it in their low byte.
_SQLITE_IOERR = 10


def _is_io_error(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_IOERR


def _unusable(path: str, exc: sqlite3.Error) -> StoreCorruptError:
    return StoreCorruptError(
        f"{path} is not a usable SQLite database ({exc}). Nothing was changed. "
        "Restore it from a backup, or move it aside to start with an empty store (store.path)."
    )


def _activity_params(r: ActivityRow) -> tuple[Any, ...]:
    return (
        r.last_activity_at,
        r.requests,
        r.protocol_version,
        r.client_info,
        r.session_id,
        r.resume,
    )


def _tell(
    group: Sequence[tuple[str, Sequence[Any], Outcome]], outcome: BaseException | None
) -> None:
    for _, _, done in group:
        try:
            done(outcome)
        except Exception:  # one listener's bug must not leave the rest of the group waiting
            log.exception("a grouped write's listener failed")


def _settle(future: asyncio.Future[None], outcome: BaseException | None) -> None:
    """A grouped write's outcome to the caller awaiting it, if it still does."""
    if future.done():
        return  # its caller was cancelled: the row was written (or not) all the same
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
        future.exception()  # read here: should no one await it any more, no warning


def _batched(
    group: Sequence[tuple[str, Sequence[Any], object]],
) -> list[tuple[str, Sequence[Any]]]:
    """The group's rows as multi-row statements, kinds in the order they first came (a drop
    and an insert never concern the same row, so the order between kinds is free)."""
    rows: dict[str, list[Sequence[Any]]] = {}
    for batch, row, _ in group:
        rows.setdefault(batch, []).append(row)
    statements: list[tuple[str, Sequence[Any]]] = []
    for batch, batch_rows in rows.items():
        head, width, tail = _BATCHED[batch]
        one = "(" + ", ".join("?" * width) + ")"
        for first in range(0, len(batch_rows), BATCH_ROWS):
            chunk = batch_rows[first : first + BATCH_ROWS]
            params = [value for row in chunk for value in row]
            statements.append((head + ", ".join([one] * len(chunk)) + tail, params))
    return statements


def _pending_params(pending: PendingClose) -> tuple[Any, ...]:
    return (
        pending.upstream,
        pending.session_id,
        pending.protocol_version,
        pending.attempts,
        pending.next_attempt_at,
    )


def _pending_upsert(pending: PendingClose, error: str | None = None) -> tuple[str, Sequence[Any]]:
    return (
        "INSERT OR REPLACE INTO pending_closes "
        "(upstream, session_id, protocol_version, attempts, next_attempt_at, last_error) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            pending.upstream,
            pending.session_id,
            pending.protocol_version,
            pending.attempts,
            pending.next_attempt_at,
            error,
        ),
    )


def _row(s: Session) -> tuple[Any, ...]:
    return (
        s.id,
        s.transport.value,
        s.client,
        s.user_agent,
        s.client_info,
        s.protocol_version,
        s.created_at,
        s.last_activity_at,
        s.requests,
        int(s.persistent),
        s.state.value,
        s.close_reason,
        s.closed_at,
        s.upstream_endpoint,
        None if s.binding is None else s.binding.upstream,
        None if s.binding is None else s.binding.session_id,
        _resume_json(s),
        s.dormant_since,
        s.resumes,
    )


def _resume_json(s: Session) -> str | None:
    return None if s.resume is None else s.resume.to_json()


def _binding(upstream: str | None, session_id: str | None) -> Binding | None:
    return None if session_id is None else Binding(upstream or "", session_id)


def _session(row: Sequence[Any]) -> Session:
    return Session(
        id=row[0],
        transport=Transport(row[1]),
        client=row[2],
        user_agent=row[3],
        client_info=row[4],
        protocol_version=row[5],
        created_at=float(row[6]),
        last_activity_at=float(row[7]),
        requests=int(row[8]),
        persistent=bool(row[9]),
        state=State(row[10]),
        close_reason=CloseReason(row[11]) if row[11] else None,
        closed_at=float(row[12]) if row[12] is not None else None,
        upstream_endpoint=row[13],
        binding=_binding(row[14], row[15]),
        resume=ResumeState.from_json(row[16]),
        dormant_since=float(row[17]) if row[17] is not None else None,
        resumes=int(row[18] or 0),
    )


def read_sessions(path: str, state: State | None = None) -> list[Session]:
    """Read sessions without writing anything: for `mcp-sidecar sessions --db` while stopped.

    Opened read-only through SQLite's URI form, so it can never create, migrate or lock the
    file; a missing or foreign file is a StoreError that says what was expected.
    """
    if not Path(path).is_file():
        raise StoreError(f"{path} does not exist; pass the service's store.path to --db")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreTooNewError(
                    f"{path} has schema version {version}; this "
                    f"mcp-sidecar reads up to {SCHEMA_VERSION}. Upgrade it."
                )
            # A v1 file (not yet opened by this version) lacks the binding columns: a v1
            # session's upstream id is its own id, as the migration would make it.
            columns = _COLUMNS if version >= 2 else _V1_COLUMNS
            sql = f"SELECT {columns} FROM sessions"
            params: tuple[str, ...] = ()
            if state is not None:
                sql += " WHERE state=?"
                params = (state.value,)
            return [_session(row) for row in db.execute(sql + " ORDER BY created_at", params)]
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path} ({exc}); is it an mcp-sidecar database?") from exc
