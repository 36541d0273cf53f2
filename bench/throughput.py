"""Throughput and latency of MCP requests sent directly to an upstream vs through the sidecar.

    python bench/throughput.py [--requests N] [--concurrency C] [--sessions S]

Starts, on 127.0.0.1 and free ports:

* the real FastMCP server of the test suite (`tests/peers/upstream_server.py`, SSE answers,
  as FastMCP serves them by default) and a sidecar (`python -m sidecar serve`) in front of it;
* the minimal aiohttp server of `bench/fast_upstream.py` and a second sidecar in front of it,
  so the sidecar's cost is not hidden behind FastMCP's own.

For each variant it opens S sessions on each path (direct, then through the sidecar), sends a
warm-up, then N requests from C concurrent workers round-robin over the sessions, and prints
req/s, latency percentiles, CPU time per request of each process, and the sidecar/direct ratios.
Every load loop is bounded by N and by --max-seconds (per round). `--profile DIR` runs the
sidecars under cProfile and prints where their time went.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import pstats
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    HOST,
    CpuWitness,
    LoadResult,
    client_session,
    close_session,
    fmt,
    initialize,
    metric_sum_count,
    print_header,
    print_table,
    process_cpu_seconds,
    run_in_workdir,
    run_load,
    start_upstream,
)

from tests.peers.processes import (
    ManagedProcess,
    SidecarHandle,
    TomlValue,
    free_ports,
    start_sidecar,
)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    upstream: str  # "fastmcp" or "fast"
    kind: str  # what each request is (benchlib.KINDS)
    mode: str | None  # fast upstream's answer format: "json" or "sse"
    about: str


VARIANTS = (
    Variant("fastmcp-echo", "fastmcp", "echo", None, "FastMCP, tools/call echo (SSE answer)"),
    Variant("fastmcp-ping", "fastmcp", "ping", None, "FastMCP, ping (SSE answer)"),
    Variant("fast-json-ping", "fast", "ping", "json", "fast upstream, ping (JSON answer)"),
    Variant("fast-sse-ping", "fast", "ping", "sse", "fast upstream, ping (SSE answer)"),
)


@dataclass(slots=True)
class Peer:
    """One upstream and the sidecar in front of it."""

    upstream: ManagedProcess
    upstream_url: str
    sidecar: SidecarHandle


@dataclass(slots=True)
class Measurement:
    variant: Variant
    path: str  # "direct" or "sidecar"
    load: LoadResult
    cpu: dict[str, float]  # seconds per request, by process
    own_time: float = math.nan  # sidecar's request_duration histogram: mean seconds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="MCP throughput and latency, directly vs through mcp-sidecar."
    )
    parser.add_argument(
        "--requests", type=int, default=4000, help="requests per path and variant (4000)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent workers (16)")
    parser.add_argument("--sessions", type=int, default=4, help="sessions per run (4)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="direct/sidecar alternations per variant (2)"
    )
    parser.add_argument("--warmup", type=int, default=500, help="warm-up requests per path (500)")
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="time bound of one round (20)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(v.name for v in VARIANTS),
        help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS),
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the sidecars under cProfile, write DIR/sidecar-<upstream>.prof, print a summary",
    )
    parser.add_argument("--profile-top", type=int, default=20, help="functions shown (20)")
    args = parser.parse_args(argv)
    known = {v.name for v in VARIANTS}
    chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
    if unknown := [name for name in chosen if name not in known]:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if min(args.requests, args.concurrency, args.sessions, args.rounds) < 1 or args.warmup < 0:
        parser.error("--requests, --concurrency, --sessions, --rounds must be >= 1, --warmup >= 0")
    by_name = {v.name: v for v in VARIANTS}
    args.variants = [by_name[name] for name in dict.fromkeys(chosen)]
    return args


# ---- processes -------------------------------------------------------------------------------


def start_proxy(kind: str, upstream_url: str, workdir: Path, profile: Path | None) -> SidecarHandle:
    # Log level info, the production default (the test helpers default to debug).
    log: dict[str, TomlValue] = {"level": "info"}
    if profile is None:
        return start_sidecar(workdir, upstream_url, log=log)
    # The same config and helpers, but `python -m cProfile -o FILE -m sidecar serve`.
    listen, admin = free_ports(2)
    config: dict[str, dict[str, TomlValue]] = {
        "server": {"listen": f"{HOST}:{listen}"},
        "upstream": {"url": upstream_url},
        "store": {"path": str(workdir / f"sessions-{kind}.db")},
        "admin": {"listen": f"{HOST}:{admin}"},
        "log": log,
    }
    sidecar_dir = workdir / f"sidecar-{kind}"
    sidecar_dir.mkdir()
    handle = SidecarHandle(sidecar_dir, config, path="/mcp")
    profile.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        str(profile / f"sidecar-{kind}.prof"),
        "-m",
        "sidecar",
        "serve",
        "--config",
        str(handle.config_path),
    ]
    handle.process = ManagedProcess(
        args, log_path=handle.log_path, env=handle.env, name=f"sidecar:{listen}"
    )
    handle.process.start()
    try:
        handle.process.wait_port(HOST, listen)
        handle.process.wait_port(HOST, admin)
    except BaseException:
        handle.process.stop()
        raise
    return handle


# ---- measuring -------------------------------------------------------------------------------


PATHS = ("direct", "sidecar")
OWN_TIME = "mcp_sidecar_request_duration_seconds"


async def measure(variant: Variant, peer: Peer, args: argparse.Namespace) -> list[Measurement]:
    """Both paths of one variant, in alternating rounds so drift hits both alike."""
    urls = {"direct": peer.upstream_url, "sidecar": peer.sidecar.url}
    pids = {"client": None, "sidecar": peer.sidecar.proc.pid, "upstream": peer.upstream.pid}
    loads = {path: LoadResult() for path in PATHS}
    cpu = {path: dict.fromkeys(pids, 0.0) for path in PATHS}
    own = [0.0, 0.0]  # sum, count of the sidecar's own-time histogram over the sidecar runs
    async with (
        client_session(args.concurrency) as direct,
        client_session(args.concurrency) as via,
        client_session(1) as admin,
    ):
        clients = {"direct": direct, "sidecar": via}
        sessions = {
            path: [
                await initialize(clients[path], urls[path], mode=variant.mode)
                for _ in range(args.sessions)
            ]
            for path in PATHS
        }
        try:
            for path in PATHS if args.warmup else ():
                await run_load(
                    clients[path],
                    sessions[path],
                    variant.kind,
                    requests=args.warmup,
                    concurrency=args.concurrency,
                    max_seconds=args.max_seconds,
                )
            for number in range(args.rounds):
                share = args.requests // args.rounds + (number < args.requests % args.rounds)
                for path in PATHS:
                    own_before = await metric_sum_count(admin, peer.sidecar.admin_url, OWN_TIME)
                    cpu_before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
                    load = await run_load(
                        clients[path],
                        sessions[path],
                        variant.kind,
                        requests=share,
                        concurrency=args.concurrency,
                        max_seconds=args.max_seconds,
                        first_id=args.warmup + 1 + loads[path].requests + loads[path].errors,
                    )
                    for name, pid in pids.items():
                        cpu[path][name] += process_cpu_seconds(pid) - cpu_before[name]
                    own_after = await metric_sum_count(admin, peer.sidecar.admin_url, OWN_TIME)
                    if path == "sidecar":
                        own[0] += own_after[0] - own_before[0]
                        own[1] += own_after[1] - own_before[1]
                    loads[path].add(load)
        finally:
            for path in PATHS:
                for session in sessions[path]:
                    await close_session(clients[path], session)
    results = []
    for path in PATHS:
        load = loads[path]
        done = max(1, load.requests + load.errors)
        measurement = Measurement(
            variant, path, load, {name: spent / done for name, spent in cpu[path].items()}
        )
        if path == "sidecar" and own[1] > 0:
            measurement.own_time = own[0] / own[1]
        if load.errors:
            print(
                f"  ! {variant.name} {path}: {load.errors} errors, first: {load.first_error}",
                file=sys.stderr,
            )
        if load.stopped_by_time:
            print(
                f"  ! {variant.name} {path}: a round hit --max-seconds; {done} requests in all",
                file=sys.stderr,
            )
        results.append(measurement)
    return results


def ms(seconds: float) -> str:
    return fmt(seconds * 1000, 2)


def us(seconds: float) -> str:
    return fmt(seconds * 1e6, 0)


def report(results: list[Measurement]) -> None:
    print("## Runs")
    print()
    print_table(
        [
            "variant",
            "path",
            "ok",
            "errors",
            "req/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "CPU µs/req client",
            "sidecar",
            "upstream",
        ],
        [
            [
                m.variant.name,
                m.path,
                str(m.load.requests),
                str(m.load.errors),
                fmt(m.load.rate, 0),
                ms(m.load.percentile(50)),
                ms(m.load.percentile(95)),
                ms(m.load.percentile(99)),
                us(m.cpu["client"]),
                us(m.cpu["sidecar"]) if m.path == "sidecar" else "-",
                us(m.cpu["upstream"]),
            ]
            for m in results
        ],
    )
    print()
    print("## Sidecar / direct")
    print()
    rows = []
    for variant in dict.fromkeys(m.variant for m in results):
        pair = {m.path: m for m in results if m.variant == variant}
        if set(pair) != {"direct", "sidecar"}:
            continue
        direct, via = pair["direct"], pair["sidecar"]

        def ratio(a: float, b: float) -> str:
            return fmt(a / b, 2) if b > 0 and not math.isnan(a) else "-"

        rows.append(
            [
                variant.name,
                variant.about,
                ratio(via.load.rate, direct.load.rate),
                ratio(via.load.percentile(50), direct.load.percentile(50)),
                ratio(via.load.percentile(99), direct.load.percentile(99)),
                ms(via.load.percentile(50) - direct.load.percentile(50)),
                us(via.cpu["sidecar"]),
                us(via.own_time),
            ]
        )
    print_table(
        [
            "variant",
            "what",
            "req/s ratio",
            "p50 ratio",
            "p99 ratio",
            "p50 added ms",
            "sidecar CPU µs/req",
            "sidecar own µs/req",
        ],
        rows,
    )
    print()
    print(
        "req/s ratio < 1 means the sidecar costs throughput. 'sidecar CPU': the sidecar "
        "process's user+system CPU per request. 'own': its request_duration_seconds "
        "histogram, wall time minus time spent on the upstream (waiting for its answer and "
        "relaying a streamed body). On a 2-core machine "
        "the client, the sidecar and the upstream share the CPUs, so the sidecar's CPU is "
        "taken from the other two."
    )


def print_profiles(profile: Path, top: int) -> None:
    for prof in sorted(profile.glob("sidecar-*.prof")):
        print()
        print(f"## cProfile of {prof.name} (top {top} by own time)")
        print()
        print("```")
        stats = pstats.Stats(str(prof), stream=sys.stdout)
        stats.strip_dirs().sort_stats(pstats.SortKey.TIME).print_stats(top)
        print("```")


async def run(args: argparse.Namespace, workdir: Path) -> None:
    witness = CpuWitness()
    peers: dict[str, Peer] = {}
    try:
        for kind in dict.fromkeys(v.upstream for v in args.variants):
            upstream, url = start_upstream(kind, workdir)
            try:
                sidecar = start_proxy(kind, url, workdir, args.profile)
            except BaseException:
                upstream.stop()
                raise
            peers[kind] = Peer(upstream, url, sidecar)
            witness.watch(upstream.pid)
            witness.watch(sidecar.proc.pid)
        results: list[Measurement] = []
        for variant in args.variants:
            print(f"  running {variant.name} ...", file=sys.stderr, flush=True)
            results += await measure(variant, peers[variant.upstream], args)
        report(results)
        print()
        witness.report()
    finally:
        for peer in peers.values():
            # Stopped in a thread: the sidecar drains while this loop still owns sockets.
            await asyncio.to_thread(peer.sidecar.stop)
            await asyncio.to_thread(peer.upstream.stop)
    if args.profile is not None:
        print_profiles(args.profile, args.profile_top)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_header(
        "mcp-sidecar throughput: direct vs through the sidecar",
        {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "sessions": args.sessions,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
        },
    )
    return run_in_workdir(lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
