"""The background loops that keep the session table honest between requests.

* The sweeper closes expired sessions (and so closes them upstream) within
  `sessions.sweep_interval`; request-time checks already answer 404 earlier than that, the
  sweep is what frees the server's memory for clients that never come back (SPEC 2.4).
* The flusher writes activity behind, one transaction per `store.flush_interval` (SPEC 2.6).
* Tombstones past `tombstone_ttl` are purged from the store once an hour.

Each loop survives a failing iteration (logged, retried next tick): a full disk must not stop
expiry. Intervals are read on every tick so a reload changes them without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from . import heap
from .errors import StoreError
from .manager import SessionManager

log = logging.getLogger("sidecar.sweeper")

PURGE_INTERVAL = 3600.0
# How often a waiting loop re-reads its interval, so a reload applies within this time.
RECHECK_INTERVAL = 1.0


async def every(
    interval: Callable[[], float], work: Callable[[], Awaitable[object]], what: str
) -> None:
    """Run `work` every `interval()` seconds until cancelled; failures are logged, not fatal."""
    loop = asyncio.get_running_loop()
    since = loop.time()
    while True:
        # Sleep in slices, re-reading the interval each time: a reload that shortens it
        # (30 min -> 1 min) must take effect now, not after the old, long sleep.
        while (left := since + interval() - loop.time()) > 0:  # noqa: ASYNC110 - polls a value
            await asyncio.sleep(min(left, RECHECK_INTERVAL))
        # The next period starts now, not when the work ends: a slow flush must not stretch
        # the flush period (SPEC 2.6 bounds lost activity by flush_interval).
        since = loop.time()
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except StoreError as exc:
            # Disk full or locked: an operator problem, not a bug; one line, no traceback.
            log.warning("%s failed (%s); retrying in %gs", what, exc, interval())
        except Exception:
            log.exception("%s failed; retrying in %gs", what, interval())


class Sweeper:
    def __init__(
        self,
        manager: SessionManager,
        sweep_interval: float,
        flush_interval: float,
        *,
        freeze_heap: bool = False,
    ) -> None:
        self.manager = manager
        self.sweep_interval = sweep_interval
        self.flush_interval = flush_interval
        self.freeze_heap = freeze_heap  # see heap.py: the server process only

    async def sweep_once(self) -> int:
        start = time.perf_counter()
        closed = await self.manager.sweep()
        self.manager.metrics.sweep_duration.observe(time.perf_counter() - start)
        if self.freeze_heap:
            heap.settle()
        return closed

    async def purge_once(self) -> int:
        purged = await self.manager.purge_tombstones()
        if self.freeze_heap:
            heap.full_collection()
        return purged

    def tasks(self) -> list[asyncio.Task[None]]:
        """Start the loops; the caller owns, cancels and awaits the returned tasks."""
        return [
            asyncio.create_task(
                every(lambda: self.sweep_interval, self.sweep_once, "sweep"), name="sidecar-sweeper"
            ),
            asyncio.create_task(
                every(lambda: self.flush_interval, self.manager.flush, "activity flush"),
                name="sidecar-flusher",
            ),
            asyncio.create_task(
                every(lambda: PURGE_INTERVAL, self.purge_once, "tombstone purge"),
                name="sidecar-purger",
            ),
        ]
