"""Dormant ids (SPEC 2.7): sessions hibernated when they went idle, whose id still answers.

Most are held as a compact `Dormant` record (id, client, label, deadline): at 100,000 the
whole `Session` cost more than the 300 B a dormant session may. One a request or an admin
read back from the store is held whole until it wakes or closes, so every request for that
id shares one object (a resume is serialised on it). Bound sessions are in the manager's
table, closed ids in `tombstones.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

from .sessions import Dormant, Session

DormantEntry = Dormant | Session


class DormantSessions:
    """Hibernated sessions by client id: compact records, or whole ones being used."""

    def __init__(self) -> None:
        self._by_id: dict[str, DormantEntry] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[DormantEntry]:
        return iter(list(self._by_id.values()))

    def whole(self) -> list[Session]:
        """Those held whole (read back for a request, or hibernated by the one waking it)."""
        return [s for s in self._by_id.values() if isinstance(s, Session)]

    def get(self, session_id: str) -> DormantEntry | None:
        return self._by_id.get(session_id)

    def add(self, entry: DormantEntry) -> None:
        self._by_id[entry.id] = entry

    def remove(self, session_id: str) -> DormantEntry | None:
        return self._by_id.pop(session_id, None)
