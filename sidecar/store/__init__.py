"""Where sessions are kept: the interface every backend implements.

The manager is the store's only writer and sees records (`Session`, `PendingClose`,
`ActivityRow`), never rows or keys. Backends: `sqlite.py` (the default, embedded; the only
module that knows SQL), `redis.py` (`store.backend = "redis"`: one Redis several sidecars can
share; the only module that knows Redis) and `memory.py` (for unit tests, and to show what the
contract is without a database); the two that are one process's alone inherit the sharing
methods' answers from `unshared.py`. All three are checked by the same contract tests
(`tests/test_store_contract.py`).

The durability contract (SPEC 2.6): every `async` write below is durable when it returns,
or raises `StoreError` having changed nothing; `write_activity` is the write-behind flush.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..aio import Outcome
from ..sessions import Binding, Session, State
from .records import ActivityRow, PendingClose

if TYPE_CHECKING:
    from ..config import StoreSettings


class Store(Protocol):
    """What the sidecar needs of a session store."""

    transactions: int  # write transactions committed: for metrics and benchmarks
    # Other sidecars may use this store at the same time (SPEC 2.8): the manager then reads
    # the sessions it does not hold from it, and claims a session before closing it.
    shared: bool

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def insert(self, session: Session) -> None:
        """A new session, live and bound to its upstream session."""

    def insert_then(self, session: Session, done: Outcome) -> None:
        """`insert`, begun now; `done` hears once how it ended (None: durable; else the
        error, nothing changed), even if whoever waits for it is cancelled meanwhile: the
        manager tracks a new session in memory from `done`, so a client that leaves during
        the insert cannot leave its session in the store but not in memory. `done` must
        not raise."""

    async def mark_closed_many(self, closes: Sequence[tuple[Session, PendingClose | None]]) -> None:
        """Close sessions (all or none) and record the upstream DELETEs they owe."""

    async def hibernate_many(self, sessions: Sequence[tuple[Session, PendingClose | None]]) -> None:
        """Make sessions dormant (all or none) and record the DELETEs of their old bindings."""

    async def rebind(self, session: Session, previous: Binding | None = None) -> bool:
        """A dormant or lost session resumed: live again with its new binding. On a shared
        store only if it is still as the caller saw it, dormant (`previous` None) or bound
        to `previous`: False when another sidecar resumed or closed it first. A store no
        other sidecar uses always rebinds."""

    async def set_persistent(self, session_id: str, persistent: bool) -> None: ...

    async def write_activity(self, rows: Sequence[ActivityRow]) -> None:
        """The write-behind flush: every row in one transaction."""

    async def save_pending(self, pending: PendingClose, error: str | None = None) -> None: ...

    async def drop_pending(self, pending: PendingClose) -> None: ...

    async def purge_tombstones(self, older_than: float) -> int:
        """Forget closed sessions closed before `older_than`; returns how many."""

    async def load(self, state: State, since: float | None = None) -> list[Session]:
        """Sessions in `state`; closed ones only if closed at or after `since`."""

    def load_slices(
        self, state: State, size: int, since: float | None = None
    ) -> AsyncIterator[list[Session]]:
        """As `load`, in slices of at most `size`, each read with its own await, so the
        restore at start yields to the event loop between them (closed ones oldest first:
        tombstones are kept in closing order). A session written meanwhile may show in a
        later slice as it now is, or not at all; the caller decides by what it holds."""

    async def get(self, session_id: str) -> Session | None: ...

    async def get_many(self, session_ids: Sequence[str]) -> dict[str, Session]:
        """The sessions of these ids, read at once (a slice of dormant sessions the sweep
        closes); an id the store does not hold is left out."""

    async def pending_closes(self) -> list[PendingClose]: ...

    async def claim(self, claims: Sequence[tuple[str, str | None]]) -> set[str]:
        """Of (session id, upstream session id or None when dormant) pairs, the ids this
        sidecar may close or hibernate; a store no other sidecar uses grants them all."""

    async def last_uses(self, session_ids: Sequence[str]) -> dict[str, float]:
        """The last use of each session as stored (other sidecars' activity included)."""

    async def claim_owed(self, pending: PendingClose) -> bool:
        """May this sidecar make this attempt at an owed DELETE? Sidecars sharing a store
        each hold the owed DELETEs they read at their start: one of them sends each attempt."""

    async def live_counts(self, client: str) -> tuple[int, int]:
        """Live sessions across all sidecars sharing the store: in all, and of `client`
        (only asked of a shared store)."""

    async def publish(self, message: bytes) -> None:
        """Tell the other sidecars on this store of a close, pin or limit change (a message
        `peer_events.encode` made)."""

    async def listen(
        self, deliver: Callable[[bytes], Awaitable[None]], subscribed: Callable[[], None]
    ) -> None:
        """Hand each message on the store's event channel to `deliver`, as it came (ours
        too); call `subscribed` once the channel is heard. Until cancelled or the store
        fails (StoreError): `peers.Peers` listens again."""


def open_store(settings: StoreSettings) -> Store:
    """The configured backend (`store.backend`), not yet opened."""
    # A backend's libraries load only when it is chosen.
    if settings.backend == "redis":
        from .redis import RedisStore  # noqa: PLC0415

        return RedisStore(settings.url, settings.key_prefix)
    from .sqlite import SqliteStore  # noqa: PLC0415

    return SqliteStore(settings.path)


__all__ = ["ActivityRow", "PendingClose", "Store", "open_store"]
