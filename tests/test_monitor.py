"""The status page's memory (sidecar/monitor.py): ring buffer, recent closes, top-N, cache.

Unit tests with an injected clock: the history's bounds and the top-N order must hold
exactly, which a running sidecar cannot show without waiting for an hour of samples.
"""

from __future__ import annotations

import asyncio

from sidecar.monitor import History, Monitor, RecentCloses, Sample, top_sessions
from sidecar.sessions import CloseReason, Session, Transport


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def session(
    number: int, last_activity: float, requests: int = 0, *, client_info: str = "ide 1.0"
) -> Session:
    made = Session(
        id=f"{number:08d}-whole-session-id-{number}",
        transport=Transport.STREAMABLE_HTTP,
        client="ip:127.0.0.1",
        created_at=last_activity - 10,
        last_activity_at=last_activity,
        user_agent="agent/2",
        client_info=client_info,
    )
    made.requests = requests
    return made


def test_history_keeps_only_the_last_hour_of_samples_oldest_first() -> None:
    history = History(capacity=120)
    for i in range(300):
        history.add(Sample(float(i * 30), i, 0))
    samples = list(history)
    assert len(samples) == 120
    assert [s.live for s in samples] == list(range(180, 300))
    assert [s.live for s in history.since(299 * 30 - 60)] == [297, 298, 299]


def test_recent_closes_are_bounded_newest_first_and_hold_only_short_ids() -> None:
    closes = RecentCloses(capacity=3)
    for i in range(5):
        closes.record(session(i, 100.0, requests=i), CloseReason.IDLE_TIMEOUT, 200.0 + i)
    entries = list(closes)
    assert [e.requests for e in entries] == [4, 3, 2]
    assert entries[0].reason == "idle_timeout"
    assert entries[0].client == "agent/2 (ide 1.0)"
    assert entries[0].idle_seconds == 104.0
    assert all("whole-session-id" not in repr(e) for e in entries)


def test_top_sessions_ranks_longest_idle_and_busiest_in_one_pass() -> None:
    now = 10_000.0
    sessions = [session(i, now - i * 7 % 500, requests=i * 13 % 97) for i in range(1000)]
    sessions[5].in_flight = 1  # a call in progress: not idle, whatever its activity says
    sessions[5].last_activity_at = 0.0
    top = top_sessions(sessions, now, n=10)
    idle_expected = sorted(
        (s for s in sessions if s.in_flight == 0), key=lambda s: s.last_activity_at
    )[:10]
    assert [e.idle_seconds for e in top.longest_idle] == [
        now - s.last_activity_at for s in idle_expected
    ]
    assert [e.requests for e in top.busiest] == sorted(
        (s.requests for s in sessions), reverse=True
    )[:10]
    assert top.scanned == 1000
    assert top.active == sum(1 for s in sessions if now - s.last_activity_at <= 60 or s.in_flight)
    assert all(e.short_id.endswith("…") and len(e.short_id) == 9 for e in top.longest_idle)


def test_top_sessions_of_fewer_sessions_than_n_lists_them_all() -> None:
    top = top_sessions([session(1, 50.0, 3), session(2, 40.0, 9)], 100.0, n=10)
    assert [e.idle_seconds for e in top.longest_idle] == [60.0, 50.0]
    assert [e.requests for e in top.busiest] == [9, 3]


def test_monitor_caches_the_scan_until_the_clock_moves_past_the_cache_time() -> None:
    clock = Clock()
    live = {str(i): session(i, clock.now) for i in range(3)}
    monitor = Monitor(lambda: (len(live), 0), live.values, clock, cache_seconds=2.0)
    assert monitor.top().scanned == 3
    live["new"] = session(99, clock.now)
    clock.now += 1.0
    assert monitor.top().scanned == 3  # cached: a burst of page loads costs one scan
    clock.now += 1.0
    assert monitor.top().scanned == 4


async def test_monitor_task_samples_at_once_and_on_every_interval() -> None:
    clock = Clock()
    counts = [(1, 0)]
    monitor = Monitor(lambda: counts[-1], list, clock, interval=0.01)
    task = asyncio.create_task(monitor.run())
    try:
        async with asyncio.timeout(5):
            while len(monitor.history) < 3:
                counts.append((len(monitor.history) + 1, 2))
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert [s.live for s in monitor.history][:1] == [1]
