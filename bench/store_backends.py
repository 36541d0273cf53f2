"""What the Redis store costs per session and per request, against SQLite, in one run.

    python bench/store_backends.py [--sessions N] [--requests R] [--concurrency C]
                                   [--rounds K] [--store-ops M]

The sidecar runs in-process (`sidecar.app.Service` on an aiohttp `AppRunner`, as in
`store_writes.py`) in front of the fast upstream of `bench/fast_upstream.py`, once on SQLite
and once on a `redis-server` this script starts on a free 127.0.0.1 port (Debian's package),
alternating backends for K rounds so machine noise falls on both alike. Per round and backend:

* per session: N sessions opened one after another (initialize + notifications/initialized;
  the store write of a new session is waited for before the answer, SPEC 2.6);
* per request: a burst of R `ping` requests from C workers over those sessions (activity is
  written behind, so the store should barely show here);
* the store alone, without HTTP: M inserts one by one, and one activity flush of M rows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchlib import (
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

from sidecar.config import load_settings
from sidecar.sessions import Binding, Session, Transport
from sidecar.store import ActivityRow, Store, open_store
from tests.peers.redis_server import RedisServer

BACKENDS = ("sqlite", "redis")


@dataclass
class Totals:
    """Everything measured for one backend, over all rounds."""

    initialize: list[float] = field(default_factory=list)
    load: LoadResult = field(default_factory=LoadResult)
    insert: list[float] = field(default_factory=list)
    flush: list[float] = field(default_factory=list)
    flush_rows: int = 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Redis vs SQLite store cost through mcp-sidecar.")
    parser.add_argument("--sessions", type=int, default=200, help="sessions per round (200)")
    parser.add_argument("--requests", type=int, default=5000, help="burst per round (5000)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent workers (16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per backend (2)")
    parser.add_argument(
        "--store-ops", type=int, default=1000, help="store-only inserts and flush rows (1000)"
    )
    args = parser.parse_args(argv)
    if min(args.sessions, args.requests, args.concurrency, args.rounds, args.store_ops) < 1:
        parser.error("every count must be >= 1")
    return args


def store_section(backend: str, workdir: Path, redis: RedisServer, tag: str) -> dict[str, str]:
    if backend == "redis":
        return {"backend": "redis", "url": redis.url, "key_prefix": f"bench-{tag}:"}
    return {"path": str(workdir / f"sessions-{tag}.db")}


async def through_the_sidecar(
    backend: str,
    upstream_url: str,
    workdir: Path,
    redis: RedisServer,
    args: argparse.Namespace,
    *,
    tag: str,
) -> tuple[list[float], LoadResult]:
    store = store_section(backend, workdir, redis, tag)
    async with (
        in_process_sidecar(upstream_url, store) as sidecar,
        client_session(args.concurrency) as client,
    ):
        latencies, sessions = [], []
        for _ in range(args.sessions):
            start = time.perf_counter()
            sessions.append(await initialize(client, sidecar.url))
            latencies.append(time.perf_counter() - start)
        load = await run_load(
            client,
            sessions,
            "ping",
            requests=args.requests,
            concurrency=args.concurrency,
            max_seconds=120,
        )
    return latencies, load


def bench_session(number: int) -> Session:
    now = time.time()
    return Session(
        id=f"bench-{number:08d}-{now!r}",
        transport=Transport.STREAMABLE_HTTP,
        client="auth:bench",
        created_at=now,
        last_activity_at=now,
        protocol_version="2025-06-18",
        binding=Binding("", f"upstream-{number}"),
    )


async def store_alone(
    backend: str, workdir: Path, redis: RedisServer, count: int, tag: str
) -> tuple[list[float], float]:
    """Per-insert latencies, and the time of one flush of `count` rows."""
    base = load_settings(None, environ={}).store
    settings = base.model_copy(update=store_section(backend, workdir, redis, tag))
    store: Store = open_store(settings)
    await store.open()
    try:
        sessions = [bench_session(n) for n in range(count)]
        inserts = []
        for session in sessions:
            start = time.perf_counter()
            await store.insert(session)
            inserts.append(time.perf_counter() - start)
        rows = [ActivityRow(s.id, time.time(), 7, None) for s in sessions]
        start = time.perf_counter()
        await store.write_activity(rows)
        return inserts, time.perf_counter() - start
    finally:
        await store.close()


def ms(values: list[float], q: float | None = None) -> str:
    if not values:
        return "-"
    if q is None:
        return fmt(statistics.fmean(values) * 1000, 2)
    ordered = sorted(values)
    return fmt(ordered[max(1, round(q / 100 * len(ordered))) - 1] * 1000, 2)


def report(totals: dict[str, Totals]) -> None:
    print("## per session and per request, through the sidecar")
    print()
    print_table(
        [
            "store",
            "sessions",
            "initialize mean ms",
            "p50",
            "p99",
            "requests",
            "errors",
            "req/s",
            "request p50 ms",
            "p99",
        ],
        [
            [
                name,
                str(len(t.initialize)),
                ms(t.initialize),
                ms(t.initialize, 50),
                ms(t.initialize, 99),
                str(t.load.requests),
                str(t.load.errors),
                fmt(t.load.rate, 0),
                fmt(t.load.percentile(50) * 1000, 2),
                fmt(t.load.percentile(99) * 1000, 2),
            ]
            for name, t in totals.items()
        ],
    )
    print()
    print("## the store alone (no HTTP)")
    print()
    print_table(
        ["store", "inserts", "insert mean ms", "p50", "p99", "flush of N rows ms", "N"],
        [
            [
                name,
                str(len(t.insert)),
                ms(t.insert),
                ms(t.insert, 50),
                ms(t.insert, 99),
                ms(t.flush),
                str(t.flush_rows),
            ]
            for name, t in totals.items()
        ],
    )
    print()
    print(
        "initialize: initialize + notifications/initialized on one connection, one session "
        "after another; its store write (SQLite commit, or one Redis script call) is waited "
        "for before the answer. req/s: pings over the open sessions; activity is written "
        "behind, one flush per store.flush_interval (1 s), so the store is off the request "
        "path on either backend. Backends alternate round by round, same upstream."
    )


async def run(args: argparse.Namespace, workdir: Path) -> None:
    upstream, url = start_upstream("fast", workdir)
    redis = RedisServer(workdir)
    await asyncio.to_thread(redis.start)
    totals = {name: Totals() for name in BACKENDS}
    try:
        for round_number in range(args.rounds):
            for name in BACKENDS:
                print(f"  round {round_number + 1}: {name} ...", file=sys.stderr, flush=True)
                latencies, load = await through_the_sidecar(
                    name, url, workdir, redis, args, tag=f"http-{round_number}"
                )
                totals[name].initialize += latencies
                totals[name].load.add(load)
                tag = f"alone-{round_number}"
                inserts, flush = await store_alone(name, workdir, redis, args.store_ops, tag)
                totals[name].insert += inserts
                totals[name].flush.append(flush)
                totals[name].flush_rows = args.store_ops
        report({name: replace(t) for name, t in totals.items()})
    finally:
        await asyncio.to_thread(redis.stop)
        await asyncio.to_thread(upstream.stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_header(
        "mcp-sidecar store backends: Redis vs SQLite, per session and per request",
        {
            "sessions": args.sessions,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "store_ops": args.store_ops,
        },
    )
    return run_in_workdir(lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
