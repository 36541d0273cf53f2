"""Two sidecars on one Redis against one sidecar on SQLite, same upstream, same run.

    python bench/multi_sidecar.py [--sessions N] [--requests R] [--concurrency C] [--rounds K]

Per round, three set-ups in turn in front of the fast upstream of `bench/fast_upstream.py`:
the upstream alone (the baseline for "added latency"), one sidecar on SQLite, and two
sidecars sharing one `redis-server` (Debian's package, started here on a free 127.0.0.1 port)
under one key prefix (SPEC 2.8). With two sidecars, sessions are created on each in turn and
every later request goes to the other sidecar than the one before, so each sidecar serves
sessions the other created (read from Redis once, then held).

The sidecars run in this process (`sidecar.app.Service` on aiohttp `AppRunner`s, as in
`store_backends.py`): the two share one event loop and one core, so the figures say what the
store and the sharing cost, not what two machines would serve.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchlib import (
    LoadResult,
    McpSession,
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

from tests.peers.redis_server import RedisServer

SETUPS = ("upstream alone", "1 sidecar, SQLite", "2 sidecars, Redis")


@dataclass
class Totals:
    initialize: list[float] = field(default_factory=list)
    load: LoadResult = field(default_factory=LoadResult)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Two sidecars on Redis vs one on SQLite.")
    parser.add_argument("--sessions", type=int, default=100, help="sessions per round (100)")
    parser.add_argument("--requests", type=int, default=4000, help="burst per round (4000)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent workers (16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per set-up (2)")
    args = parser.parse_args(argv)
    if min(args.sessions, args.requests, args.concurrency, args.rounds) < 1:
        parser.error("every count must be >= 1")
    return args


async def measure(urls: list[str], args: argparse.Namespace, totals: Totals) -> None:
    """Sessions made on each URL in turn; each later request on the next URL."""
    async with client_session(args.concurrency) as client:
        sessions: list[McpSession] = []
        for number in range(args.sessions):
            start = time.perf_counter()
            sessions.append(await initialize(client, urls[number % len(urls)]))
            totals.initialize.append(time.perf_counter() - start)
        spread = [replace(s, url=url) for s in sessions for url in reversed(urls)]
        load = await run_load(
            client,
            spread,
            "ping",
            requests=args.requests,
            concurrency=args.concurrency,
            max_seconds=120,
        )
        totals.load.add(load)


async def one_round(
    number: int, url: str, workdir: Path, redis: RedisServer, args: argparse.Namespace
) -> dict[str, Totals]:
    measured = {name: Totals() for name in SETUPS}
    await measure([url], args, measured[SETUPS[0]])
    async with in_process_sidecar(url, {"path": str(workdir / f"sessions-{number}.db")}) as one:
        await measure([one.url], args, measured[SETUPS[1]])
    shared = {"backend": "redis", "url": redis.url, "key_prefix": f"bench-{number}:"}
    async with (
        in_process_sidecar(url, shared) as first,
        in_process_sidecar(url, shared) as second,
    ):
        await measure([first.url, second.url], args, measured[SETUPS[2]])
    return measured


def ms(values: list[float]) -> str:
    return fmt(sum(values) / len(values) * 1000, 2) if values else "-"


def report(totals: dict[str, Totals]) -> None:
    base = totals[SETUPS[0]].load
    rows = []
    for name, t in totals.items():
        added_p50 = (t.load.percentile(50) - base.percentile(50)) * 1000
        rows.append(
            [
                name,
                str(len(t.initialize)),
                ms(t.initialize),
                str(t.load.requests),
                str(t.load.errors),
                fmt(t.load.rate, 0),
                fmt(t.load.percentile(50) * 1000, 2),
                fmt(t.load.percentile(99) * 1000, 2),
                "-" if t is totals[SETUPS[0]] else fmt(added_p50, 2),
            ]
        )
    print_table(
        [
            "set-up",
            "sessions",
            "initialize mean ms",
            "requests",
            "errors",
            "req/s",
            "p50 ms",
            "p99 ms",
            "added p50 ms",
        ],
        rows,
    )
    print()
    print(
        "ping requests over the open sessions; with two sidecars each request goes to the "
        "other sidecar than the session's previous one. added p50: the set-up's median "
        "minus the upstream alone's, same run. Both sidecars share this process's one loop."
    )


async def run(args: argparse.Namespace, workdir: Path) -> None:
    upstream, url = start_upstream("fast", workdir)
    redis = RedisServer(workdir)
    await asyncio.to_thread(redis.start)
    totals = {name: Totals() for name in SETUPS}
    try:
        for number in range(args.rounds):
            print(f"  round {number + 1} ...", file=sys.stderr, flush=True)
            for name, t in (await one_round(number, url, workdir, redis, args)).items():
                totals[name].initialize += t.initialize
                totals[name].load.add(t.load)
        report(totals)
    finally:
        await asyncio.to_thread(redis.stop)
        await asyncio.to_thread(upstream.stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_header(
        "mcp-sidecar: two sidecars on one Redis vs one on SQLite, same upstream",
        {
            "sessions": args.sessions,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
        },
    )
    return run_in_workdir(lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
