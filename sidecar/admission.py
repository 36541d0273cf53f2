"""Limit accounting (SPEC 2.5): how many bound sessions each client identity holds, and the
`initialize`s admitted but not answered yet.

Only sessions with an upstream binding count (SPEC 2.7): a dormant session holds nothing on
the server. The manager asks here whether one more fits and reserves it with no `await` in
between, so concurrent initializes can never overshoot a limit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int = 0
    max_sessions_per_client: int = 0
    on_limit: Literal["reject", "evict_idle"] = "reject"
    bind_to: Literal["identity", "none"] = "identity"
    persistent_default: bool = False


class LimitReachedError(Exception):
    """`initialize` refused: the session limit is reached and `on_limit` is "reject"."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__(f"session limit reached ({scope})")


class Admission:
    def __init__(self) -> None:
        self.per_client: Counter[str] = Counter()  # bound sessions per identity
        self._reserved = 0  # initializes admitted but not yet answered
        self._pending: Counter[str] = Counter()  # the same, per client identity

    def used(self, owner: str | None, bound: int) -> int:
        """Sessions and admitted-but-unanswered initializes, in all or one client's scope."""
        if owner is None:
            return bound + self._reserved
        return self.per_client[owner] + self._pending[owner]

    def used_stored(self, owner: str | None, stored: int) -> int:
        """As `used`, with the live sessions counted by a store other sidecars share."""
        return stored + (self._reserved if owner is None else self._pending[owner])

    def reserve(self, identity: str) -> None:
        self._reserved += 1
        self._pending[identity] += 1

    def release(self, identity: str) -> None:
        """The admitted `initialize` of `identity` is over (session created or not)."""
        self._reserved = max(0, self._reserved - 1)
        self._pending[identity] -= 1
        if self._pending[identity] <= 0:
            del self._pending[identity]

    def bound(self, identity: str) -> None:
        self.per_client[identity] += 1

    def unbound(self, identity: str) -> None:
        self.per_client[identity] -= 1
        if self.per_client[identity] <= 0:
            del self.per_client[identity]
