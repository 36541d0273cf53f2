"""What sidecars sharing one store tell each other, so they act as one (SPEC 2.8).

An admin close, a pin or unpin, a hibernation or resume, and a reload that changes the limits
happen on one sidecar; the others hear of it on the store's event channel and apply it to
the copy they hold: a closed session is closed there too (404 at once, its relayed streams
aborted), a moved one is dropped (the next request reads it again), a pin is set. Telling is
asynchronous and never delays the request that caused it: events go out from a queue.

The store decides what is true (claims, records); events only make every sidecar's memory
catch up at once rather than at the next read. One missed (Redis down) costs staleness, never
a second DELETE. So hearing is kept up whatever comes: a message that is not an event this
version understands (`peer_events.decode`) is skipped, counted and logged; a listener that
ends or loses its connection is started again, sooner at first, then at most every
`RESTART_CAP` seconds, and while it is down `/healthz`, `/readyz` and a gauge say so.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from .errors import StoreError
from .log import Throttled
from .peer_events import BadEvent, Closed, Event, LimitsChanged, Moved, Pinned, decode, encode

if TYPE_CHECKING:
    from .manager import SessionManager
    from .metrics import Metrics

log = logging.getLogger("sidecar.peers")

# Events waiting to be published; past this the oldest are dropped (Redis is away): the store
# still decides, other sidecars only learn later.
MAX_OUTBOX = 10_000
# The wait before listening again after the listener ended: doubled after each failure up to
# the cap, back to the first once a subscription holds. Events published while nobody listens
# are lost for good, so the cap is short; one SUBSCRIBE every 10 s costs Redis nothing.
RESTART_FIRST = 0.5
RESTART_CAP = 10.0
# A refused message is shown up to this many characters in its log line.
SHOWN = 200

Sleep = Callable[[float], Awaitable[None]]


class Hearing:
    """Whether the other sidecars' events are heard, since when, and the wait before the
    next try to listen again (no I/O: `Peers` tells it what happened)."""

    def __init__(self, now: float) -> None:
        self.listening = False
        self.since = now  # when `listening` last changed (the start, before the first)
        self.restarts = 0
        self._delay = RESTART_FIRST

    def subscribed(self, now: float) -> bool:
        """The channel's subscription is confirmed; True if that is news."""
        self._delay = RESTART_FIRST
        if self.listening:
            return False  # redis-py subscribed again by itself after a reconnect
        self.listening, self.since = True, now
        return True

    def lost(self, now: float) -> float:
        """The listener ended: how long to wait before it listens again."""
        if self.listening:
            self.listening, self.since = False, now
        self.restarts += 1
        delay, self._delay = self._delay, min(self._delay * 2, RESTART_CAP)
        return delay


class Peers:
    """Publishes this sidecar's events and applies the others'; one task of the service."""

    def __init__(
        self, manager: SessionManager, metrics: Metrics, sleep: Sleep = asyncio.sleep
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.node = secrets.token_hex(8)  # names this process's events, to skip its own
        self.hearing = Hearing(manager.clock())
        self._sleep = sleep
        self._outbox: asyncio.Queue[Event] = asyncio.Queue(MAX_OUTBOX)
        self._log = Throttled(log)
        metrics.bind_peers(lambda: self.hearing.listening)

    def announce(self, event: Event) -> None:
        """Queue an event for the other sidecars; never blocks, never raises."""
        if self._outbox.full():
            self._outbox.get_nowait()
        self._outbox.put_nowait(event)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._send())
            group.create_task(self._listen())

    async def _send(self) -> None:
        while True:
            event = await self._outbox.get()
            try:
                await self.manager.store.publish(encode(event, self.node))
            except StoreError as exc:
                self._log.warning("publish", "could not tell the other sidecars: %s", exc)

    async def _listen(self) -> None:
        """Listen, and listen again whenever the listener ends, until cancelled."""
        while True:
            try:
                await self.manager.store.listen(self.hear, self._subscribed)
                problem = "the subscription ended"
            except StoreError as exc:
                problem = str(exc)
            except Exception as exc:  # a fault of ours must not end the hearing for good
                log.exception("applying the other sidecars' events failed")
                problem = f"{type(exc).__name__}: {exc}"
            delay = self.hearing.lost(self.manager.clock())
            self.metrics.peer_events_restarts.inc()
            log.warning(
                "not hearing the other sidecars' events (%s): admin closes, pins and limit "
                "changes made on them reach this sidecar late; listening again in %gs",
                problem,
                delay,
            )
            await self._sleep(delay)

    def _subscribed(self) -> None:
        if self.hearing.subscribed(self.manager.clock()) and self.hearing.restarts:
            log.info("hearing the other sidecars' events again")

    async def hear(self, message: bytes) -> None:
        """One message from the channel: applied if it is another sidecar's event."""
        try:
            sender, event = decode(message)
        except BadEvent as exc:
            self.metrics.peer_events_rejected.labels(exc.reason).inc()
            self._log.warning(
                exc.reason,
                "ignored a message on the events channel (%s): %s; message %r",
                exc.reason,
                exc,
                message[:SHOWN],
            )
            return
        if sender != self.node:
            self.apply(event)

    def apply(self, event: Event) -> None:
        """Apply another sidecar's event to what this one holds."""
        manager = self.manager
        match event:
            case Closed(ids, reason, at):
                manager.closed_elsewhere(list(ids), reason, at)
            case Moved(ids, bound):
                manager.moved_elsewhere(list(ids), None if bound is None else list(bound))
            case Pinned(ids, persistent):
                manager.pinned_elsewhere(list(ids), persistent)
            case LimitsChanged(max_sessions, per_client):
                manager.limits = replace(
                    manager.limits, max_sessions=max_sessions, max_sessions_per_client=per_client
                )
                log.info(
                    "limits changed by another sidecar: max_sessions=%d max_sessions_per_client=%d",
                    max_sessions,
                    per_client,
                )
