"""A client's POST on a live session, as the session table counts it: one set of rules for
every way a request comes in (SPEC 2.3, 2.5, 2.7).

The aiohttp handler (`transports/streamable.py`) and the fast lane (`transports/fast.py`)
move bytes differently, but what a POST means for its session is decided here, once, with
no I/O: `Call` classifies the batch (`activity.classify`) and marks the session in flight
for as long as a call is unanswered; the edge tells it how the exchange went, and it asks
the manager (the only one that changes a session) for the rest:

* `unsent`: the forward failed (502/504): nothing changed about the session;
* `answered`: the answer's head came: the request was use (or not), counted, and a 2xx to
  session-scoped setup (`logging/setLevel`, `resources/subscribe`) is what a resume replays;
* `ended`: the answer is relayed, or the client left before it: the call counts until then,
  never longer, and its end is activity too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .activity import Use, classify
from .jsonrpc import Batch
from .sessions import ResumeState, Session

if TYPE_CHECKING:
    from .manager import SessionManager

MAX_SUBSCRIPTIONS = 1000  # a client subscribing without end must not grow the record forever
SETUP_METHODS = frozenset({"logging/setLevel", "resources/subscribe", "resources/unsubscribe"})


class Call:
    """One POST's bookkeeping, from its classification to its end."""

    __slots__ = ("batch", "manager", "session", "use")

    def __init__(self, manager: SessionManager, session: Session, batch: Batch) -> None:
        self.manager = manager
        self.session = session
        self.batch = batch
        self.use: Use = classify(
            batch, manager.policy, session.server_pings if session.runtime else ()
        )
        if self.use.is_call:
            manager.begin_call(session)

    def unsent(self) -> None:
        """The forward failed: the call is undone, and it was not activity (SPEC 2.5)."""
        if self.use.is_call:
            self.manager.abandon_call(self.session)

    def answered(self, status: int) -> None:
        """The answer's head came."""
        manager = self.manager
        session = self.session
        manager.note_use(session, self.use)
        manager.count_request(session)
        if 200 <= status < 300 and session.resume is not None and sets_up(self.batch):
            changed = updated_setup(session.resume, self.batch)
            if changed is not None:
                manager.note_setup(session, changed)

    def ended(self) -> None:
        """Relayed, or the client left: no longer in flight, and the end is activity."""
        if self.use.is_call:
            self.manager.end_call(self.session)


def sets_up(batch: Batch) -> bool:
    """Whether `updated_setup` has anything to look at: most requests name no setup method,
    and this asks without building the batch's tuple of requests."""
    messages = batch.messages
    if len(messages) == 1:
        return messages[0].method in SETUP_METHODS
    return any(message.method in SETUP_METHODS for message in messages)


def updated_setup(resume: ResumeState, batch: Batch) -> ResumeState | None:
    """The resume state after this batch's session-scoped setup, or None if it changed nothing."""
    if not any(m.method in SETUP_METHODS for m in batch.requests):
        return None
    level = resume.log_level
    subscriptions = list(resume.subscriptions)
    for message in batch.requests:
        params = message.params if isinstance(message.params, dict) else {}
        if message.method == "logging/setLevel" and isinstance(params.get("level"), str):
            level = params["level"]
        uri = params.get("uri")
        if not isinstance(uri, str):
            continue
        if message.method == "resources/subscribe" and uri not in subscriptions:
            subscriptions = [*subscriptions, uri][-MAX_SUBSCRIPTIONS:]
        elif message.method == "resources/unsubscribe" and uri in subscriptions:
            subscriptions.remove(uri)
    if level == resume.log_level and subscriptions == resume.subscriptions:
        return None
    return ResumeState(resume.initialize_json, level, subscriptions)
