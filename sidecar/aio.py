"""Small asyncio helpers shared by modules that must not be interrupted half-way."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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
