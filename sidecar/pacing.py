"""Long work on the event loop, cut into turns bounded by time, each yielding behind the rest.

A mass expiry or hibernation of 100,000 sessions flips, writes and announces them on the
event loop, so it is done in turns with the loop served in between. What a request arriving
meanwhile waits for is the turns run back to back before it, so two rules bound it:

* a turn ends once it has used `TURN_BUDGET` of time, or `limit` items, whichever comes
  first. A count alone let a turn run 10-20 times its usual length when the machine was slow
  (runs of 64 closes: 0.6-1.3 ms usually, 14-27 ms in some whole runs of `bench/stalls.py`);
* the yield puts the task behind the timers that came due and the sockets that became
  readable (`yield_turn`), so a request waits for one turn, not for two or three.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# How long one turn of long work may hold the event loop before it yields (wall time: what a
# request waits, whether the process used the CPU or waited for it).
TURN_BUDGET = 0.002
# Items per turn at most, however fast they go (the longest run the tests pin).
TURN_LIMIT = 64

Clock = Callable[[], float]


async def yield_turn() -> None:
    """Let the loop run what is due first (timers, sockets), then continue.

    `asyncio.sleep(0)` puts the task at the head of the next turn's ready callbacks: asyncio
    appends the sockets found readable and the timers come due after it, and uvloop runs it
    ahead of its timers too. A request that arrived during one turn of a mass close then
    waited for that turn and the next one or two (`bench/stalls.py`: the ticker's longest
    wait was three runs of closes back to back). A timer of no delay is ordered with the
    other timers by when it is due, after those already due, on both loops.
    """
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()
    loop.call_later(0, _wake, woken)
    await woken


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():  # the waiting task was cancelled meanwhile
        woken.set_result(None)


class Pacing:
    """The budget of the turns of long work, and how many times it yielded (for tests and
    benchmarks, which inject `clock` to count the turns without timing anything)."""

    def __init__(
        self, budget: float = TURN_BUDGET, limit: int = TURN_LIMIT, clock: Clock = time.perf_counter
    ) -> None:
        self.budget = budget
        self.limit = limit
        self.clock = clock
        self.yields = 0

    def turn(self) -> Turn:
        """A turn that begins now: the caller just got the loop."""
        return Turn(self)


class Turn:
    """One piece of long work's share of the loop: `spent()` before each item, and when it
    says so, `await pause()`. At least one item is done per turn, however slow the clock."""

    __slots__ = ("_items", "_pacing", "_since")

    def __init__(self, pacing: Pacing) -> None:
        self._pacing = pacing
        self._items = 0
        self._since = pacing.clock()

    def spent(self) -> bool:
        """Counts the item about to be done: True when this turn has had its share."""
        done = self._items
        self._items = done + 1
        pacing = self._pacing
        return done >= pacing.limit or pacing.clock() - self._since >= pacing.budget

    async def pause(self) -> None:
        """Yield behind what is due, then begin a new turn."""
        self._pacing.yields += 1
        await yield_turn()
        self._items = 1  # the item the caller is about to do
        self._since = self._pacing.clock()
