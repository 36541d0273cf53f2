"""Stand-ins the in-process tests share: a clock moved by hand and a closer that only records.

Real parts everywhere else; these two replace what a test must control (time) or observe
without a network (the owed DELETEs a manager hands over).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.store import PendingClose

T0 = 1_700_000_000.0


@dataclass
class Clock:
    """Session time the test sets: `clock.now += 60` is a minute later for the manager."""

    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeCloser:
    """Records each owed DELETE handed over; sends nothing."""

    scheduled: list[PendingClose] = field(default_factory=list)

    def schedule(self, pending: PendingClose, credentials: Mapping[str, str]) -> None:
        self.scheduled.append(pending)
