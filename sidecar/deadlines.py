"""When each session is next due for a look: the sweeper's index, so a sweep costs what expires.

Walking every session on every sweep costs ~1 µs a session: 94 ms at 100,000 sessions, with
the event loop stalled all that time, to find (usually) nothing. Here sessions sit in
one-second buckets by the time they could first expire, and a sweep takes only the buckets
whose second has come.

The index is lazy, so the request path never touches it: a bucket holds a *lower bound* of a
session's deadline. Activity only moves a deadline later, so the entry stays valid; when its
bucket comes up, the manager re-reads the real deadline and files the session again (or ends
it). Whatever makes a deadline earlier (a resume, a config reload, unpinning a session) must
call `schedule` again, which moves the session to the earlier bucket; the entry left behind
is recognised as stale because the session no longer points to that bucket.
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol

# One bucket per second: a sweep runs at most once a second (SPEC 2.4), and a bucket whose
# second has begun is taken whole; sessions in it not yet due are simply filed again.
GRANULARITY = 1.0


class Bucket(list["Scheduled"]):
    """The sessions due in one second; `key` is that second."""

    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key


class Scheduled(Protocol):
    """What the index needs of a session: a slot naming the bucket it is filed in."""

    due: Bucket | None


class Deadlines:
    """Sessions by the second they are next due for a look (lower bounds of their deadlines)."""

    def __init__(self) -> None:
        self._buckets: dict[int, Bucket] = {}
        self._keys: list[int] = []  # a heap of the keys of `_buckets`

    def __len__(self) -> int:
        """Entries held, stale ones included (for tests and the benchmark)."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def schedule(self, item: Scheduled, at: float) -> None:
        """Make sure `item` is looked at no later than `at` (kept if already due earlier)."""
        key = math.floor(at / GRANULARITY)
        current = item.due
        if current is not None and current.key <= key:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(key)
            heapq.heappush(self._keys, key)
        bucket.append(item)
        item.due = bucket

    @staticmethod
    def unschedule(item: Scheduled) -> None:
        """Forget `item` (closed): its entry is dropped as stale when its bucket comes up."""
        item.due = None

    def next_due(self) -> float | None:
        return self._keys[0] * GRANULARITY if self._keys else None

    def take_due(self, now: float) -> DueRun:
        """The buckets whose second has begun by `now`, detached (O(buckets), not O(items)):
        the sweep takes their items a slice at a time. Sessions it files again land in new
        buckets, so no item comes back within the same sweep."""
        last = math.floor(now / GRANULARITY)
        buckets: list[Bucket] = []
        while self._keys and self._keys[0] <= last:
            buckets.append(self._buckets.pop(heapq.heappop(self._keys)))
        return DueRun(buckets)

    def pop_due(self, now: float) -> list[Scheduled]:
        """Every item whose bucket's second has begun by `now`, each once, unscheduled."""
        last = math.floor(now / GRANULARITY)
        due: list[Scheduled] = []
        while self._keys and self._keys[0] <= last:
            bucket = self._buckets.pop(heapq.heappop(self._keys))
            for item in bucket:
                if item.due is bucket:
                    item.due = None
                    due.append(item)
        return due


class DueRun:
    """Items of detached due buckets, handed out in slices, earliest bucket first.

    Taking a slice drops the run's references to it: after a mass expiry the run would
    otherwise hold 100,000 closed sessions to the end of the sweep, and free them all at
    once (~70 ms of deallocation with the event loop stopped).
    """

    def __init__(self, buckets: list[Bucket]) -> None:
        self._buckets = buckets[::-1]  # the earliest last, taken from the end

    def take(self, size: int) -> list[Scheduled]:
        """Up to `size` items still filed in their bucket (stale entries skipped), each
        unscheduled; [] once the run is exhausted."""
        taken: list[Scheduled] = []
        while self._buckets and len(taken) < size:
            bucket = self._buckets[-1]
            chunk = bucket[: size - len(taken)]
            del bucket[: len(chunk)]
            if not bucket:
                self._buckets.pop()
            for item in chunk:
                if item.due is bucket:
                    item.due = None
                    taken.append(item)
        return taken

    @property
    def exhausted(self) -> bool:
        return not self._buckets

    def rest(self) -> list[Scheduled]:
        """Everything not taken yet (a sweep that stopped half-way files them again)."""
        return self.take(sum(len(bucket) for bucket in self._buckets))
