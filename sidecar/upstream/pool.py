"""The upstreams a sidecar fronts, as a pool of replicas of one MCP server (SPEC 2.8).

Every session is bound to a member by name (`Binding.upstream`); requests of a session go to
its member, new sessions to the one `place()` picks: the healthy member with the fewest live
sessions, ties taken in turn. Names: "" for the single upstream of `upstream.url`, the
replica's `host:port` when `upstream.urls` lists several. "" also means "the first member",
so a binding written by a one-upstream configuration is still understood by a replicated one.

Health is a flag per member, set by the health checker's probes (`health.py`) and by a
proxied request whose connection was refused; a down member gets no new sessions.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from .client import Upstream

log = logging.getLogger("sidecar.upstream")

RECOUNT_SECONDS = 1.0


@dataclass(slots=True)
class Replica:
    """One member: its binding name, its client and its health."""

    name: str
    upstream: Upstream
    up: bool = True
    down_since: float | None = None  # monotonic clock; None while up

    @property
    def label(self) -> str:
        """The name shown in logs and metrics: "" would say nothing."""
        return self.upstream.authority


class UpstreamPool:
    def __init__(
        self,
        urls: str | Sequence[str],
        connect_timeout: float,
        read_timeout: float,
        static_headers: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("an upstream pool needs at least one URL")
        self.clock = clock
        self._members: dict[str, Replica] = {}
        for url in urls:
            upstream = Upstream(url, connect_timeout, read_timeout, static_headers)
            name = "" if len(urls) == 1 else upstream.authority
            self._members[name] = Replica(name, upstream)
        self._order = list(self._members)
        self._by_client = {id(r.upstream): r for r in self._members.values()}
        self._last = -1  # index in `_order` of the last member placed on
        self._load: dict[str, int] = {}
        self._load_at: float | None = None

    def __len__(self) -> int:
        return len(self._members)

    @property
    def primary(self) -> Upstream:
        """The member that answers what belongs to no session (metadata, sessionless calls),
        and the one "" names."""
        return self._members[self._order[0]].upstream

    def __iter__(self) -> Iterator[tuple[str, Upstream]]:
        return ((name, r.upstream) for name, r in self._members.items())

    @property
    def replicas(self) -> tuple[Replica, ...]:
        return tuple(self._members.values())

    def member(self, name: str) -> Upstream | None:
        """The member a binding names; None if it is no longer configured."""
        found = self._replica(name)
        return None if found is None else found.upstream

    def at(self, name: str) -> Upstream:
        """The member a binding names, or the primary if it is no longer configured."""
        return self.member(name) or self.primary

    def canonical(self, name: str) -> str:
        """The member's own name for a binding's ("" is the first member)."""
        found = self._replica(name)
        return name if found is None else found.name

    def _replica(self, name: str) -> Replica | None:
        found = self._members.get(name)
        if found is None and name == "":
            return self._members[self._order[0]]
        return found

    # ---- placement -------------------------------------------------------------------------
    def tally(self, names: Iterable[str]) -> dict[str, int]:
        """Live sessions per member, from the binding names of the live sessions."""
        counts = dict.fromkeys(self._order, 0)
        for name, count in Counter(names).items():  # few distinct names: fold them after
            own = self.canonical(name)
            if own in counts:
                counts[own] += count
        return counts

    def place_live(self, bound: Callable[[], Iterable[str]]) -> str:
        """`place()` by the live sessions' binding names, counted at most once a second
        (counting walks every session) and kept up by the placements made in between: a
        burst of new sessions still spreads evenly, only closes wait for the next count."""
        if len(self._order) == 1:
            return self._order[0]
        now = self.clock()
        if self._load_at is None or now - self._load_at >= RECOUNT_SECONDS:
            self._load, self._load_at = self.tally(bound()), now
        name = self.place(self._load)
        self._load[name] = self._load.get(name, 0) + 1
        return name

    def place(self, load: Mapping[str, int] | None = None) -> str:
        """The member a new session goes to: the healthy one with the fewest live sessions
        (`load`, by member name), ties taken in turn. With every member down, all are
        candidates: a refused connection then answers the client, as with one upstream."""
        if len(self._order) == 1:
            return self._order[0]
        load = load or {}
        healthy = {name for name, r in self._members.items() if r.up}
        candidates = healthy or set(self._order)
        fewest = min(load.get(name, 0) for name in candidates)
        count = len(self._order)
        for step in range(1, count + 1):
            index = (self._last + step) % count
            name = self._order[index]
            if name in candidates and load.get(name, 0) == fewest:
                self._last = index
                return name
        raise AssertionError("a candidate always has the fewest sessions")

    # ---- health ----------------------------------------------------------------------------
    def is_up(self, name: str) -> bool:
        found = self._replica(name)
        return found is None or found.up

    def mark(self, name: str, up: bool, why: str) -> bool:
        """Set a member's health; True (and one log line) when that changed it."""
        replica = self._replica(name)
        if replica is None or replica.up == up:
            return False
        replica.up = up
        if up:
            down_for = self.clock() - (replica.down_since or self.clock())
            replica.down_since = None
            log.info("upstream %s is up again after %.1fs (%s)", replica.label, down_for, why)
        else:
            replica.down_since = self.clock()
            log.warning("upstream %s is down (%s); no new sessions go to it", replica.label, why)
        return True

    def refused(self, upstream: Upstream) -> None:
        """A proxied request's connection was refused: that member is down at once."""
        replica = self._by_client.get(id(upstream))
        if replica is not None and len(self._order) > 1:
            self.mark(replica.name, False, "connection refused")

    def down_longer_than(self, grace: float) -> list[str]:
        """The members down for `grace` seconds or more."""
        now = self.clock()
        return [
            r.name
            for r in self._members.values()
            if r.down_since is not None and now - r.down_since >= grace
        ]

    # ---- lifecycle -------------------------------------------------------------------------
    def configure(
        self, connect_timeout: float, read_timeout: float, static_headers: Mapping[str, str]
    ) -> None:
        """A reload: new timeouts and static headers for every member."""
        for replica in self._members.values():
            member = replica.upstream
            member.connect_timeout = connect_timeout
            member.read_timeout = read_timeout
            member.static_headers = dict(static_headers)

    async def start(self) -> None:
        for replica in self._members.values():
            await replica.upstream.start()

    async def close(self) -> None:
        for replica in self._members.values():
            await replica.upstream.close()
