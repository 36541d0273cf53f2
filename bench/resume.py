"""What hibernation costs and saves (SPEC 2.7, `sessions.idle_action = "hibernate"`).

1. **Resume latency.** The real FastMCP test server (`tests.peers.upstream_server`,
   Streamable HTTP) and a real sidecar process (`idle_action = "hibernate"`, a short
   `idle_timeout` and `sweep_interval`). N sessions are opened through the sidecar with raw
   httpx requests (`initialize`, `notifications/initialized`, as
   `tests/peers/mcp_clients.RawSession` does) and N directly on the upstream, each gets one
   `tools/call echo`; once the admin API shows every sidecar session `dormant` (and the
   upstream's own session table shows their upstream sessions gone), one call per session is
   timed: the call that wakes it (replayed initialize + notifications/initialized, rebind,
   then the call), a second call on the now live session, and the same call on a direct
   session. Calls are sequential (concurrency 1), interleaved per session so drift hits all
   three alike.

2. **Memory per session**, in this process's children (a fresh interpreter per figure): a
   `SessionManager` over a `MemoryStore`, a closer stub that drops the DELETEs it is handed,
   `--count` sessions created through `manager.create(...)` with realistic fields; measured
   live and idle, then after `manager.hibernate_many(...)`. tracemalloc gives exact bytes
   (and, by dropping the store's copies afterwards, the manager's own share); RSS from
   /proc/self/statm (in a run without tracemalloc) is the coarse second figure.

Run from the repository root: `.venv/bin/python bench/resume.py [--sessions N] [--count M]`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httpx
from benchlib import (
    REPO_ROOT,
    BenchError,
    CpuWitness,
    fmt,
    print_header,
    print_table,
    run_in_workdir,
    start_upstream,
)

from sidecar.closer import UpstreamCloser
from sidecar.manager import Limits, SessionManager
from sidecar.metrics import Metrics
from sidecar.sessions import Policy, Transport
from sidecar.store.memory import MemoryStore
from sidecar.transports.resume import initial_resume_state
from tests.peers.mcp_clients import HTTP_TIMEOUT, RawSession, rpc_messages
from tests.peers.processes import SidecarHandle, start_sidecar

METRIC_PREFIX = "mcp_sidecar_"
RESUMED_LINE = re.compile(r"resumed session \S+ cause=(\S+) upstream=\S+ took=([0-9.]+)ms")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# How long waiting for the sweeper, the closer or a reload may take beyond what it should.
WAIT_MARGIN = 15.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Resume latency (real FastMCP + sidecar) and memory per live/dormant session."
    )
    parser.add_argument(
        "--sessions", type=int, default=50, help="sessions woken in the latency run (50)"
    )
    parser.add_argument(
        "--count", type=int, default=10_000, help="sessions in each memory measurement (10000)"
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=1.0, help="sidecar sessions.idle_timeout, s (1)"
    )
    parser.add_argument(
        "--sweep-interval", type=float, default=0.5, help="sidecar sessions.sweep_interval, s (0.5)"
    )
    parser.add_argument(
        "--keep-short-timeout",
        action="store_true",
        help="do not raise idle_timeout (SIGHUP reload) once all sessions are dormant; woken "
        "sessions are then hibernated again while later ones are being timed",
    )
    parser.add_argument("--skip-latency", action="store_true", help="only the memory part")
    parser.add_argument("--skip-memory", action="store_true", help="only the latency part")
    # Internal: one memory measurement in a fresh interpreter, printed as JSON.
    parser.add_argument(
        "--memory-trial", choices=("live", "dormant", "live-noresume"), help=argparse.SUPPRESS
    )
    parser.add_argument("--memory-mode", choices=("traced", "rss"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.count < 1:
        parser.error("--sessions and --count must be >= 1")
    if args.idle_timeout <= 0 or args.sweep_interval <= 0:
        parser.error("--idle-timeout and --sweep-interval must be > 0")
    return args


# ---- statistics --------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (with 50 values, p99 is the largest)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return fmt(seconds * 1000, 2)


# ---- part 1: resume latency ----------------------------------------------------------------


@dataclass(slots=True)
class Timings:
    """Seconds per call, by session index; failures as (session index, description)."""

    seconds: dict[int, float] = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)


@dataclass(slots=True)
class LatencyResult:
    sessions: int
    wake: Timings
    warm: Timings
    direct: Timings
    resume_took_ms: list[float]
    dormant_after: float  # seconds from the last call until every session was dormant
    upstream_counts: dict[str, int]
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    states_after: Counter[str]
    reloaded: bool
    log_problems: list[str]


async def timed_call(raw: RawSession, text: str) -> tuple[float, str | None]:
    """One `tools/call echo`; (seconds, None) on a correct result, else a description."""
    start = time.perf_counter()
    try:
        response = await raw.call("echo", {"text": text})
    except httpx.HTTPError as exc:
        return time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        return elapsed, f"HTTP {response.status_code}: {response.text[:400]}"
    try:
        answers = [m for m in rpc_messages(response) if "result" in m or "error" in m]
        content = answers[0]["result"]["content"][0]["text"] if len(answers) == 1 else None
    except (KeyError, IndexError, TypeError, ValueError):
        content = None
    if content != text:
        return elapsed, f"HTTP 200 but not the echo of {text!r}: {response.text[:400]}"
    return elapsed, None


async def open_session(http: httpx.AsyncClient, url: str, name: str) -> RawSession:
    raw = RawSession(http, url)
    response = await raw.initialize(name)
    if response.status_code != 200 or raw.session_id is None:
        raise BenchError(f"initialize at {url} answered {response.status_code}: {response.text}")
    _, problem = await timed_call(raw, "first call")
    if problem is not None:
        raise BenchError(f"first echo on a new session at {url}: {problem}")
    return raw


async def open_sessions(
    http: httpx.AsyncClient, url: str, name: str, count: int, parallel: int = 8
) -> list[RawSession]:
    slots = asyncio.Semaphore(parallel)

    async def one(i: int) -> RawSession:
        async with slots:
            return await open_session(http, url, f"{name}-{i}")

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def upstream_session_count(probe: RawSession) -> int:
    """How many sessions the FastMCP upstream holds (its `live_sessions` tool)."""
    return int(await probe.call_text("live_sessions"))


async def wait_upstream_count(probe: RawSession, expected: int, within: float) -> int:
    deadline = time.monotonic() + within
    while True:
        count = await upstream_session_count(probe)
        if count == expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.1)


async def session_states(
    admin: httpx.AsyncClient, admin_url: str, ids: Sequence[str]
) -> Counter[str]:
    states: Counter[str] = Counter()
    for session_id in ids:
        response = await admin.get(f"{admin_url}/sessions/{session_id}")
        if response.status_code != 200:
            states[f"HTTP {response.status_code}"] += 1
        else:
            states[str(response.json().get("state"))] += 1
    return states


async def metrics(admin: httpx.AsyncClient, admin_url: str) -> dict[str, float]:
    """The sidecar's session counters, by sample name with labels (prefix removed)."""
    text = (await admin.get(admin_url + "/metrics")).text
    wanted = (
        "sessions_created_total",
        "sessions_hibernated_total",
        "sessions_resumed_total",
        "resume_failures_total",
        "sessions_closed_total",
        "upstream_close_total",
    )
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(METRIC_PREFIX):
            continue
        name, _, value = line.rpartition(" ")
        name = name.removeprefix(METRIC_PREFIX)
        if name.split("{", 1)[0] in wanted:
            values[name] = float(value)
    return values


def wait_for_log(handle: SidecarHandle, needle: str, count: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if handle.output().count(needle) >= count:
            return True
        time.sleep(0.05)
    return False


def log_problems(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if any(word in line for word in ("WARNING", "ERROR", "Traceback", "CRITICAL"))
    ]


async def measure_latency(
    args: argparse.Namespace,
    sidecar: SidecarHandle,
    upstream_url: str,
) -> LatencyResult:
    n = args.sessions
    async with (
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as via_http,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as direct_http,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as admin,
    ):
        probe = await open_session(direct_http, upstream_url, "resume-bench-probe")
        counts: dict[str, int] = {"before any": await upstream_session_count(probe)}
        # Direct sessions first; the sidecar's ones last and 8 at a time, so that none goes
        # dormant (idle_timeout) before the last one is open.
        direct = await open_sessions(direct_http, upstream_url, "resume-bench-direct", n)
        via = await open_sessions(via_http, sidecar.url, "resume-bench", n)
        last_call = time.monotonic()
        counts[
            "right after opening (early ones may be dormant already)"
        ] = await upstream_session_count(probe)
        ids = [cast(str, raw.session_id) for raw in via]

        # Every sidecar session dormant, as the admin API shows it.
        deadline = last_call + args.idle_timeout + args.sweep_interval + WAIT_MARGIN
        while True:
            states = await session_states(admin, sidecar.admin_url, ids)
            if states.get("dormant", 0) == n:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"sessions never all went dormant: states {dict(states)} after "
                    f"{time.monotonic() - last_call:.1f}s (idle_timeout {args.idle_timeout}s); "
                    f"sidecar log tail:\n{sidecar.output()[-3000:]}"
                )
            await asyncio.sleep(0.1)
        dormant_after = time.monotonic() - last_call
        # Hibernation frees the upstream session: the closer's DELETEs, sent in the background.
        baseline = counts["before any"]
        counts["all dormant"] = await wait_upstream_count(probe, baseline + n, WAIT_MARGIN)

        reloaded = False
        if not args.keep_short_timeout:
            # A woken session would be hibernated again idle_timeout later, while later
            # sessions are being timed; a longer timeout keeps the sweeper out of the way.
            needle = "reloaded configuration"
            before = sidecar.output().count(needle)
            await asyncio.to_thread(sidecar.reload, sessions={"idle_timeout": 3600})
            reloaded = await asyncio.to_thread(wait_for_log, sidecar, needle, before + 1, 10.0)
            if not reloaded:
                print("  ! the sidecar did not log a reload; timing anyway", file=sys.stderr)

        metrics_before = await metrics(admin, sidecar.admin_url)
        wake, warm, straight = Timings(), Timings(), Timings()
        for i in range(n):
            for timings, raw, text in (
                (wake, via[i], f"wake {i}"),
                (warm, via[i], f"warm {i}"),
                (straight, direct[i], f"direct {i}"),
            ):
                elapsed, problem = await timed_call(raw, text)
                if problem is None:
                    timings.seconds[i] = elapsed
                else:
                    timings.failures.append((i, problem))
        metrics_after = await metrics(admin, sidecar.admin_url)
        states_after = await session_states(admin, sidecar.admin_url, ids)
        counts["after waking"] = await upstream_session_count(probe)

    output = sidecar.output()
    took = [float(m.group(2)) for m in RESUMED_LINE.finditer(output) if m.group(1) == "hibernated"]
    return LatencyResult(
        sessions=n,
        wake=wake,
        warm=warm,
        direct=straight,
        resume_took_ms=took,
        dormant_after=dormant_after,
        upstream_counts=counts,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        states_after=states_after,
        reloaded=reloaded,
        log_problems=log_problems(output),
    )


def report_latency(result: LatencyResult, args: argparse.Namespace) -> None:
    print("## Resume latency (FastMCP upstream, Streamable HTTP, concurrency 1)")
    print()
    rows = []
    for label, timings in (
        ("waking call (resume + call) via sidecar", result.wake),
        ("warm call, same session, via sidecar", result.warm),
        ("direct call to the upstream", result.direct),
    ):
        values = list(timings.seconds.values())
        rows.append(
            [
                label,
                str(len(values)),
                str(len(timings.failures)),
                ms(percentile(values, 50)),
                ms(percentile(values, 99)),
                ms(sum(values) / len(values)) if values else "-",
                ms(max(values)) if values else "-",
            ]
        )
    paired = [
        result.wake.seconds[i] - result.warm.seconds[i]
        for i in result.wake.seconds
        if i in result.warm.seconds
    ]
    rows.append(
        [
            "added by the resume (waking - warm, per session)",
            str(len(paired)),
            "-",
            ms(percentile(paired, 50)),
            ms(percentile(paired, 99)),
            ms(sum(paired) / len(paired)) if paired else "-",
            ms(max(paired)) if paired else "-",
        ]
    )
    took = [t / 1000 for t in result.resume_took_ms]
    rows.append(
        [
            "sidecar's own 'resumed ... took=' (log)",
            str(len(took)),
            "-",
            ms(percentile(took, 50)),
            ms(percentile(took, 99)),
            ms(sum(took) / len(took)) if took else "-",
            ms(max(took)) if took else "-",
        ]
    )
    print_table(["what", "n", "failed", "p50 ms", "p99 ms", "mean ms", "max ms"], rows)
    print()
    print(
        f"p99 is nearest-rank: with {result.sessions} sessions it is the "
        f"{'largest value' if result.sessions < 100 else f'{math.ceil(0.99 * result.sessions)}th'}"
        f". 'took=' is the sidecar's log of the resume alone (replayed initialize + "
        f"notifications/initialized + store rebind), without the forwarded call."
    )
    print()
    print(
        f"sessions all dormant {fmt(result.dormant_after, 2)} s after their last call "
        f"(idle_timeout {args.idle_timeout} s, sweep_interval {args.sweep_interval} s); "
        f"idle_timeout raised to 3600 s by SIGHUP before timing: "
        f"{'yes' if result.reloaded else 'no'}"
    )
    counts = ", ".join(f"{k}: {v}" for k, v in result.upstream_counts.items())
    print(
        f"upstream's own session table (incl. 1 probe and {result.sessions} direct "
        f"sessions): {counts}"
    )
    delta = {
        k: v - result.metrics_before.get(k, 0.0)
        for k, v in result.metrics_after.items()
        if v != result.metrics_before.get(k, 0.0)
    }
    print(
        "sidecar counters during the timed calls: "
        + (", ".join(f"{k} +{v:g}" for k, v in sorted(delta.items())) or "no change")
    )
    print(f"session states after: {dict(result.states_after)}")
    for label, timings in (
        ("waking", result.wake),
        ("warm", result.warm),
        ("direct", result.direct),
    ):
        for index, problem in timings.failures[:5]:
            print(f"FAILED {label} call, session {index}: {problem}")
    if result.log_problems:
        print(f"sidecar log: {len(result.log_problems)} WARNING/ERROR lines, first ones:")
        for line in result.log_problems[:10]:
            print(f"    {line}")
    print()


async def run_latency(args: argparse.Namespace, workdir: Path, witness: CpuWitness) -> None:
    upstream, upstream_url = start_upstream("fastmcp", workdir)
    sidecar: SidecarHandle | None = None
    try:
        sidecar = start_sidecar(
            workdir,
            upstream_url,
            log={"level": "info"},
            sessions={
                "idle_timeout": args.idle_timeout,
                "sweep_interval": args.sweep_interval,
                "idle_action": "hibernate",
            },
        )
        witness.watch(upstream.pid)
        witness.watch(sidecar.proc.pid)
        print("  running the latency part ...", file=sys.stderr, flush=True)
        result = await measure_latency(args, sidecar, upstream_url)
        report_latency(result, args)
        witness.report()  # while the peers run: a stopped one's CPU time can't be read
        print()
    finally:
        if sidecar is not None:
            await asyncio.to_thread(sidecar.stop)
        await asyncio.to_thread(upstream.stop)


# ---- part 2: memory per session ----------------------------------------------------------

INITIALIZE_BODY = json.dumps(
    {
        "protocolVersion": "2025-06-18",
        "capabilities": {
            "roots": {"listChanged": True},
            "sampling": {},
            "elicitation": {},
        },
        "clientInfo": {"name": "client", "title": "Client IDE", "version": "1.0"},
    }
).encode()
USER_AGENT = b"my-ide/1.42.0 python-httpx/0.28.1"  # 33 characters
CLIENTS = 100  # distinct client identities the sessions are spread over


class DroppingCloser:
    """Stands in for `UpstreamCloser`: counts the DELETEs owed and keeps nothing."""

    def __init__(self) -> None:
        self.scheduled = 0

    def schedule(self, pending: object, credentials: Mapping[str, str]) -> None:
        self.scheduled += 1


def reading(traced: bool) -> int:
    gc.collect()
    if traced:
        return tracemalloc.get_traced_memory()[0]
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


async def memory_trial(kind: str, count: int, traced: bool) -> dict[str, float]:
    """Heap (or RSS) growth after creating `count` sessions, and hibernating them for
    "dormant"; then after dropping the MemoryStore's owed DELETEs and its record copies."""
    logging.getLogger("sidecar").setLevel(logging.WARNING)
    if traced:
        tracemalloc.start()
    store = MemoryStore()
    closer = DroppingCloser()
    manager = SessionManager(
        store,
        cast(UpstreamCloser, closer),
        Metrics(),
        policy=Policy(idle_timeout=1800.0, idle_action="hibernate"),
        limits=Limits(),
        tombstone_ttl=7 * 86400.0,
    )
    identities = [
        "auth:" + hashlib.sha256(f"Bearer token-{i}".encode()).hexdigest()[:32]
        for i in range(CLIENTS)
    ]
    results: dict[str, float] = {}
    start = reading(traced)
    for i in range(count):
        # Fresh objects per session, as parsing each client's request makes them.
        params = json.loads(INITIALIZE_BODY)
        info = params["clientInfo"]
        await manager.create(
            uuid.uuid4().hex,  # FastMCP's session id form
            Transport.STREAMABLE_HTTP,
            identities[i % CLIENTS],
            protocol_version=str(params["protocolVersion"]),
            user_agent=USER_AGENT.decode(),
            client_info=f"{info['name']} {info['version']}",
            credentials={},
            resume=None if kind == "live-noresume" else initial_resume_state(params),
            upstream="",
        )
        del params, info
    if kind == "dormant":
        results["live_total"] = reading(traced) - start
        await manager.hibernate_many(list(manager.live.values()))
        if len(manager.dormant) != count or manager.live:
            raise BenchError(f"hibernated {len(manager.dormant)} of {count} sessions")
    results["total"] = reading(traced) - start
    # The DELETEs the store recorded as owed (a real closer drops each once it is sent), then
    # the store's record copies. Strings shared with the manager's sessions stay allocated,
    # so they count as the manager's.
    results["owed_deletes"] = float(len(store.pending))
    store.pending.clear()
    results["without_owed"] = reading(traced) - start
    store.sessions.clear()
    results["manager"] = reading(traced) - start
    results["closes_scheduled"] = closer.scheduled
    results["sessions_held"] = len(manager.live) + len(manager.dormant)
    return results


def run_memory_child(kind: str, mode: str, count: int) -> dict[str, float]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-trial",
        kind,
        "--memory-mode",
        mode,
        "--count",
        str(count),
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"memory trial {kind}/{mode} failed ({done.returncode}): {done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


MEMORY_KINDS = {
    "live": "live, idle",
    "dormant": "dormant",
    "live-noresume": "live, idle, resume=None (reference)",
}


def report_memory(count: int) -> None:
    print(f"## Memory per session ({count:,} sessions, in-process SessionManager + MemoryStore)")
    print()
    traced = {kind: run_memory_child(kind, "traced", count) for kind in MEMORY_KINDS}
    rss = {kind: run_memory_child(kind, "rss", count) for kind in ("live", "dormant")}

    def per(value: float) -> str:
        return fmt(round(value / count) + 0.0, 0)

    rows = []
    for kind, label in MEMORY_KINDS.items():
        t = traced[kind]
        rows.append(
            [
                label,
                "tracemalloc",
                per(t["total"]),
                per(t["total"] - t["without_owed"]),
                per(t["without_owed"] - t["manager"]),
                per(t["manager"]),
            ]
        )
    for kind in ("live", "dormant"):
        label = MEMORY_KINDS[kind] + (" (after being live)" if kind == "dormant" else "")
        rows.append([label, "RSS", per(rss[kind]["total"]), "-", "-", "-"])
    print_table(
        [
            "session",
            "measure",
            "all B/session",
            "store: owed DELETEs",
            "store: record copies",
            "manager's own",
        ],
        rows,
    )
    print()
    dormant = traced["dormant"]
    print(
        "Method: each row comes from a fresh interpreter. tracemalloc counts the Python heap "
        "allocated after the manager was built (gc.collect() before each reading): 'all' "
        "right after creating the sessions through manager.create() (live) or after "
        "hibernate_many() of all of them (dormant). Then the MemoryStore's owed-DELETE "
        "records are dropped (a real closer drops each once the DELETE is answered; the "
        "closer stub here keeps nothing), then its deep copies of the records: what is left "
        "is the manager's own (live dict or dormant set, Session, Binding, ResumeState, "
        "strings; strings shared with the store's copies count here). RSS is "
        "/proc/self/statm resident pages in runs without tracemalloc, manager + store; after "
        "hibernation it includes what the allocator kept from the live phase. "
        f"The hibernation scheduled {dormant['closes_scheduled']:,.0f} DELETEs; 'all' for "
        f"those sessions while still live was {per(dormant['live_total'])} B/session."
    )
    print()


# ---- main --------------------------------------------------------------------------------


async def run(args: argparse.Namespace, workdir: Path) -> None:
    if not args.skip_latency:
        await run_latency(args, workdir, CpuWitness())
    if not args.skip_memory:
        # Memory figures do not depend on how busy the CPUs are: no witness here.
        print("  running the memory part ...", file=sys.stderr, flush=True)
        await asyncio.to_thread(report_memory, args.count)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_trial is not None:
        traced = args.memory_mode != "rss"
        result = asyncio.run(memory_trial(args.memory_trial, args.count, traced))
        print(json.dumps(result))
        return 0
    print_header(
        "mcp-sidecar resume: latency of the waking call, memory per live and dormant session",
        {
            "sessions": args.sessions,
            "count": args.count,
            "idle_timeout": args.idle_timeout,
            "sweep_interval": args.sweep_interval,
            "keep_short_timeout": args.keep_short_timeout,
        },
    )
    return run_in_workdir(lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
