"""An in-memory store with the same contract as the SQLite one, for unit tests.

Records are copied in and out, as a real backend serialises them, so a test cannot pass
because the manager and the store share one mutable object. `fail_writes` makes every write
raise `StoreError`, as a full disk would, with nothing changed.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from ..aio import Outcome, run_then
from ..errors import StoreError
from ..sessions import Binding, ResumeState, Session, State
from .records import ActivityRow, PendingClose
from .unshared import UnsharedStore


class MemoryStore(UnsharedStore):
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.pending: dict[tuple[str, str], tuple[PendingClose, str | None]] = {}
        self.transactions = 0
        self.fail_writes = False
        self.opened = False

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.opened = False

    def _begin(self) -> None:
        if self.fail_writes:
            raise StoreError("writing to the memory store failed (fail_writes is set)")
        self.transactions += 1

    async def insert(self, session: Session) -> None:
        self._begin()
        self.sessions[session.id] = _copy(session)

    def insert_then(self, session: Session, done: Outcome) -> None:
        run_then(self.insert(session), done)

    async def mark_closed_many(self, closes: Sequence[tuple[Session, PendingClose | None]]) -> None:
        if not closes:
            return
        self._begin()
        for session, pending in closes:
            stored = self.sessions.get(session.id)
            if stored is not None:
                stored.state = State.CLOSED
                stored.close_reason = session.close_reason
                stored.closed_at = session.closed_at
                stored.last_activity_at = session.last_activity_at
                stored.requests = session.requests
            if pending is not None:
                self.pending[pending.key] = (pending, None)

    async def hibernate_many(self, sessions: Sequence[tuple[Session, PendingClose | None]]) -> None:
        if not sessions:
            return
        self._begin()
        for session, pending in sessions:
            stored = self.sessions.get(session.id)
            if stored is not None:
                stored.state = State.DORMANT
                stored.dormant_since = session.dormant_since
                stored.binding = None
                stored.last_activity_at = session.last_activity_at
                stored.requests = session.requests
                stored.resume = copy.deepcopy(session.resume)
            if pending is not None:
                self.pending[pending.key] = (pending, None)

    async def rebind(self, session: Session, previous: Binding | None = None) -> bool:
        self._begin()  # unconditional: nothing else shares this store
        stored = self.sessions.get(session.id)
        if stored is not None:
            stored.state = State.LIVE
            stored.dormant_since = None
            stored.binding = session.binding
            stored.protocol_version = session.protocol_version
            stored.resumes = session.resumes
        return True

    async def set_persistent(self, session_id: str, persistent: bool) -> None:
        self._begin()
        if session_id in self.sessions:
            self.sessions[session_id].persistent = persistent

    async def write_activity(self, rows: Sequence[ActivityRow]) -> None:
        if not rows:
            return
        self._begin()
        for row in rows:
            stored = self.sessions.get(row.session_id)
            if stored is None or stored.state is not State.LIVE:
                continue
            stored.last_activity_at = row.last_activity_at
            stored.requests = row.requests
            stored.protocol_version = row.protocol_version or stored.protocol_version
            stored.client_info = row.client_info or stored.client_info
            if row.resume is not None:
                stored.resume = ResumeState.from_json(row.resume)

    async def save_pending(self, pending: PendingClose, error: str | None = None) -> None:
        self._begin()
        self.pending[pending.key] = (pending, error)

    async def drop_pending(self, pending: PendingClose) -> None:
        self._begin()
        self.pending.pop(pending.key, None)

    async def purge_tombstones(self, older_than: float) -> int:
        owed = {key[1] for key in self.pending}
        doomed = [
            s.id
            for s in self.sessions.values()
            if s.state is State.CLOSED
            and (s.closed_at or 0.0) < older_than
            and (s.upstream_id or s.id) not in owed
        ]
        if doomed:
            self._begin()
            for session_id in doomed:
                del self.sessions[session_id]
        return len(doomed)

    async def load(self, state: State, since: float | None = None) -> list[Session]:
        return [
            _copy(s)
            for s in self.sessions.values()
            if s.state is state and (since is None or (s.closed_at or 0.0) >= since)
        ]

    async def load_slices(
        self, state: State, size: int, since: float | None = None
    ) -> AsyncIterator[list[Session]]:
        found = await self.load(state, since)
        if state is State.CLOSED:
            found.sort(key=lambda s: s.closed_at or 0.0)
        for first in range(0, len(found), size):
            yield found[first : first + size]

    async def get(self, session_id: str) -> Session | None:
        stored = self.sessions.get(session_id)
        return None if stored is None else _copy(stored)

    async def get_many(self, session_ids: Sequence[str]) -> dict[str, Session]:
        found = (self.sessions.get(i) for i in session_ids)
        return {s.id: _copy(s) for s in found if s is not None}

    async def pending_closes(self) -> list[PendingClose]:
        return [pending for pending, _ in self.pending.values()]


def _copy(session: Session) -> Session:
    """What a backend would hand back: the record only, never the process's runtime."""
    return replace(session, runtime=None, resume=copy.deepcopy(session.resume))
