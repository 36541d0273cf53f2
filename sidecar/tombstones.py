"""Closed ids (tombstones): ids that no longer have an upstream session, nor ever will.

A closed id keeps answering 404 for `tombstone_ttl` (and names the client that keeps using
it). Closed ids live here and dormant ones (SPEC 2.7) in `dormant.py`, so the session table
(`manager.py`) holds only bound sessions, the ones limits count and the sweeper walks for
idleness.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .sessions import Tombstone

# Closed ids kept in memory to answer 404 and name stuck clients (~300 bytes each, so about
# 60 MB at the cap); older ones live on in the store until tombstone_ttl.
MAX_TOMBSTONES_IN_MEMORY = 200_000

# The ids are spread over this many maps by hash. One map of them all (an `OrderedDict`)
# doubled its table during a mass expiry, and the one insert that did it held the event loop
# ~10 ms at 87,381 entries, ~20 ms at 174,762. A map of 1/64th resizes in microseconds, and
# a lookup is still one hash probe.
SHARDS = 64


class Tombstones:
    """Closed ids, oldest first (insertion order is closing order).

    Looked up in `SHARDS` maps by hash; ordered by a deque of the tombstones as remembered
    (a deque grows by fixed blocks, never by copying itself). An id remembered again, or
    forgotten, leaves its old entry in the deque: an entry counts only while its shard still
    holds that very tombstone, and a stale one is dropped when it reaches the front.
    """

    def __init__(self, cap: int | None = None) -> None:
        self.cap = cap or MAX_TOMBSTONES_IN_MEMORY
        self._shards: tuple[dict[str, Tombstone], ...] = tuple({} for _ in range(SHARDS))
        self._order: deque[Tombstone] = deque()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, session_id: object) -> bool:
        return isinstance(session_id, str) and session_id in self._shard(session_id)

    def __iter__(self) -> Iterator[str]:
        """Closed ids, oldest first."""
        return (t.id for t in self._order if self._current(t))

    def _shard(self, session_id: str) -> dict[str, Tombstone]:
        return self._shards[hash(session_id) % SHARDS]

    def _current(self, tombstone: Tombstone) -> bool:
        return self._shard(tombstone.id).get(tombstone.id) is tombstone

    def get(self, session_id: str) -> Tombstone | None:
        return self._shard(session_id).get(session_id)

    def __getitem__(self, session_id: str) -> Tombstone:
        return self._shard(session_id)[session_id]

    @property
    def entries(self) -> int:
        """Entries in the order deque, stale ones included (what the cap bounds)."""
        return len(self._order)

    def forget(self, session_id: str) -> None:
        if self._shard(session_id).pop(session_id, None) is not None:
            self._count -= 1

    def remember(self, tombstone: Tombstone) -> None:
        """Keep a closed id answering 404, within a memory bound.

        Past the cap the oldest are forgotten here (they stay in the store until
        tombstone_ttl): a forgotten id resolves as unknown, which gets the same 404 under
        `unknown = "reject"`, and is judged by the upstream under "forward". The cap bounds
        the deque's entries, so an id closed again (or forgotten) counts until its old entry
        reaches the front: the memory stays bounded whatever the ids do.
        """
        shard = self._shard(tombstone.id)
        if shard.get(tombstone.id) is None:
            self._count += 1
        shard[tombstone.id] = tombstone
        self._order.append(tombstone)
        while len(self._order) > self.cap:
            self._drop(self._order.popleft())

    def _drop(self, tombstone: Tombstone) -> None:
        """A front entry leaves the deque: its id goes with it, unless it is stale."""
        shard = self._shard(tombstone.id)
        if shard.get(tombstone.id) is tombstone:
            del shard[tombstone.id]
            self._count -= 1

    def forget_older_than(self, horizon: float) -> None:
        """Oldest first, every id closed before `horizon`, up to the first that was not
        (stale entries on the way are dropped whatever their time)."""
        order = self._order
        while order:
            oldest = order[0]
            if oldest.closed_at >= horizon and self._current(oldest):
                break
            self._drop(order.popleft())
