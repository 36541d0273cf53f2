"""How fast the closer sends the upstream DELETEs of a mass expiry, and whether it stalls the loop.

In process, without the HTTP server: the real `UpstreamCloser` over the real `UpstreamPool`
and the SQLite store (temp dir), in front of `fast_upstream.py` (a subprocess; its DELETE of a
session it never issued answers 404, which ends an owed close like a 200) or, with
`--upstream canned`, the canned nginx of `overhead.py` (200 to everything: the fastest server
there can be). N owed DELETEs are recorded in the store (as closing sessions records them,
in slices), all due at once, then handed to the closer; it runs until it holds none and the
store owes none. Beside it, a probe task asks to wake every 5 ms and records how late it
woke: the longest stall of the event loop while the closes ran.

    python bench/closes.py                          # 100,000 closes, ~1 min
    python bench/closes.py --closes 10000 --parallel 16,32,64 --upstream canned

Prints per run: DELETEs/s, CPU of this process per DELETE (the upstream is another process),
store transactions, the probe's max and p99 lateness, and the machine's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop
from benchlib import HOST, fmt, machine_busy, print_table, sidecar_revision, start_upstream
from overhead import Nginx, canned_server

from sidecar import closer as closer_module
from sidecar.closer import UpstreamCloser
from sidecar.metrics import Metrics
from sidecar.sessions import Binding, CloseReason, Session, State, Transport
from sidecar.store import PendingClose
from sidecar.store.sqlite import SqliteStore
from sidecar.upstream import UpstreamPool
from tests.peers.processes import free_ports

PROBE_INTERVAL = 0.005
RECORD_SLICE = 5000  # owed DELETEs recorded per store transaction before the run
DRAIN_LIMIT = 900.0  # seconds: a run that has not drained by then is reported as such


class LoopProbe:
    """Asks to wake every PROBE_INTERVAL; how late each wake-up came is a stall of the loop."""

    def __init__(self) -> None:
        self.lateness: list[float] = []

    async def run(self) -> None:
        # perf_counter, not loop.time(): uvloop's clock moves in whole milliseconds.
        while True:
            due = time.perf_counter() + PROBE_INTERVAL
            await asyncio.sleep(PROBE_INTERVAL)
            self.lateness.append(max(0.0, time.perf_counter() - due))

    def percentile(self, share: float) -> float:
        ordered = sorted(self.lateness)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def owed(count: int, upstream: str, now: float) -> list[tuple[Session, PendingClose]]:
    closes = []
    for number in range(count):
        session_id = f"{number:032x}"
        session = Session(
            id=session_id,
            transport=Transport.STREAMABLE_HTTP,
            client="ip:127.0.0.1",
            created_at=now - 7200,
            last_activity_at=now - 3700,
            binding=Binding(upstream, session_id),
            state=State.CLOSED,
            close_reason=CloseReason.IDLE_TIMEOUT,
            closed_at=now,
        )
        closes.append((session, PendingClose(session_id, "2025-06-18", 0, now, upstream)))
    return closes


async def one_run(db: Path, url: str, count: int, parallel: int) -> list[str]:
    closer_module.PARALLEL_CLOSES = parallel  # read when a closer is built
    store = SqliteStore(str(db))
    await store.open()
    pool = UpstreamPool(url, 5.0, 30.0)
    await pool.start()
    metrics = Metrics()
    closer = UpstreamCloser(pool, store, metrics)
    upstream_name = next(name for name, _ in pool)
    closes = owed(count, upstream_name, time.time())
    for first in range(0, count, RECORD_SLICE):
        await store.mark_closed_many(closes[first : first + RECORD_SLICE])
    gc.freeze()  # as the server does (heap.py): the records built above are not garbage
    probe = LoopProbe()
    probing = asyncio.create_task(probe.run())
    running = asyncio.create_task(closer.run())
    try:
        cpu, start, before = time.process_time(), time.perf_counter(), store.transactions
        for number, (_, pending) in enumerate(closes):
            closer.schedule(pending, {})
            if number % 64 == 63:
                await asyncio.sleep(0)  # as the manager announces closes: in runs that yield
        # Polled: the closer has no "drained" event, and a benchmark must not add one to it.
        while closer.backlog and time.perf_counter() - start < DRAIN_LIMIT:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        transactions = store.transactions - before
        left = len(await store.pending_closes())
    finally:
        for task in (running, probing):
            task.cancel()
        await asyncio.gather(running, probing, return_exceptions=True)
        await pool.close()
        await store.close()
    results = {
        result: metrics.registry.get_sample_value(
            "mcp_sidecar_upstream_close_total", {"result": result}
        )
        or 0
        for result in ("ok", "gone", "retry")
    }
    done = int(results["ok"] + results["gone"])
    return [
        str(parallel),
        str(count),
        f"{done} ({int(results['retry'])} retried, {left} still owed)",
        fmt(done / seconds, 0),
        fmt(cpu / max(1, done) * 1e6, 0),
        str(transactions),
        fmt(probe.percentile(1.0) * 1000, 1),
        fmt(probe.percentile(0.99) * 1000, 1),
        fmt(os.getloadavg()[0], 2),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--closes", type=int, default=100_000)
    parser.add_argument("--parallel", default=str(closer_module.PARALLEL_CLOSES), help="a,b,c")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--upstream", choices=("fast", "canned"), default="fast")
    return parser.parse_args(argv)


def start_target(kind: str, workdir: Path) -> tuple[object, str]:
    if kind == "fast":
        return start_upstream("fast", workdir)
    (port,) = free_ports(1)
    nginx = Nginx(workdir, "canned", canned_server(port))
    nginx.start([port])
    return nginx, f"http://{HOST}:{port}/mcp"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    busy = machine_busy()
    print(f"sidecar: git {sidecar_revision()}")
    print(f"command: python bench/closes.py {' '.join(argv or sys.argv[1:])}")
    print(f"CPU busy before start: {busy:.0%}; load average {os.getloadavg()[0]:.2f}\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-closes-") as tmp:
        workdir = Path(tmp)
        target, url = start_target(args.upstream, workdir)
        try:
            for number in range(args.rounds):
                for parallel in (int(p) for p in args.parallel.split(",")):
                    print(f"  {parallel} in flight, round {number + 1} ...", file=sys.stderr)
                    db = workdir / f"closes-{parallel}-{number}.db"
                    rows.append(uvloop.run(one_run(db, url, args.closes, parallel)))
        finally:
            target.stop()  # type: ignore[attr-defined]
    print(f"## Owed DELETEs drained by the closer ({args.upstream} upstream)\n")
    print_table(
        [
            "in flight",
            "owed",
            "closed (ok + 404)",
            "DELETEs/s",
            "CPU µs/DELETE",
            "store transactions",
            "loop stall max ms",
            "stall p99 ms",
            "load avg",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
