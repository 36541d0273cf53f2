"""What the status page shows (SPEC 3.3 `GET /`), gathered from a running `Service`.

Pure data, no HTML: `gather()` reads the manager, the monitor and the settings into a
`StatusPage`, which `status_html.render()` turns into a page. Kept apart so the figures can be
tested and benchmarked without a browser, and so another rendering (JSON, a CLI view) could
reuse them. The cost is bounded: counts are `len()` of the tables, the top-N lists come from
the monitor's cached scan, and every list here is cut to a fixed length.

Upstreams are a list from the start, so replicas (SPEC 2.8) add rows, not a new section;
`health` is a replica's last health check ("not checked" for a single upstream: it is never
probed).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from yarl import URL

from . import __version__
from .monitor import ClosedEntry, Sample, SessionEntry

if TYPE_CHECKING:
    from .app import Service

MAX_ROWS = 10
NOT_CHECKED = "not checked"


@dataclass(frozen=True, slots=True)
class Counts:
    live: int
    active: int
    idle: int
    dormant: int
    persistent: int
    closed_remembered: int


@dataclass(frozen=True, slots=True)
class UpstreamRow:
    name: str
    url: str
    sessions: int
    health: str


@dataclass(frozen=True, slots=True)
class StuckRow:
    client: str
    requests: int
    sessions: int
    last_seen: float


@dataclass(frozen=True, slots=True)
class StatusPage:
    version: str
    now: float
    ready: bool
    enforces: list[str]
    counts: Counts
    by_client: list[tuple[str, int]]
    longest_idle: list[SessionEntry]
    busiest: list[SessionEntry]
    stuck: list[StuckRow]
    upstreams: list[UpstreamRow]
    closes_owed: int
    recent_closes: list[ClosedEntry]
    history: list[Sample]


def gather(service: Service) -> StatusPage:
    manager = service.manager
    top = service.monitor.top()
    live = len(manager.live)
    now = service.monitor.clock()
    # The scan may be up to a cache period old; clamp so the counts never disagree.
    active = min(top.active, live)
    return StatusPage(
        version=__version__,
        now=now,
        ready=service.ready,
        enforces=enforces(service),
        counts=Counts(
            live=live,
            active=active,
            idle=live - active,
            dormant=len(manager.dormant),
            persistent=min(top.persistent, live),
            closed_remembered=len(manager.tombstones),
        ),
        by_client=_busiest_clients(manager.admission.per_client),
        longest_idle=top.longest_idle[:MAX_ROWS],
        busiest=top.busiest[:MAX_ROWS],
        stuck=[_stuck_row(row) for row in manager.stuck.snapshot()[:MAX_ROWS]],
        upstreams=upstream_rows(service),
        closes_owed=service.closer.backlog,
        recent_closes=list(service.monitor.closes)[: MAX_ROWS * 2],
        # The chart ends at the present, not at the last sample up to 30 s ago.
        history=[*service.monitor.history, Sample(now, live, len(manager.dormant))],
    )


def upstream_rows(service: Service) -> list[UpstreamRow]:
    """One row per pool member; with one member every live session is on it (no scan), and
    it is never probed (SPEC 2.8 health checks replicas), so its health is "not checked"."""
    pool = service.upstreams
    live = service.manager.live
    if len(pool) == 1:
        ((name, member),) = list(pool)
        return [UpstreamRow(name or "default", safe_url(str(member.url)), len(live), NOT_CHECKED)]
    counts = pool.tally(s.binding.upstream for s in live.values() if s.binding is not None)
    return [
        UpstreamRow(
            replica.name,
            safe_url(str(replica.upstream.url)),
            counts.get(replica.name, 0),
            "up" if replica.up else "down",
        )
        for replica in pool.replicas
    ]


def enforces(service: Service) -> list[str]:
    """The start-up summary line, and the limits it leaves out."""
    settings = service.settings
    s = settings.sessions
    return [
        settings.summary_line(),
        f"limits: max_sessions={s.max_sessions or 'unlimited'} "
        f"max_sessions_per_client={s.max_sessions_per_client or 'unlimited'} "
        f"on_limit={s.on_limit} bind_to={s.bind_to} unknown={s.unknown}",
    ]


def safe_url(url: str) -> str:
    """The upstream URL without user info or query: either may carry a secret."""
    parsed = URL(url)
    return str(parsed.with_user(None).with_query(None).with_fragment(None))


def _busiest_clients(per_client: Mapping[str, int]) -> list[tuple[str, int]]:
    # nsmallest, not sorted(): one identity per session is possible (100,000 addresses).
    ranked = heapq.nsmallest(MAX_ROWS, per_client.items(), key=lambda item: (-item[1], item[0]))
    return [(identity, count) for identity, count in ranked if count > 0]


def _stuck_row(row: dict[str, object]) -> StuckRow:
    return StuckRow(
        client=str(row["client"]),
        requests=int(str(row["requests"])),
        sessions=int(str(row["sessions"])),
        last_seen=float(str(row["last_seen"])),
    )
