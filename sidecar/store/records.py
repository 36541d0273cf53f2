"""The plain records that cross the store boundary besides sessions themselves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class PendingClose:
    """An upstream DELETE still owed (survives restarts).

    `session_id` is the id the *upstream* issued (what the DELETE carries), and `upstream`
    names the pool member that holds it; behind a resumed session that is no longer the id
    the client holds (SPEC 2.7).
    """

    session_id: str
    protocol_version: str | None
    attempts: int
    next_attempt_at: float
    upstream: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.upstream, self.session_id)


class ActivityRow(NamedTuple):
    """One session's write-behind state, written by the flusher.

    A named tuple, not a frozen dataclass: a flush after a burst builds 100,000 of them on
    the event loop, and a frozen dataclass's `__init__` (a `object.__setattr__` per field)
    cost ~1.7 us each against ~0.3 us.
    """

    session_id: str
    last_activity_at: float
    requests: int
    protocol_version: str | None
    # Legacy sessions learn their client only from the first POST, after creation.
    client_info: str = ""
    # The resume state as JSON when the client's setup changed since the last flush.
    resume: str | None = None
