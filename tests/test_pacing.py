"""Turns of long work: bounded by time as well as by count, and yielding behind due timers.

The clock of a turn is injected, so what is pinned is how many items a turn takes and how
many times the work yields, never a duration. The order tests run on both event loops the
sidecar meets: asyncio's (tests, embedding) and uvloop (the server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import uvloop

from sidecar.pacing import TURN_BUDGET, TURN_LIMIT, Pacing, yield_turn


@dataclass
class Ticks:
    """A turn's clock the test moves by hand."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


async def _run(items: int, pacing: Pacing, each: Callable[[int], None]) -> list[int]:
    """`items` items in turns of `pacing`; returns how many items each turn did."""
    turns = [0]
    turn = pacing.turn()
    for item in range(items):
        if turn.spent():
            await turn.pause()
            turns.append(0)
        each(item)
        turns[-1] += 1
    return turns


async def test_a_turn_takes_at_most_its_limit_of_items_when_time_does_not_move() -> None:
    pacing = Pacing(clock=Ticks())
    turns = await _run(2 * TURN_LIMIT + 5, pacing, lambda item: None)
    assert turns == [TURN_LIMIT, TURN_LIMIT, 5]
    assert pacing.yields == 2


async def test_a_turn_ends_when_its_time_is_used_whatever_the_count() -> None:
    ticks = Ticks()
    pacing = Pacing(clock=ticks)

    def slow(item: int) -> None:
        ticks.now += TURN_BUDGET / 4  # each item a quarter of the budget: four a turn

    turns = await _run(10, pacing, slow)
    assert turns == [4, 4, 2]
    assert pacing.yields == 2


async def test_a_turn_does_one_item_at_least_however_slow_the_items() -> None:
    ticks = Ticks()
    pacing = Pacing(clock=ticks)

    def very_slow(item: int) -> None:
        ticks.now += 10 * TURN_BUDGET

    turns = await _run(5, pacing, very_slow)
    assert turns == [1, 1, 1, 1, 1]


async def _order_around(pause: Callable[[], Awaitable[None]]) -> list[str]:
    """What runs first after a yield: a timer already due when the task yielded, or the task."""
    loop = asyncio.get_running_loop()
    order: list[str] = []
    loop.call_at(loop.time() - 1, order.append, "timer")  # came due during the task's turn
    await pause()
    order.append("task")
    while "timer" not in order:  # noqa: ASYNC110 - polls a condition: the timer's turn
        await asyncio.sleep(0)
    return order


async def test_a_timer_due_during_a_turn_runs_before_the_turn_after_it() -> None:
    assert await _order_around(yield_turn) == ["timer", "task"]


async def test_sleep_zero_is_not_enough_on_asyncio_the_task_runs_ahead_of_the_due_timer() -> None:
    """Why `yield_turn` exists: asyncio appends the due timers behind the task's step."""
    assert await _order_around(lambda: asyncio.sleep(0)) == ["task", "timer"]


def test_on_uvloop_too_a_timer_due_during_a_turn_runs_before_the_turn_after_it() -> None:
    assert uvloop.run(_order_around(yield_turn)) == ["timer", "task"]


async def test_a_task_cancelled_while_it_yields_leaves_the_wakeup_harmless() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    try:
        task = asyncio.create_task(yield_turn())
        await asyncio.sleep(0)  # it is waiting for its turn now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A later wakeup: once it has come, the cancelled task's one has fired before it.
        await yield_turn()
    finally:
        loop.set_exception_handler(None)
    assert errors == []
