"""Small asyncio helpers shared by modules that must not be interrupted half-way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Told once how a piece of work ended: None when it succeeded, else what it raised.
Outcome = Callable[[BaseException | None], None]


async def uncancellable(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to completion even if the awaiting task is cancelled.

    aiohttp cancels a handler when its client disconnects; a store transaction or a session
    close caught half-way would leave the shared SQLite connection inside a transaction, or a
    session closed in memory with no upstream DELETE owed. The caller still sees the
    cancellation; the work itself finishes, and its outcome is always retrieved so an error
    after the caller left is not reported as "never retrieved".
    """
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)


def run_then(work: Coroutine[Any, Any, object], done: Outcome) -> None:
    """Run `work` in a task of its own and tell `done` how it ended, whoever waits for what:
    the caller's own cancellation cannot keep `done` from hearing the outcome."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda t: done(_outcome(t)))


def _outcome(task: asyncio.Future[Any]) -> BaseException | None:
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception()
