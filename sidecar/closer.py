"""Closing sessions upstream: the `DELETE` the server never got from a vanished client.

Every owed close is in the store (`pending_closes`) before it is attempted, so a failure
(connection refused, 5xx) is retried with exponential backoff across restarts (SPEC 2.4).
404 and 405 are final: the session is already gone, or the server does not support DELETE.
Other 4xx answers are final too: retrying cannot fix a request the server rejects (usually
missing credentials after a restart, which are never persisted).

Credentials the client last used ride along in memory only; after a restart the DELETE goes
out with the static `upstream.headers` alone.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from .errors import StoreError, UpstreamError
from .metrics import Metrics
from .sessions import short
from .store import PendingClose, Store
from .upstream import UpstreamPool

log = logging.getLogger("sidecar.closer")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
# 1+2+4+...+300 s: about two days of attempts before giving up, logged as abandoned.
MAX_ATTEMPTS = 600
# How often a sidecar on a shared store reads the owed DELETEs again (SPEC 2.8): those a
# sidecar that died was retrying are taken over within this, not at some sidecar's restart.
# Not below the owed-attempt claims' TTL: an attempt the dead sidecar claimed and never sent
# is free again by the next read.
RESCAN_INTERVAL = 45.0
# DELETEs in flight at once: enough to hide the upstream's latency when 100,000 sessions
# expire together, few enough not to flood it nor the event loop. Against a fast upstream
# the closer is bound by its own CPU (~200 us per DELETE in aiohttp's client), not by the
# upstream's latency: 16 drained 100,000 at ~3,000-5,000/s (bench/closes.py). Answers that
# land together are handled in one turn of the loop, so the bound is also the loop's longest
# stall: 64 in flight held it 20-40 ms, 16 under ~10 ms.
PARALLEL_CLOSES = 16


class UpstreamCloser:
    def __init__(
        self,
        upstreams: UpstreamPool,
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.upstreams = upstreams
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._queue: list[tuple[float, int, PendingClose]] = []
        self._credentials: dict[tuple[str, str], Mapping[str, str]] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(PARALLEL_CLOSES)
        self._attempts: set[asyncio.Task[None]] = set()
        # Owed DELETEs this closer holds (queued or being attempted): how many times each key
        # is, so a rescan of a shared store schedules only the others.
        self._held: dict[tuple[str, str], int] = {}
        # Keys let go while a rescan was reading the store: its rows were read before that
        # attempt dropped (or rescheduled) them, so the rescan must not take them up again.
        self._rescans = 0
        self._let_go_meanwhile: set[tuple[str, str]] = set()

    def schedule(self, pending: PendingClose, credentials: Mapping[str, str]) -> None:
        if credentials:
            self._credentials[pending.key] = dict(credentials)
        self._held[pending.key] = self._held.get(pending.key, 0) + 1
        heapq.heappush(self._queue, (pending.next_attempt_at, next(self._seq), pending))
        self._wake.set()

    async def rescan(self) -> int:
        """SPEC 2.8: take up the owed DELETEs now due that no closer here holds (a sidecar
        that died was retrying them). Sending them twice is prevented by the per-attempt
        claims, not here. Returns how many were scheduled; only on a shared store."""
        if not self.store.shared:
            return 0
        now = self.clock()
        self._rescans += 1
        try:
            owed = await self.store.pending_closes()
            stale = self._let_go_meanwhile
            taken = [
                pending
                for pending in owed
                if pending.key not in self._held
                and pending.key not in stale
                and pending.next_attempt_at <= now
            ]
        finally:
            self._rescans -= 1
            if not self._rescans:
                self._let_go_meanwhile = set()
        for pending in taken:
            self.schedule(pending, {})
        if taken:
            log.info("took up %d DELETEs owed by other sidecars", len(taken))
        return len(taken)

    async def rescan_periodically(self, interval: float = RESCAN_INTERVAL) -> None:
        """Owned by the app on a shared store: `rescan` every `interval`, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rescan()
            except StoreError as exc:
                self.metrics.store_errors.labels("pending").inc()
                log.warning("reading the owed DELETEs failed: %s", exc)

    def retry_now(self, upstream: str) -> int:
        """A replica is back up: the DELETEs owed to it are due now, not at their backoff
        (which may be minutes away after a long outage). Returns how many were moved."""
        now = self.clock()
        moved = 0
        queue = []
        for due, seq, pending in self._queue:
            if due > now and self.upstreams.canonical(pending.upstream) == upstream:
                moved += 1
                queue.append((now, seq, pending))
            else:
                queue.append((due, seq, pending))
        if moved:
            heapq.heapify(queue)
            self._queue = queue
            self._wake.set()
            log.info("retrying %d DELETEs owed to upstream %s now that it is up", moved, upstream)
        return moved

    @property
    def backlog(self) -> int:
        return len(self._queue) + len(self._attempts)

    async def run(self) -> None:
        """Owned by the app: attempt each close when it is due, until cancelled."""
        try:
            while True:
                await self._wait_for_due()
                while self._queue and self._queue[0][0] <= self.clock():
                    _, _, pending = heapq.heappop(self._queue)
                    await self._slots.acquire()
                    task = asyncio.create_task(self._attempt(pending))
                    self._attempts.add(task)
                    task.add_done_callback(self._attempts.discard)
        finally:
            for task in list(self._attempts):
                task.cancel()
            await asyncio.gather(*self._attempts, return_exceptions=True)

    async def _wait_for_due(self) -> None:
        self._wake.clear()
        delay = self._queue[0][0] - self.clock() if self._queue else None
        if delay is not None and delay <= 0:
            return
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _attempt(self, pending: PendingClose) -> None:
        try:
            await self._attempt_held(pending)
        finally:
            self._release(pending)
            self._slots.release()

    def _release(self, pending: PendingClose) -> None:
        """Its attempt is over (a retry is scheduled again before this)."""
        left = self._held.get(pending.key, 0) - 1
        if left > 0:
            self._held[pending.key] = left
        else:
            self._held.pop(pending.key, None)
            if self._rescans:
                self._let_go_meanwhile.add(pending.key)

    async def _attempt_held(self, pending: PendingClose) -> None:
        try:
            if not await self._claimed(pending):
                log.debug(
                    "session %s is closed upstream by another sidecar", short(pending.session_id)
                )
                return
            result, error = await self._delete(pending)
            self.metrics.upstream_close.labels(result).inc()
            if result == "retry" and pending.attempts + 1 < MAX_ATTEMPTS:
                await self._retry_later(pending, error)
                return
            if result == "retry":
                self.metrics.upstream_close.labels("abandoned").inc()
                log.warning(
                    "gave up closing session %s upstream after %d attempts: %s",
                    short(pending.session_id),
                    pending.attempts + 1,
                    error,
                )
            self._credentials.pop(pending.key, None)
            await self.store.drop_pending(pending)
        except StoreError as exc:
            self.metrics.store_errors.labels("pending").inc()
            log.error(
                "could not record the upstream close of %s: %s", short(pending.session_id), exc
            )

    async def _claimed(self, pending: PendingClose) -> bool:
        """SPEC 2.8: on a store other sidecars share, send only the attempts won. A store
        that cannot answer lets the attempt go: a second DELETE costs the upstream a 404,
        a lost one leaves its session open."""
        if not self.store.shared:
            return True
        try:
            return await self.store.claim_owed(pending)
        except StoreError:
            return True

    async def _delete(self, pending: PendingClose) -> tuple[str, str]:
        credentials = self._credentials.get(pending.key, {})
        upstream = self.upstreams.member(pending.upstream)
        if upstream is None:
            log.warning(
                "cannot close session %s upstream: its upstream %s is no longer configured",
                short(pending.session_id),
                pending.upstream,
            )
            return "refused", "upstream no longer configured"
        try:
            status = await upstream.delete_session(
                pending.session_id, pending.protocol_version, credentials
            )
        except UpstreamError as exc:
            return "retry", str(exc)
        if 200 <= status < 300:
            return "ok", ""
        if status in (404, 405):
            return ("gone" if status == 404 else "unsupported"), ""
        if status >= 500 or status in (408, 425, 429):
            return "retry", f"HTTP {status}"
        log.warning(
            "upstream refused to close session %s: HTTP %d (not retried)",
            short(pending.session_id),
            status,
        )
        return "refused", f"HTTP {status}"

    async def _retry_later(self, pending: PendingClose, error: str) -> None:
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**pending.attempts)
        retry = replace(
            pending, attempts=pending.attempts + 1, next_attempt_at=self.clock() + delay
        )
        log.warning(
            "closing session %s upstream failed (%s); retry %d in %ds",
            short(pending.session_id),
            error,
            retry.attempts,
            delay,
        )
        # Queue first: if recording the attempt fails, the retry still happens in this run
        # (and the row from the previous attempt still brings it back after a restart).
        self.schedule(retry, {})
        await self.store.save_pending(retry, error)
