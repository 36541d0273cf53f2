"""How long a creation waits for its commit, with SQLite's checkpoint inside the commits or
outside them.

In process, no HTTP: K tasks insert sessions into the SQLite store (a temp dir on the disk
that holds the working directory, not a tmpfs: the checkpoint's fsync is the point), each
insert awaited as `initialize` awaits it (durable before the answer), concurrent ones sharing
a group commit. Two modes, alternating rounds on the same machine:

* **inside**: as before the change: the writer's automatic checkpoint (`wal_autocheckpoint`
  1000 pages), which runs in whichever commit crosses the mark, its fsyncs included;
* **outside**: the store as it is: no automatic checkpoint on the writer; the store's own
  checkpoint task runs a PASSIVE one at the same 1,000 pages, on its own connection and thread.

Printed per mode: creations/s, and the wait of an insert (from the call to its return)
p50 / p99 / max, the median over rounds, the slowest write transaction (BEGIN to COMMIT on the
writer) and how many took over 20 ms, and (outside) how many background checkpoints ran
during a round: a round must last a few seconds for them to run at all (the default does).

    python bench/checkpoint_commits.py                       # ~1 min
    python bench/checkpoint_commits.py --rate 3000 --creations 30000   # ~1.5 min, paced
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop
from benchlib import fmt, machine_busy, print_table, sidecar_revision

from sidecar.sessions import Session, Transport
from sidecar.store.sqlite import SqliteStore

MODES = ("inside", "outside")
SLOW = 0.02  # a commit slower than this is counted


class TimedStore(SqliteStore):
    """The store, each write transaction timed (BEGIN to COMMIT on the writer's thread)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.commit_times: list[float] = []

    async def _transaction(self, statements: list[tuple[str, Sequence[Any]]]) -> None:
        started = time.perf_counter()
        try:
            await super()._transaction(statements)
        finally:
            self.commit_times.append(time.perf_counter() - started)


async def _open(path: Path, mode: str) -> TimedStore:
    store = TimedStore(str(path))
    await store.open()
    if mode == "inside":
        await store.checkpointer.stop()  # no background task: SQLite's own, on the writer
        await store.db.execute("PRAGMA wal_autocheckpoint=1000")
    return store


def _session(n: int) -> Session:
    now = time.time()
    return Session(
        id=f"{n:08x}-bench-session-id-{n:012d}",
        transport=Transport.STREAMABLE_HTTP,
        client="bench",
        created_at=now,
        last_activity_at=now,
        protocol_version="2025-06-18",
        client_info="bench 1.0",
    )


async def _round(directory: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    store = await _open(directory / f"{mode}.db", mode)
    before = store.checkpointer.checkpoints
    waits: list[float] = []
    creations = args.creations
    numbers = iter(range(creations))
    begin = time.perf_counter()

    async def creator() -> None:
        for n in numbers:
            if args.rate:  # paced: creation n starts at its slot, not before
                await asyncio.sleep(begin + n / args.rate - time.perf_counter())
            started = time.perf_counter()
            await store.insert(_session(n))
            waits.append(time.perf_counter() - started)

    await asyncio.gather(*(creator() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - begin
    transactions = store.transactions
    checkpoints = store.checkpointer.checkpoints - before  # background ones, in the round
    await store.close()
    waits.sort()
    commits = sorted(store.commit_times)
    return {
        "rate": creations / elapsed,
        "p50": waits[len(waits) // 2] * 1000,
        "p99": waits[int(len(waits) * 0.99)] * 1000,
        "max": waits[-1] * 1000,
        "commit_max": commits[-1] * 1000,
        "slow_commits": float(sum(t > SLOW for t in commits)),
        "per_tx": creations / transactions,
        "checkpoints": float(checkpoints),
    }


async def main(args: argparse.Namespace) -> None:
    print(f"sidecar {sidecar_revision()}; CPU busy before start {machine_busy():.0%}")
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for number in range(args.rounds):
            for mode in MODES if number % 2 == 0 else MODES[::-1]:
                directory = Path(tmp) / f"{mode}-{number}"
                directory.mkdir()
                result = await _round(directory, mode, args)
                results[mode].append(result)
                print(
                    f"round {number + 1} {mode}: "
                    + ", ".join(f"{k} {fmt(v)}" for k, v in result.items())
                )
    rows = []
    for mode in MODES:
        med = {k: statistics.median(r[k] for r in results[mode]) for k in results[mode][0]}
        worst = max(r["max"] for r in results[mode])
        rows.append(
            [
                mode,
                fmt(med["rate"]),
                fmt(med["p50"]),
                fmt(med["p99"]),
                fmt(med["max"]),
                fmt(worst),
                fmt(med["commit_max"]),
                fmt(statistics.median(r["slow_commits"] for r in results[mode]), 0),
                fmt(med["per_tx"]),
                fmt(med["checkpoints"], 0) if mode == "outside" else "every 1,000 pages",
            ]
        )
    print_table(
        [
            "checkpoint",
            "creations/s",
            "wait p50 ms",
            "wait p99 ms",
            "wait max ms (median)",
            "wait max ms (worst)",
            "commit max ms",
            f"commits > {SLOW * 1000:.0f} ms",
            "creations/commit",
            "checkpoints",
        ],
        rows,
    )
    print(f"CPU busy after {machine_busy():.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creations", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="creations per second to start (0: as fast as they go); e.g. 3000, the target",
    )
    parser.add_argument(
        "--dir", default=".", help="where the temp databases go (a real disk, not a tmpfs)"
    )
    uvloop.run(main(parser.parse_args()))
