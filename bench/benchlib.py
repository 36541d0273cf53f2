"""Shared pieces of the benchmarks: a minimal MCP client, a bounded load loop, statistics,
process CPU accounting and plain-text tables.

Run the benchmarks as scripts from the repository root (`python bench/throughput.py`): this
module is imported as a sibling (`import benchlib`), and it puts the repository root on
`sys.path` so the benchmarks can reuse `tests/peers/processes.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HOST = "127.0.0.1"

from sidecar.app import Service, build_proxy_app  # noqa: E402
from sidecar.config import load_settings  # noqa: E402
from tests.peers.processes import ManagedProcess, free_ports  # noqa: E402 - needs sys.path

SESSION_HEADER = "Mcp-Session-Id"
PROTOCOL_HEADER = "MCP-Protocol-Version"
MODE_HEADER = "X-Bench-Response"  # fast_upstream.py: json or sse answers for this session
PROTOCOL_VERSION = "2025-06-18"
ACCEPT = "application/json, text/event-stream"
REQUEST_TIMEOUT = 30.0
BUSY_WARNING = 0.10  # warn when other processes use more than this share of the CPUs

# What one load request sends: a `ping` (the cheapest MCP request) or a `tools/call`.
KINDS = ("ping", "echo", "add")


class BenchError(RuntimeError):
    """A benchmark could not run as set up (a peer did not answer as an MCP server should)."""


# ---- a minimal MCP client ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class McpSession:
    """An initialized session: where to post and the headers every later request carries."""

    url: str
    session_id: str
    headers: dict[str, str]


def _first_jsonrpc(content_type: str, text: str) -> dict[str, Any]:
    """The JSON-RPC message of a JSON body, or of the first `data:` event of an SSE body."""
    if content_type.startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data:"):
                value: dict[str, Any] = json.loads(line[5:].strip())
                return value
        raise BenchError(f"SSE answer without a data line: {text[:200]!r}")
    value = json.loads(text)
    if not isinstance(value, dict):
        raise BenchError(f"unexpected JSON-RPC answer: {text[:200]!r}")
    return value


async def initialize(
    client: aiohttp.ClientSession, url: str, *, mode: str | None = None
) -> McpSession:
    """`initialize`, then `notifications/initialized`: a session ready for requests."""
    headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
    if mode is not None:
        headers[MODE_HEADER] = mode
    body = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "mcp-sidecar-bench", "version": "1"},
        },
    }
    async with client.post(url, data=json.dumps(body).encode(), headers=headers) as response:
        text = await response.text()
        session_id = response.headers.get(SESSION_HEADER)
        if response.status != 200 or session_id is None:
            raise BenchError(
                f"initialize at {url} answered {response.status} "
                f"(session id {'present' if session_id else 'missing'}): {text[:300]}"
            )
        answer = _first_jsonrpc(response.headers.get("Content-Type", ""), text)
    version = str(answer.get("result", {}).get("protocolVersion", PROTOCOL_VERSION))
    session_headers = {**headers, SESSION_HEADER: session_id, PROTOCOL_HEADER: version}
    session_headers.pop(MODE_HEADER, None)
    notification = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
    async with client.post(url, data=notification, headers=session_headers) as response:
        await response.read()
        if not 200 <= response.status < 300:  # 202 from an SDK server, 200 from a canned one
            raise BenchError(f"notifications/initialized at {url} answered {response.status}")
    return McpSession(url, session_id, session_headers)


async def close_session(client: aiohttp.ClientSession, session: McpSession) -> None:
    """DELETE the session (so a FastMCP upstream frees it); errors do not matter here."""
    try:
        async with client.delete(session.url, headers=session.headers) as response:
            await response.read()
    except aiohttp.ClientError:
        pass


def request_body(kind: str, request_id: int) -> bytes:
    if kind == "ping":
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": "ping"}
    elif kind == "echo":
        message = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": f"hello {request_id}"}},
        }
    elif kind == "add":
        message = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": "add", "arguments": {"a": request_id, "b": 1}},
        }
    else:
        raise ValueError(f"unknown request kind {kind!r}; one of {', '.join(KINDS)}")
    return json.dumps(message, separators=(",", ":")).encode()


def client_session(concurrency: int) -> aiohttp.ClientSession:
    """A pooled client with one connection per worker, as a real multi-session client has."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
    )


# ---- the bounded load loop -----------------------------------------------------------------


@dataclass(slots=True)
class LoadResult:
    requests: int = 0  # answered with a JSON-RPC result
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str | None = None
    stopped_by_time: bool = False

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: LoadResult) -> None:
        """Fold another run of the same load into this one (rounds of one measurement)."""
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.first_error = self.first_error or other.first_error
        self.stopped_by_time = self.stopped_by_time or other.stopped_by_time

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies, in seconds."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1]


async def run_load(
    client: aiohttp.ClientSession,
    sessions: Sequence[McpSession],
    kind: str,
    *,
    requests: int,
    concurrency: int,
    max_seconds: float,
    first_id: int = 1,
) -> LoadResult:
    """Send `requests` POSTs from `concurrency` workers, round-robin over `sessions`.

    Bounded twice: by count, and by `max_seconds` (workers stop taking new requests then).
    A request succeeds when it is answered 200 with a JSON-RPC `result` (JSON or SSE body).
    """
    if not sessions:
        raise BenchError("no sessions to send requests on")
    result = LoadResult()
    bodies = [request_body(kind, first_id + i) for i in range(requests)]
    taken = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker() -> None:
        nonlocal taken
        while taken < requests:
            if time.perf_counter() > deadline:
                result.stopped_by_time = True
                return
            index = taken
            taken += 1
            session = sessions[index % len(sessions)]
            sent = time.perf_counter()
            try:
                async with client.post(
                    session.url, data=bodies[index], headers=session.headers
                ) as response:
                    payload = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.errors += 1
                result.first_error = result.first_error or repr(exc)
                continue
            if status == 200 and b'"result"' in payload:
                result.requests += 1
                result.latencies.append(time.perf_counter() - sent)
            else:
                result.errors += 1
                result.first_error = result.first_error or f"{status}: {payload[:200]!r}"

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


# ---- CPU accounting and the sidecar's own metrics ------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (Linux /proc); this process when pid is None."""
    if pid is None:
        return time.process_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat.rpartition(")")[2].split()
    # fields[0] is the state (field 3 of stat(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


async def metric_sum_count(
    client: aiohttp.ClientSession, admin_url: str, name: str
) -> tuple[float, float]:
    """`<name>_sum` and `<name>_count` of a histogram on the sidecar's /metrics."""
    async with client.get(admin_url + "/metrics") as response:
        text = await response.text()
    values = {"sum": math.nan, "count": math.nan}
    for line in text.splitlines():
        for suffix in values:
            if line.startswith(f"{name}_{suffix} "):
                values[suffix] = float(line.split()[1])
    return values["sum"], values["count"]


# ---- reporting -----------------------------------------------------------------------------


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table (readable in a terminal, pasteable into the README)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    left = {0, 1}

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    print(line(headers))
    print(
        "|"
        + "|".join(
            ("-" * (w + 2)) if i in left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
        )
        + "|"
    )
    for row in rows:
        print(line(row))


def machine_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (from /proc/stat), before the benchmark starts."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total_0, idle_0 = sample()
        time.sleep(seconds)
        total_1, idle_1 = sample()
    except (OSError, ValueError, IndexError):
        return math.nan
    total = total_1 - total_0
    return 1 - (idle_1 - idle_0) / total if total > 0 else math.nan


def machine_cpu_seconds() -> float:
    """CPU time all processes spent in user and system mode so far (/proc/stat, all CPUs)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(v) for v in stat.readline().split()[1:4]]  # user, nice, system
    except (OSError, ValueError):
        return math.nan
    return sum(values) / _CLOCK_TICKS


class CpuWitness:
    """How much CPU other processes took while the benchmark ran: the noise indicator.

    Machine-wide user+system CPU minus what this process and `pids` (the peers it started)
    used over the same span.
    """

    def __init__(self) -> None:
        self._machine = machine_cpu_seconds()
        self._wall = time.perf_counter()
        self._ours: dict[int | None, float] = {None: process_cpu_seconds(None)}

    def watch(self, pid: int) -> None:
        """Count a peer's CPU: one started after this witness, so all of its CPU time."""
        self._ours[pid] = 0.0

    def report(self) -> None:
        machine = machine_cpu_seconds() - self._machine
        ours = sum(process_cpu_seconds(pid) - spent for pid, spent in self._ours.items())
        wall = time.perf_counter() - self._wall
        others = max(0.0, machine - ours)
        capacity = wall * (os.cpu_count() or 1)
        share = others / capacity if capacity > 0 else math.nan
        print(
            f"CPU used by other processes during the run: {fmt(others, 1)} s "
            f"({fmt(share * 100, 0)}% of the machine over {fmt(wall, 0)} s)"
        )
        if share > BUSY_WARNING / 2:
            print("WARNING: the machine was not quiet; rerun for numbers to compare with.")


def sidecar_revision() -> str:
    """The commit measured, and whether sidecar/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "sidecar"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes in sidecar/" if dirty else "")


def start_upstream(kind: str, workdir: Path) -> tuple[ManagedProcess, str]:
    """The FastMCP test server (`kind == "fastmcp"`) or `fast_upstream.py`; (process, URL)."""
    (port,) = free_ports(1)
    if kind == "fastmcp":
        # No --log: the test suite's JSONL request log would add a file write per request.
        args = [sys.executable, "-m", "tests.peers.upstream_server", "--port", str(port)]
    else:
        args = [sys.executable, str(REPO_ROOT / "bench" / "fast_upstream.py"), "--port", str(port)]
    process = ManagedProcess(args, log_path=workdir / f"upstream-{kind}.log", name=kind)
    process.start()
    try:
        process.wait_port(HOST, port)
    except BaseException:
        process.stop()
        raise
    return process, f"http://{HOST}:{port}/mcp"


@dataclass
class InProcessSidecar:
    """A sidecar running in the benchmark's own event loop."""

    url: str  # its MCP endpoint
    service: Service  # its store, manager and metrics, for the benchmark to read


@contextlib.asynccontextmanager
async def in_process_sidecar(
    upstream_url: str, store: dict[str, Any]
) -> AsyncIterator[InProcessSidecar]:
    """A sidecar on free ports in front of `upstream_url` with this `store` section, served
    by an aiohttp `AppRunner` in this event loop (no process of its own to measure around);
    stopped on exit, which flushes and closes its store."""
    listen, admin = free_ports(2)
    settings = load_settings(
        None,
        environ={},
        overrides={
            "server": {"listen": f"{HOST}:{listen}"},
            "upstream": {"url": upstream_url},
            "store": store,
            "admin": {"listen": f"{HOST}:{admin}"},
            "log": {"level": "warning"},
        },
    )
    service = Service(settings)
    runner = web.AppRunner(build_proxy_app(service), access_log=None, handle_signals=False)
    await runner.setup()  # opens the store and starts the flusher (cleanup_ctx)
    try:
        await web.TCPSite(runner, HOST, listen).start()
        yield InProcessSidecar(f"http://{HOST}:{listen}/mcp", service)
    finally:
        await runner.cleanup()  # stops the service: final flush, store closed


def run_in_workdir(main: Callable[[Path], Coroutine[Any, Any, None]]) -> int:
    """Run a benchmark on uvloop in a temporary directory; on failure show the processes'
    logs from it and return 1."""
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-bench-") as tmp:
        try:
            uvloop.run(main(Path(tmp)))
        except (BenchError, OSError, RuntimeError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            for log in sorted(Path(tmp).rglob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
            return 1
    return 0


def print_header(title: str, settings: dict[str, Any]) -> None:
    print(f"# {title}")
    print()
    print(f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}"
    )
    print(f"sidecar: git {sidecar_revision()}")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    busy = machine_busy()
    print(f"CPU busy before start: {fmt(busy * 100, 0)}%")
    if busy > BUSY_WARNING:
        print(
            "WARNING: other processes are using the CPUs; on a small machine the numbers "
            "below are skewed (ratios and CPU per request less so than req/s)"
        )
    print()
