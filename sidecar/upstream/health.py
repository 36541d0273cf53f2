"""Health checks of the replicas (SPEC 2.8): a loop the service owns when `upstream.urls`
lists several.

Every `health_interval` each member is probed (any HTTP answer from the MCP endpoint = up;
refused, reset or no answer in time = down); a transition is logged once by the pool. A
member down for `down_grace` is handed to `on_gone`, every round while it stays down, so
sessions bound to it after the first round (there should be none: it gets no new ones) are
not missed. A member back up is handed to `on_up`: the DELETEs owed to it go out at once
instead of at their backoff. With one upstream there is nothing to choose between and no loop runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .pool import UpstreamPool

log = logging.getLogger("sidecar.upstream")

OnGone = Callable[[list[str]], Awaitable[None]]
OnUp = Callable[[str], object]


def _nothing(_name: str) -> None:
    return None


class HealthChecker:
    def __init__(
        self,
        pool: UpstreamPool,
        interval: float,
        down_grace: float,
        on_gone: OnGone,
        on_up: OnUp = _nothing,
    ) -> None:
        self.pool = pool
        self.interval = interval  # both follow a reload
        self.down_grace = down_grace
        self.on_gone = on_gone
        self.on_up = on_up  # a member back up (after being down), by name

    async def run(self) -> None:
        """Owned by the service: probe, act, sleep, until cancelled."""
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval)

    async def check_once(self) -> None:
        replicas = self.pool.replicas
        results = await asyncio.gather(*(r.upstream.probe(self._within()) for r in replicas))
        for replica, up in zip(replicas, results, strict=True):
            changed = self.pool.mark(
                replica.name, up, "health check" if up else "health check failed"
            )
            if changed and up:
                self.on_up(replica.name)
        gone = self.pool.down_longer_than(self.down_grace)
        if gone:
            try:
                await self.on_gone(gone)
            except Exception:  # the checks must go on whatever one round's closing met
                log.exception("acting on the replicas that stayed down failed")

    def _within(self) -> float:
        # No answer within connect_timeout (or the interval, if longer) counts as down.
        member = self.pool.primary
        return max(self.interval, min(member.connect_timeout, member.read_timeout))
