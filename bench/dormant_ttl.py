"""Dormant sessions whose `dormant_ttl` runs out all at once, in process: how long the sweep
that closes them takes, and the longest event-loop stall meanwhile.

N hibernated sessions are written straight into a temporary SQLite file (as
`bench/restore.py` does), a `SessionManager` restores them on the real SQLite store, then its
clock jumps past their dormant TTL and one sweep closes them all. Dormant sessions are held
as compact records (`sessions.Dormant`): each close reads the whole record back from the
store first, which is what this measures.

    python bench/dormant_ttl.py [--sessions 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.restore import IDLE_TIMEOUT, prepare  # noqa: E402 - needs sys.path
from sidecar import heap  # noqa: E402
from sidecar.manager import Limits, SessionManager  # noqa: E402
from sidecar.metrics import Metrics  # noqa: E402
from sidecar.sessions import Policy  # noqa: E402
from sidecar.store import PendingClose  # noqa: E402
from sidecar.store.sqlite import SqliteStore  # noqa: E402

DORMANT_TTL = 86400.0


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class NoCloser:
    """Dormant sessions owe no DELETE (their upstream session was closed when they
    hibernated); anything scheduled would be counted here."""

    def __init__(self) -> None:
        self.scheduled = 0

    def schedule(self, pending: PendingClose, credentials: Mapping[str, str]) -> None:
        self.scheduled += 1


async def measure(path: str) -> dict[str, float]:
    store = SqliteStore(path)
    await store.open()
    clock = Clock()
    closer = NoCloser()
    manager = SessionManager(
        store,
        closer,  # type: ignore[arg-type]
        Metrics(),
        policy=Policy(idle_timeout=IDLE_TIMEOUT, idle_action="hibernate", dormant_ttl=DORMANT_TTL),
        limits=Limits(),
        tombstone_ttl=7 * 86400,
        clock=clock,
    )
    manager.between_slices = heap.settle  # as the server sets it (`app.py`)
    await manager.restore()
    held = len(manager.dormant)
    clock.offset = DORMANT_TTL + 60
    gaps: list[float] = []
    ticker = asyncio.create_task(_tick(gaps))
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    closed = await manager.sweep()
    took = time.perf_counter() - start
    ticker.cancel()
    await store.close()
    return {
        "held": held,
        "closed": closed,
        "sweep_s": took,
        "max_gap_ms": max(gaps, default=0.0) * 1000,
        "deletes": closer.scheduled,
    }


async def _tick(gaps: list[float]) -> None:
    last = time.perf_counter()
    while True:
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last - 0.001)
        last = now


def main(argv: Sequence[str] | None = None) -> None:
    import uvloop  # noqa: PLC0415 - the server's own loop, only where it runs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=100_000)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(f"{args.sessions:,} dormant sessions; load average before: {load[0]:.2f} {load[1]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "sessions.db")
        prepare(path, args.sessions, "dormant")
        r = uvloop.run(measure(path))
    print("| held | closed by one sweep | sweep | closes/s | loop stall | DELETEs owed |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {r['held']:,.0f} | {r['closed']:,.0f} | {r['sweep_s']:.2f} s | "
        f"{r['closed'] / r['sweep_s']:,.0f} | {r['max_gap_ms']:.1f} ms | {r['deletes']:.0f} |"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
