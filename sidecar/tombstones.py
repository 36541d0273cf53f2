"""Closed ids (tombstones): ids that no longer have an upstream session, nor ever will.

A closed id keeps answering 404 for `tombstone_ttl` (and names the client that keeps using
it). Closed ids live here and dormant ones (SPEC 2.7) in `dormant.py`, so the session table
(`manager.py`) holds only bound sessions, the ones limits count and the sweeper walks for
idleness.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from .sessions import Tombstone

# Closed ids kept in memory to answer 404 and name stuck clients (~300 bytes each, so about
# 60 MB at the cap); older ones live on in the store until tombstone_ttl.
MAX_TOMBSTONES_IN_MEMORY = 200_000


class Tombstones:
    """Closed ids, oldest first (insertion order is closing order)."""

    def __init__(self, cap: int | None = None) -> None:
        self.cap = cap or MAX_TOMBSTONES_IN_MEMORY
        self._by_id: OrderedDict[str, Tombstone] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._by_id

    def __iter__(self) -> Iterator[str]:
        """Closed ids, oldest first."""
        return iter(self._by_id)

    def get(self, session_id: str) -> Tombstone | None:
        return self._by_id.get(session_id)

    def __getitem__(self, session_id: str) -> Tombstone:
        return self._by_id[session_id]

    def forget(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def remember(self, tombstone: Tombstone) -> None:
        """Keep a closed id answering 404, within a memory bound.

        Past the cap the oldest are forgotten here (they stay in the store until
        tombstone_ttl): a forgotten id resolves as unknown, which gets the same 404 under
        `unknown = "reject"`, and is judged by the upstream under "forward".
        """
        self._by_id.pop(tombstone.id, None)
        self._by_id[tombstone.id] = tombstone
        while len(self._by_id) > self.cap:
            self._by_id.popitem(last=False)

    def forget_older_than(self, horizon: float) -> None:
        while self._by_id:
            oldest = next(iter(self._by_id.values()))
            if oldest.closed_at >= horizon:
                break
            self._by_id.popitem(last=False)
