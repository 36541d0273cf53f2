"""SQLite write transactions caused by a burst of requests through the sidecar.

    python bench/store_writes.py [--requests N] [--concurrency C] [--sessions S]
                                 [--flush-intervals 1,0.25]

SPEC 2.6: activity is written behind, in one transaction per `store.flush_interval`, whatever
the request rate. This runs the sidecar in-process (`sidecar.app.Service` and
`build_proxy_app` on an aiohttp `AppRunner` in this script's event loop) in front of the fast
upstream of `bench/fast_upstream.py` (a subprocess), opens S sessions, sends a burst of N
requests from C workers round-robin over them, and reads `Service.store.transactions` before
and after. For each flush interval it prints the transactions the burst caused, their rate
against 1/flush_interval, the mean flush time, the WAL file's size, and checks that the
request counters in the database match the sidecar's memory after the last flush.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    CpuWitness,
    LoadResult,
    client_session,
    fmt,
    in_process_sidecar,
    initialize,
    print_header,
    print_table,
    run_in_workdir,
    run_load,
    start_upstream,
)

FLUSH_METRIC = "mcp_sidecar_store_flush_duration_seconds"


@dataclass(slots=True)
class Outcome:
    flush_interval: float
    sessions: int
    requests: int
    errors: int
    seconds: float
    tx_burst: int  # transactions committed while the burst ran
    tx_total: int  # ... plus the flush that wrote the burst's tail
    flushes: float  # activity flushes over the same span (from the flush histogram)
    mean_flush: float
    wal_bytes: int
    db_bytes: int
    persisted: int  # sum of `requests` over the sessions in the database
    in_memory: int  # the same sum in the sidecar's session table
    probe_idle: list[float]  # --probe-initialize: initialize latencies before the burst
    probe_burst: list[float]  # ... and during it


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="SQLite transactions caused by a burst of requests through mcp-sidecar."
    )
    parser.add_argument("--requests", type=int, default=10_000, help="burst size (10000)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent workers (16)")
    parser.add_argument("--sessions", type=int, default=10, help="sessions the burst uses (10)")
    parser.add_argument(
        "--flush-intervals",
        default="1,0.25",
        help="comma-separated store.flush_interval values in seconds, one run each (1,0.25)",
    )
    parser.add_argument(
        "--probe-initialize",
        action="store_true",
        help="also open a new session every 0.1 s during the burst and report how long "
        "initialize takes (its commit waits for any running activity flush)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="time bound of one burst (60)"
    )
    args = parser.parse_args(argv)
    try:
        args.flush_intervals = [float(v) for v in args.flush_intervals.split(",") if v.strip()]
    except ValueError:
        parser.error("--flush-intervals takes numbers of seconds, e.g. 1,0.25")
    if not args.flush_intervals or min(args.flush_intervals) <= 0:
        parser.error("--flush-intervals must name at least one positive interval")
    if min(args.requests, args.concurrency, args.sessions) < 1:
        parser.error("--requests, --concurrency and --sessions must be >= 1")
    return args


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def persisted_requests(db_path: Path) -> int:
    """Read the counters back through a second, read-only connection (WAL lets it read)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        row = db.execute("SELECT COALESCE(SUM(requests), 0) FROM sessions").fetchone()
    return int(row[0])


PROBE_INTERVAL = 0.1
PROBE_IDLE_COUNT = 10
PROBE_MAX = 600


async def probe_initialize(url: str, burst: asyncio.Task[LoadResult] | None) -> list[float]:
    """Time `initialize` + `notifications/initialized` on a connection of its own, every
    PROBE_INTERVAL: PROBE_IDLE_COUNT times when `burst` is None, else until it is done."""
    latencies: list[float] = []
    async with client_session(1) as client:
        while len(latencies) < (PROBE_IDLE_COUNT if burst is None else PROBE_MAX):
            if burst is not None and burst.done():
                break
            start = time.perf_counter()
            await initialize(client, url)
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(PROBE_INTERVAL)
    return latencies


async def one_run(
    flush_interval: float, upstream_url: str, workdir: Path, args: argparse.Namespace
) -> Outcome:
    db_path = workdir / f"sessions-{flush_interval:g}.db"
    store_settings = {"path": str(db_path), "flush_interval": flush_interval}
    # Leaving the block stops the service: final flush, store closed.
    async with in_process_sidecar(upstream_url, store_settings) as sidecar:
        url, service = sidecar.url, sidecar.service
        store, registry = service.store, service.metrics.registry

        def flushes() -> float:
            return registry.get_sample_value(FLUSH_METRIC + "_count") or 0.0

        def flush_seconds() -> float:
            return registry.get_sample_value(FLUSH_METRIC + "_sum") or 0.0

        async with client_session(args.concurrency) as client:
            sessions = [await initialize(client, url) for _ in range(args.sessions)]
            probe_idle = await probe_initialize(url, None) if args.probe_initialize else []
            # Let the initializations' own activity flush go by, so the burst starts clean.
            await asyncio.sleep(flush_interval * 1.2)
            tx_before, flushes_before, flush_s_before = (
                store.transactions,
                flushes(),
                flush_seconds(),
            )
            burst = asyncio.create_task(
                run_load(
                    client,
                    sessions,
                    "ping",
                    requests=args.requests,
                    concurrency=args.concurrency,
                    max_seconds=args.max_seconds,
                )
            )
            probe_burst = await probe_initialize(url, burst) if args.probe_initialize else []
            load = await burst
            # Each probe's session creation is one transaction of its own: not activity.
            tx_burst = store.transactions - tx_before - len(probe_burst)
            # One more interval (and a margin): the flush that writes the burst's tail.
            await asyncio.sleep(flush_interval * 1.5 + 0.2)
            tx_total = store.transactions - tx_before - len(probe_burst)
            flush_count = flushes() - flushes_before
            flush_time = flush_seconds() - flush_s_before
            wal_bytes = file_size(Path(str(db_path) + "-wal"))
            db_bytes = file_size(db_path)
            persisted = persisted_requests(db_path)
            in_memory = sum(s.requests for s in service.manager.live.values())
    if load.errors:
        print(f"  ! {load.errors} errors, first: {load.first_error}", file=sys.stderr)
    return Outcome(
        flush_interval=flush_interval,
        sessions=args.sessions,
        requests=load.requests,
        errors=load.errors,
        seconds=load.seconds,
        tx_burst=tx_burst,
        tx_total=tx_total,
        flushes=flush_count,
        mean_flush=flush_time / flush_count if flush_count else math.nan,
        wal_bytes=wal_bytes,
        db_bytes=db_bytes,
        persisted=persisted,
        in_memory=in_memory,
        probe_idle=probe_idle,
        probe_burst=probe_burst,
    )


def report(outcomes: list[Outcome]) -> None:
    print_table(
        [
            "flush_interval s",
            "sessions",
            "requests",
            "errors",
            "duration s",
            "req/s",
            "tx (burst)",
            "tx (+ last flush)",
            "tx/s",
            "1/flush_interval",
            "bound",
            "requests per tx",
            "mean flush ms",
            "WAL KiB",
            "db KiB",
            "counters persisted",
        ],
        [
            [
                f"{o.flush_interval:g}",
                str(o.sessions),
                str(o.requests),
                str(o.errors),
                fmt(o.seconds, 2),
                fmt(o.requests / o.seconds if o.seconds else math.nan, 0),
                str(o.tx_burst),
                str(o.tx_total),
                fmt(o.tx_burst / o.seconds if o.seconds else math.nan, 2),
                fmt(1 / o.flush_interval, 2),
                str(math.floor(o.seconds / o.flush_interval) + 1),
                fmt(o.requests / o.tx_total if o.tx_total else math.nan, 0),
                fmt(o.mean_flush * 1000, 2),
                fmt(o.wal_bytes / 1024, 0),
                fmt(o.db_bytes / 1024, 0),
                "yes" if o.persisted == o.in_memory else f"no ({o.persisted}/{o.in_memory})",
            ]
            for o in outcomes
        ],
    )
    print()
    print(
        "tx (burst): write transactions committed while the burst ran, less the one per "
        "session --probe-initialize creates, so activity flushes only. bound: the most the "
        "write-behind rule allows, floor(duration / flush_interval) + 1; without "
        "write-behind every request would be a transaction. counters persisted: after the "
        "last flush the database's per-session request counts equal the sidecar's in-memory "
        "ones. WAL KiB: the -wal file at that point (SQLite checkpoints it at 1000 pages)."
    )
    probed = [o for o in outcomes if o.probe_idle or o.probe_burst]
    if not probed:
        return
    print()
    print("## initialize latency (ms), idle vs during the burst")
    print()

    def pct(values: list[float], q: float) -> str:
        if not values:
            return "-"
        ordered = sorted(values)
        return fmt(ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] * 1000, 1)

    print_table(
        [
            "flush_interval s",
            "sessions",
            "idle p50",
            "idle max",
            "burst n",
            "burst p50",
            "burst p90",
            "burst max",
        ],
        [
            [
                f"{o.flush_interval:g}",
                str(o.sessions),
                pct(o.probe_idle, 50),
                pct(o.probe_idle, 100),
                str(len(o.probe_burst)),
                pct(o.probe_burst, 50),
                pct(o.probe_burst, 90),
                pct(o.probe_burst, 100),
            ]
            for o in probed
        ],
    )
    print()
    print(
        "A new session's row is committed before its initialize is answered (SPEC 2.6); that "
        "commit queues behind any activity flush holding the store's write lock."
    )


async def run(args: argparse.Namespace, workdir: Path) -> None:
    witness = CpuWitness()
    upstream, url = start_upstream("fast", workdir)
    witness.watch(upstream.pid)
    try:
        outcomes = []
        for interval in args.flush_intervals:
            print(f"  running flush_interval={interval:g}s ...", file=sys.stderr, flush=True)
            outcomes.append(await one_run(interval, url, workdir, args))
        report(outcomes)
        print()
        witness.report()  # while the upstream still runs: its CPU is ours
    finally:
        await asyncio.to_thread(upstream.stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_header(
        "mcp-sidecar store writes: SQLite transactions per burst",
        {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "sessions": args.sessions,
            "flush_intervals": ",".join(f"{v:g}" for v in args.flush_intervals),
            "request": "ping",
            "probe_initialize": args.probe_initialize,
        },
    )
    return run_in_workdir(lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
