"""Copying one store into another (`mcp-sidecar store migrate`, SPEC 2.8), backend to backend.

Everything the source holds is copied through the `Store` interface: live, dormant and closed
sessions (tombstones keep answering 404 on the new store) with their bindings and resume
state, and every owed upstream DELETE. The target must be empty: merging two stores could
silently replace a session with another's record, so that is refused instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StoreError
from ..sessions import Session, State
from . import Store

# Inserts in flight at once: enough to hide a network store's round trips, few enough that a
# large copy never holds more than one batch of writes open.
BATCH = 200
# A progress line every this many sessions, so a large copy shows it is moving.
PROGRESS_EVERY = 5000


@dataclass
class Copied:
    """What a copy moved, by kind; `total` sessions of `expected`."""

    sessions: dict[State, int] = field(default_factory=lambda: dict.fromkeys(State, 0))
    pending: int = 0
    expected: int = 0

    @property
    def total(self) -> int:
        return sum(self.sessions.values())

    def summary(self) -> str:
        s = self.sessions
        return (
            f"{s[State.LIVE]} live, {s[State.DORMANT]} dormant and {s[State.CLOSED]} closed "
            f"sessions, {self.pending} owed upstream DELETEs"
        )


def open_location(location: str, key_prefix: str) -> tuple[Store, str]:
    """A store from "sqlite:PATH" or a redis:// / rediss:// URL, and how to name it."""
    if location.startswith("sqlite:"):
        from .sqlite import SqliteStore  # noqa: PLC0415 - each backend's library when chosen

        path = location.removeprefix("sqlite:")
        if not path:
            raise StoreError('expected "sqlite:PATH", e.g. sqlite:/var/lib/mcp-sidecar/sessions.db')
        return SqliteStore(path), path
    if location.startswith(("redis://", "rediss://")):
        from .redis import RedisStore  # noqa: PLC0415

        store = RedisStore(location, key_prefix)
        return store, store.where
    raise StoreError(
        f"{location!r} is not a store location; expected sqlite:PATH, redis://HOST:PORT/DB "
        "or rediss://HOST:PORT/DB"
    )


def require_sqlite_file(location: str) -> None:
    """A source database must exist: opening a missing path would create an empty one."""
    if location.startswith("sqlite:"):
        path = Path(location.removeprefix("sqlite:"))
        if not path.is_file():
            raise StoreError(f"{path} does not exist; pass the service's store.path")


async def copy_store(
    source: Store,
    target: Store,
    progress: Callable[[Copied], None] = lambda _: None,
    every: int = PROGRESS_EVERY,
) -> Copied:
    """Copy every session and owed DELETE from `source` into the empty `target`."""
    await _require_empty(target)
    by_state = {state: await source.load(state) for state in State}
    copied = Copied(expected=sum(len(sessions) for sessions in by_state.values()))
    next_report = every
    for state, sessions in by_state.items():
        for start in range(0, len(sessions), BATCH):
            batch = sessions[start : start + BATCH]
            await asyncio.gather(*(target.insert(session) for session in batch))
            copied.sessions[state] += len(batch)
            if copied.total >= next_report:
                progress(copied)
                next_report += every
    for pending in await source.pending_closes():
        await target.save_pending(pending)
        copied.pending += 1
    await _verify(target, copied)
    return copied


async def _require_empty(target: Store) -> None:
    held: list[Session] = []
    for state in State:
        held += await target.load(state)
    if held or await target.pending_closes():
        raise StoreError(
            f"the target store already holds {len(held)} sessions; migrate into an empty "
            "store (a new SQLite path, or another Redis database or key prefix)"
        )


async def _verify(target: Store, copied: Copied) -> None:
    """Read the target back: the counts must be what was written, or the copy says so."""
    for state in State:
        found = len(await target.load(state))
        if found != copied.sessions[state]:
            raise StoreError(
                f"the target holds {found} {state.value} sessions after copying "
                f"{copied.sessions[state]}; is another process writing to it?"
            )
    if len(await target.pending_closes()) != copied.pending:
        raise StoreError("the target's owed DELETEs differ from the source's after the copy")
