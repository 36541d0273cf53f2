"""What sidecars sharing one store tell each other, so they act as one (SPEC 2.8).

An admin close, a pin or unpin, a hibernation or resume, and a reload that changes the limits
happen on one sidecar; the others hear of it on the store's event channel and apply it to
the copy they hold: a closed session is closed there too (404 at once, its relayed streams
aborted), a moved one is dropped (the next request reads it again), a pin is set. Telling is
asynchronous and never delays the request that caused it: events go out from a queue.

The store decides what is true (claims, records); events only make every sidecar's memory
catch up at once rather than at the next read. One missed (Redis down) costs staleness, never
a second DELETE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .errors import StoreError
from .log import Throttled
from .sessions import CloseReason, Session

if TYPE_CHECKING:
    from .admission import Limits
    from .manager import SessionManager

log = logging.getLogger("sidecar.peers")

Event = dict[str, Any]

# Events waiting to be published; past this the oldest are dropped (Redis is away): the store
# still decides, other sidecars only learn later.
MAX_OUTBOX = 10_000


def closed(sessions: Iterable[Session], reason: CloseReason, at: float) -> Event:
    return {"kind": "closed", "ids": [s.id for s in sessions], "reason": reason.value, "at": at}


def moved(sessions: Iterable[Session]) -> Event:
    """Hibernated or resumed here: another sidecar's copy is bound to the old upstream.
    `bound` names each session's upstream session now (None: dormant), so a sidecar that
    already took that binding (it lost the race to resume it) keeps its copy."""
    listed = list(sessions)
    return {
        "kind": "moved",
        "ids": [s.id for s in listed],
        "bound": [None if s.binding is None else s.binding.session_id for s in listed],
    }


def pinned(session: Session) -> Event:
    return {"kind": "persistent", "ids": [session.id], "persistent": session.persistent}


def limits_changed(limits: Limits) -> Event:
    return {
        "kind": "limits",
        "max_sessions": limits.max_sessions,
        "max_sessions_per_client": limits.max_sessions_per_client,
    }


class Peers:
    """Publishes this sidecar's events and applies the others'; one task of the service."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self._outbox: asyncio.Queue[Event] = asyncio.Queue(MAX_OUTBOX)
        self._log = Throttled(log)

    def announce(self, event: Event) -> None:
        """Queue an event for the other sidecars; never blocks, never raises."""
        if self._outbox.full():
            self._outbox.get_nowait()
        self._outbox.put_nowait(event)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._send())
            group.create_task(self.manager.store.listen(self.deliver))

    async def _send(self) -> None:
        while True:
            event = await self._outbox.get()
            try:
                await self.manager.store.publish(event)
            except StoreError as exc:
                self._log.warning("publish", "could not tell the other sidecars: %s", exc)

    async def deliver(self, event: Event) -> None:
        """Apply another sidecar's event to what this one holds."""
        kind, ids = event.get("kind"), [str(i) for i in event.get("ids", [])]
        manager = self.manager
        if kind == "closed":
            manager.closed_elsewhere(ids, CloseReason(event["reason"]), float(event["at"]))
        elif kind == "moved":
            manager.moved_elsewhere(ids, event.get("bound"))
        elif kind == "persistent":
            manager.pinned_elsewhere(ids, bool(event["persistent"]))
        elif kind == "limits":
            manager.limits = replace(
                manager.limits,
                max_sessions=int(event["max_sessions"]),
                max_sessions_per_client=int(event["max_sessions_per_client"]),
            )
            log.info("limits changed by another sidecar: %s", event)
