"""Keeping CPython's cyclic garbage collector from stalling the event loop at scale.

A full collection walks every tracked object: with 100,000 sessions that is ~135 ms with the
loop stopped, and CPython starts one whenever the objects that survived grew by a quarter,
which creating or ending sessions in bulk does again and again. Session records are long-lived
and hold no reference cycles, so after each sweep the survivors are moved out of the
collector's sight (`gc.freeze()`, after a cheap young collection that still frees the young
cyclic garbage); full collections then walk only what is new. Cyclic garbage that was
already old when frozen is reclaimed by one full collection an hour (`full_collection`),
the only stall left, once an hour instead of many times a minute.

Only the server process does this (`Sweeper(freeze_heap=True)`): freezing a test runner's
heap would keep its unclosed resources from ever being reported.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("sidecar.heap")


def settle() -> None:
    """Collect the young generations, then exempt everything that survived from later
    collections (O(1): the generations are lists spliced together)."""
    gc.collect(1)
    gc.freeze()


def release() -> None:
    """Stopping: hand every object back to the collector (an embedding process goes on)."""
    gc.unfreeze()


def full_collection() -> int:
    """Return the frozen objects to the collector and collect everything (hourly)."""
    started = time.perf_counter()
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    log.debug(
        "full garbage collection: %d unreachable objects in %.1f ms",
        found,
        (time.perf_counter() - started) * 1000,
    )
    return found
