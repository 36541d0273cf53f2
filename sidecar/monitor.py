"""What the status page remembers between requests: a short history nobody else keeps.

The session table knows the present; the status page (SPEC 3.3) also wants the last hour of
live/dormant counts, the most recent closes with their reasons, and the longest-idle and
busiest sessions. `Monitor` keeps all three in bounded memory:

* `History`, a ring buffer of (time, live, dormant) samples, one per `SAMPLE_INTERVAL`;
* `RecentCloses`, a deque fed by the manager's `close_listeners` hook;
* `top_sessions`, a few C-speed passes over the live table (`heapq.nsmallest`/`nlargest` for
  the top N, O(n log N)). With 100,000 sessions that costs about 30 ms (bench/status_page.py),
  so the page caches the result for `TOP_CACHE_SECONDS` rather than scanning per request.

Nothing here holds a whole session id: entries keep the short form only, so no code path from
the monitor to the page can leak a credential-like id.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from operator import attrgetter

from .clients import client_label
from .sessions import ACTIVE_WINDOW, CloseReason, Session

SAMPLE_INTERVAL = 30.0
HISTORY_SECONDS = 3600.0
RECENT_CLOSES = 50
TOP_N = 10
TOP_CACHE_SECONDS = 2.0

Clock = Callable[[], float]
_LAST_ACTIVITY = attrgetter("last_activity_at")
_REQUESTS = attrgetter("requests")
_PERSISTENT = attrgetter("persistent")


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    live: int
    dormant: int


class History:
    """The last `capacity` samples, oldest first; the oldest falls out when full."""

    def __init__(self, capacity: int = int(HISTORY_SECONDS // SAMPLE_INTERVAL)) -> None:
        self._samples: deque[Sample] = deque(maxlen=capacity)

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __len__(self) -> int:
        return len(self._samples)

    def since(self, moment: float) -> list[Sample]:
        return [s for s in self._samples if s.at >= moment]


@dataclass(frozen=True, slots=True)
class ClosedEntry:
    short_id: str
    reason: str
    client: str
    closed_at: float
    idle_seconds: float
    lived_seconds: float
    requests: int


class RecentCloses:
    """The last `capacity` closes, newest first."""

    def __init__(self, capacity: int = RECENT_CLOSES) -> None:
        self._entries: deque[ClosedEntry] = deque(maxlen=capacity)

    def record(self, session: Session, reason: CloseReason, now: float) -> None:
        self._entries.appendleft(
            ClosedEntry(
                short_id=session.short_id,
                reason=reason.value,
                client=client_label(session.user_agent, session.client_info),
                closed_at=now,
                idle_seconds=session.idle_seconds(now),
                lived_seconds=max(0.0, now - session.created_at),
                requests=session.requests,
            )
        )

    def __iter__(self) -> Iterator[ClosedEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """A session as the page shows it: short id and client strings, nothing secret."""

    short_id: str
    transport: str
    client_info: str
    user_agent: str
    idle_seconds: float
    age_seconds: float
    requests: int
    persistent: bool
    in_flight: int


@dataclass(frozen=True, slots=True)
class TopSessions:
    longest_idle: list[SessionEntry]
    busiest: list[SessionEntry]
    active: int
    persistent: int
    scanned: int


def entry(session: Session, now: float) -> SessionEntry:
    return SessionEntry(
        short_id=session.short_id,
        transport=session.transport.value,
        client_info=session.client_info,
        user_agent=session.user_agent,
        idle_seconds=session.idle_seconds(now),
        age_seconds=max(0.0, now - session.created_at),
        requests=session.requests,
        persistent=session.persistent,
        in_flight=session.in_flight,
    )


def top_sessions(sessions: Collection[Session], now: float, n: int = TOP_N) -> TopSessions:
    """The `n` longest idle (not kept alive by a call) and `n` busiest sessions, and the
    active and persistent counts.

    Each figure is one pass with C-level helpers (`heapq.nsmallest`, `map(attrgetter)`), not
    one Python loop doing everything: at 100,000 sessions that is several times faster
    (bench/status_page.py).
    """
    busy = [s for s in sessions if s.runtime is not None and s.runtime.in_flight > 0]
    cutoff = now - ACTIVE_WINDOW
    recent = sum(1 for at in map(_LAST_ACTIVITY, sessions) if at >= cutoff)
    oldest = heapq.nsmallest(n + len(busy), sessions, key=_LAST_ACTIVITY)
    return TopSessions(
        longest_idle=[entry(s, now) for s in oldest if s.in_flight == 0][:n],
        busiest=[entry(s, now) for s in heapq.nlargest(n, sessions, key=_REQUESTS)],
        active=recent + sum(1 for s in busy if s.last_activity_at < cutoff),
        persistent=sum(map(_PERSISTENT, sessions)),
        scanned=len(sessions),
    )


class Monitor:
    """Samples the session counts into `history` and remembers recent closes.

    `run()` is a task the `Service` owns; `record_close` is registered with the manager's
    `close_listeners`. `top()` is the bounded scan, cached for `cache_seconds`.
    """

    def __init__(
        self,
        counts: Callable[[], tuple[int, int]],
        sessions: Callable[[], Collection[Session]],
        clock: Clock = time.time,
        interval: float = SAMPLE_INTERVAL,
        cache_seconds: float = TOP_CACHE_SECONDS,
    ) -> None:
        self._counts = counts
        self._sessions = sessions
        self.clock = clock
        self.interval = interval
        self.cache_seconds = cache_seconds
        self.history = History(max(1, int(HISTORY_SECONDS // interval)))
        self.closes = RecentCloses()
        self._top: TopSessions | None = None
        self._top_at = 0.0

    def sample(self) -> Sample:
        live, dormant = self._counts()
        taken = Sample(self.clock(), live, dormant)
        self.history.add(taken)
        return taken

    def record_close(self, session: Session, reason: CloseReason, now: float) -> None:
        self.closes.record(session, reason, now)

    def top(self) -> TopSessions:
        now = self.clock()
        if self._top is None or now - self._top_at >= self.cache_seconds or now < self._top_at:
            self._top = top_sessions(self._sessions(), now)
            self._top_at = now
        return self._top

    async def run(self) -> None:
        """Sample now (the chart has a point at once) and every `interval` until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(self.interval)
