"""What a store no other sidecar uses answers to the sharing part of the contract (SPEC 2.8).

SQLite and the in-memory store are one process's alone: every claim is this sidecar's, the
latest activity is the one it holds in memory, and there is no one to tell or hear from. Both
inherit these answers from here, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from ..errors import StoreError
from .records import PendingClose


class UnsharedStore:
    """The `Store` methods that only a shared store gives real work to."""

    shared: bool = False  # this process's alone (SPEC 2.8 needs Redis)

    async def claim(self, claims: Sequence[tuple[str, str | None]]) -> set[str]:
        """One sidecar per store: every claim is its own."""
        return {session_id for session_id, _ in claims}

    async def last_uses(self, session_ids: Sequence[str]) -> dict[str, float]:
        return {}  # only this sidecar writes activity, and it holds the latest in memory

    async def claim_owed(self, pending: PendingClose) -> bool:
        return True

    async def live_counts(self, client: str) -> tuple[int, int]:
        raise StoreError("only a shared store counts across sidecars")

    async def publish(self, message: bytes) -> None:
        """No other sidecar to tell."""

    async def listen(
        self, deliver: Callable[[bytes], Awaitable[None]], subscribed: Callable[[], None]
    ) -> None:
        """No other sidecar to hear from."""
