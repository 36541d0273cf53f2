"""Scale: what many sessions cost the sidecar, and whether its event loop stays smooth.

Sessions are created through the real path (`initialize` + `notifications/initialized`
through the sidecar to `fast_upstream.py`); the sidecar runs as `scale_host.py`, the real
server on a clock this script moves forward, so expiry happens exactly when it says:

1. create N sessions (1% first, then the clock moves 600 s, then the rest): creation rate,
   RSS per live idle session;
2. sweeps with nothing expired, then with the first 1% expired: sweep time (from the
   sidecar's own `sweep_duration_seconds`) and the closes' DELETE rate;
3. an activity burst (one ping per session): flush time;
4. restart: restore time (process start to port open), RSS per restored session;
5. restart with every session expired while stopped: port-open time, the first expired id's
   answer, the DELETE rate of the closes that follows;
6. N new sessions expiring at once while serving: DELETE rate;
7. with `idle_action = "hibernate"`: N sessions hibernated at once, then a restart: RSS per
   dormant session.

Throughout, a probe sends a ping every 20 ms on a session of its own (pinned persistent, so
the moving clock never expires it) and reports the max and p99 latency per phase: a stall of
the sidecar's event loop shows up there.

    python bench/scale.py                   # 10,000 sessions
    python bench/scale.py --sessions 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import benchlib
from benchlib import HOST, McpSession, fmt, print_header, print_table

from tests.peers.processes import ManagedProcess, free_ports, port_open, to_toml

IDLE_TIMEOUT = 3600.0
EARLY_SHIFT = 600.0  # clock move between the first 1% and the rest of the sessions
PROBE_EVERY = 0.020
CONCURRENCY = 64
METRICS_POLL = 0.2
CLOSE_WAIT = 900.0  # the longest wait for owed DELETEs to drain
PREFIX = "mcp_sidecar_"


# ---- the sidecar under test ------------------------------------------------------------------


class Host:
    """`scale_host.py` with its config, database and clock offset; restartable."""

    def __init__(self, workdir: Path, upstream_url: str, name: str, idle_action: str) -> None:
        self.dir = workdir / name
        self.dir.mkdir()
        self.port, self.admin_port = free_ports(2)
        self.skew_file = self.dir / "skew.txt"
        self.offset = 0.0
        self.skew_file.write_text("0")
        config = {
            "server": {"listen": f"{HOST}:{self.port}"},
            "upstream": {"url": upstream_url},
            "store": {"path": str(self.dir / "sessions.db"), "flush_interval": "1s"},
            "admin": {"listen": f"{HOST}:{self.admin_port}"},
            "sessions": {
                "idle_timeout": f"{int(IDLE_TIMEOUT)}s",
                "sweep_interval": "1s",
                "tombstone_ttl": "30d",
                "idle_action": idle_action,
                "dormant_ttl": "30d",
            },
            "log": {"level": "info"},
        }
        self.config_path = self.dir / "config.toml"
        self.config_path.write_text(to_toml(config), encoding="utf-8")
        self.process: ManagedProcess | None = None
        self.runs = 0
        self.started_for = 0.0  # seconds from the last start to the port accepting

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/mcp"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> float:
        """Start and return the seconds until the proxy port accepts connections."""
        self.runs += 1
        args = [
            sys.executable,
            str(Path(__file__).with_name("scale_host.py")),
            "--config",
            str(self.config_path),
            "--skew-file",
            str(self.skew_file),
        ]
        self.process = ManagedProcess(
            args, log_path=self.dir / f"sidecar-{self.runs}.log", name=f"sidecar:{self.port}"
        )
        started = time.perf_counter()
        self.process.start()
        while not port_open(HOST, self.port):
            if not self.process.running:
                raise benchlib.BenchError(f"sidecar exited: {self.process.output()[-2000:]}")
            await asyncio.sleep(0.005)
        self.started_for = time.perf_counter() - started
        return self.started_for

    async def restored(self) -> float:
        """Seconds since the start until the sessions are all read back: the port opens
        before that, and `/readyz` says `restoring` until then."""
        started = time.perf_counter() - self.started_for
        async with aiohttp.ClientSession() as client:
            while True:
                async with client.get(self.admin_url + "/readyz") as response:
                    if not (await response.json()).get("restoring"):
                        return time.perf_counter() - started
                await asyncio.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate(timeout=120)
            self.process = None

    def move_clock(self, seconds: float) -> None:
        self.offset += seconds
        self.skew_file.write_text(repr(self.offset))
        if self.process is not None:
            self.process.send_signal(signal.SIGUSR1)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


# ---- metrics ---------------------------------------------------------------------------------


async def scrape(client: aiohttp.ClientSession, host: Host) -> dict[str, float]:
    """Every sample of /metrics, labelled series summed under their bare name."""
    async with client.get(host.admin_url + "/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        bare = name.partition("{")[0]
        values[bare] = values.get(bare, 0.0) + float(value)
    return values


@dataclass(slots=True)
class Watch:
    """Per-sweep and per-flush durations and upstream closes, sampled while a phase runs."""

    sweeps: list[float] = field(default_factory=list)
    flushes: list[float] = field(default_factory=list)
    closes: list[tuple[float, float]] = field(default_factory=list)  # (time, total so far)

    def delete_rate(self, count: int, base: float) -> float:
        """DELETEs per second from the first close after `base` (the counter's value before
        the phase) to the one that reached `base + count`."""
        moving = [(t, n - base) for t, n in self.closes]
        start = next((t for t, n in moving if n > 0), None)
        end = next((t for t, n in moving if n >= count), None)
        if start is None or end is None or end <= start:
            return math.nan
        return count / (end - start + METRICS_POLL)


async def watch_metrics(client: aiohttp.ClientSession, host: Host, into: Watch) -> None:
    previous = await scrape(client, host)
    while True:
        await asyncio.sleep(METRICS_POLL)
        current = await scrape(client, host)
        for name, samples in (
            ("sweep_duration_seconds", into.sweeps),
            ("store_flush_duration_seconds", into.flushes),
        ):
            count = current.get(f"{PREFIX}{name}_count", 0) - previous.get(
                f"{PREFIX}{name}_count", 0
            )
            if count > 0:
                total = current[f"{PREFIX}{name}_sum"] - previous.get(f"{PREFIX}{name}_sum", 0)
                samples.append(total / count)
        into.closes.append((time.perf_counter(), current.get(f"{PREFIX}upstream_close_total", 0)))
        previous = current


# ---- the probe -------------------------------------------------------------------------------


class Probe:
    """A ping every 20 ms on its own session and connection; latencies by time."""

    def __init__(self, session: McpSession) -> None:
        self.session = session
        self.samples: list[tuple[float, float]] = []
        self.failures = 0

    async def run(self) -> None:
        async with benchlib.client_session(1) as client:
            request_id = 0
            while True:
                request_id += 1
                body = benchlib.request_body("ping", request_id)
                started = time.perf_counter()
                try:
                    async with client.post(
                        self.session.url, data=body, headers=self.session.headers
                    ) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                took = time.perf_counter() - started
                if ok:
                    self.samples.append((started, took))
                else:
                    self.failures += 1
                await asyncio.sleep(max(0.0, PROBE_EVERY - took))

    def window(self, start: float, end: float) -> list[float]:
        return [took for t, took in self.samples if start <= t <= end]


# ---- sessions --------------------------------------------------------------------------------


async def create_sessions(
    client: aiohttp.ClientSession, url: str, count: int
) -> tuple[list[McpSession], float]:
    """`count` sessions through the sidecar; returns them and the creations per second."""
    made: list[McpSession] = []
    next_index = iter(range(count))

    async def worker() -> None:
        for _ in next_index:
            made.append(await benchlib.initialize(client, url))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return made, count / (time.perf_counter() - started)


async def ping_all(client: aiohttp.ClientSession, sessions: Sequence[McpSession]) -> int:
    """One ping on every session: an activity burst the next flush must write."""
    pending = iter(sessions)
    answered = 0

    async def worker() -> None:
        nonlocal answered
        for session in pending:
            async with client.post(
                session.url, data=benchlib.request_body("ping", 1), headers=session.headers
            ) as response:
                await response.read()
                answered += response.status == 200

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return answered


async def status_of(client: aiohttp.ClientSession, session: McpSession) -> int:
    body = benchlib.request_body("ping", 1)
    async with client.post(session.url, data=body, headers=session.headers) as response:
        await response.read()
        return response.status


async def pin(client: aiohttp.ClientSession, host: Host, session: McpSession) -> None:
    url = f"{host.admin_url}/sessions/{session.session_id}/persistent"
    async with client.put(url, data=json.dumps({"persistent": True})) as response:
        if response.status != 200:
            raise benchlib.BenchError(f"pinning the probe session answered {response.status}")


async def wait_for(condition: Callable[[], Awaitable[bool]], limit: float) -> bool:
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        if await condition():
            return True
        await asyncio.sleep(METRICS_POLL)
    return False


# ---- the run ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    rows: list[list[str]] = field(default_factory=list)

    def add(self, measure: str, value: str, note: str = "") -> None:
        self.rows.append([measure, value, note])
        print(f"  {measure}: {value} {note}", file=sys.stderr, flush=True)


class Phase:
    """A span of the run during which the probe's latencies and the metrics are collected."""

    def __init__(self, client: aiohttp.ClientSession, host: Host, probe: Probe) -> None:
        self.client, self.host, self.probe = client, host, probe
        self.watch = Watch()
        self.start = self.end = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Phase:
        self.start = time.perf_counter()
        self._task = asyncio.create_task(watch_metrics(self.client, self.host, self.watch))
        await asyncio.sleep(METRICS_POLL * 1.5)  # the first scrape is the baseline
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.sleep(METRICS_POLL * 1.5)
        self.end = time.perf_counter()
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def stall(self) -> str:
        latencies = sorted(self.probe.window(self.start, self.end))
        if not latencies:
            return "no probe answers"
        p99 = latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)]
        return f"probe max {fmt(latencies[-1] * 1000)} ms, p99 {fmt(p99 * 1000)} ms"

    async def closes_total(self) -> float:
        return (await scrape(self.client, self.host)).get(f"{PREFIX}upstream_close_total", 0.0)


def ms(samples: Sequence[float]) -> str:
    if not samples:
        return "none seen"
    return (
        f"{fmt(max(samples) * 1000, 2)} ms max, {fmt(sum(samples) / len(samples) * 1000, 2)} mean"
    )


async def run_close_mode(
    client: aiohttp.ClientSession, workdir: Path, upstream_url: str, n: int, report: Report
) -> None:
    host = Host(workdir, upstream_url, "close", "close")
    try:
        await host.start()
        probe_session = await benchlib.initialize(client, host.url)
        await pin(client, host, probe_session)
        probe = Probe(probe_session)
        probe_task = asyncio.create_task(probe.run())
        try:
            await asyncio.sleep(1.0)
            await measure_close_mode(client, host, probe, n, report)
        finally:
            probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe_task
    finally:
        host.stop()


async def measure_close_mode(
    client: aiohttp.ClientSession, host: Host, probe: Probe, n: int, report: Report
) -> None:
    empty_rss = host.rss()
    early_count = max(1, n // 100)
    early, rate_early = await create_sessions(client, host.url, early_count)
    host.move_clock(EARLY_SHIFT)
    rest, rate_rest = await create_sessions(client, host.url, n - early_count)
    await asyncio.sleep(2.5)  # the creations' activity flushed
    live_rss = host.rss()
    report.add("creation rate (initialize + initialized)", f"{fmt(min(rate_early, rate_rest))}/s")
    report.add("RSS per live idle session", f"{fmt((live_rss - empty_rss) / n, 0)} B")

    async with Phase(client, host, probe) as idle:
        await asyncio.sleep(4.0)
    report.add("sweep, nothing expired", ms(idle.watch.sweeps), idle.stall())

    before = await idle.closes_total()
    async with Phase(client, host, probe) as some:
        host.move_clock(IDLE_TIMEOUT - EARLY_SHIFT + 1)
        await wait_for(lambda: _closed_at_least(some, before + early_count), CLOSE_WAIT)
    report.add(f"sweep, 1% expired ({early_count})", ms(some.watch.sweeps), some.stall())
    expired_status = await status_of(client, early[0])
    report.add("expired id after the sweep", f"HTTP {expired_status}")

    async with Phase(client, host, probe) as burst:
        answered = await ping_all(client, rest)
        await asyncio.sleep(2.5)
    report.add(f"activity burst ({answered} pings), flush", ms(burst.watch.flushes), burst.stall())

    await restart_and_measure(host, n - early_count, empty_rss, "live", report)
    await expired_while_stopped(client, host, rest, report)
    await mass_expiry_while_serving(client, host, probe, n, report)


async def _closed_at_least(phase: Phase, total: float) -> bool:
    return await phase.closes_total() >= total


async def restart_and_measure(
    host: Host, count: int, empty_rss: int, kind: str, report: Report
) -> None:
    host.stop()
    took = await host.start()
    restored = await host.restored()
    await asyncio.sleep(1.0)
    report.add(f"restart with {count} {kind}: port open after", f"{fmt(took, 2)} s")
    report.add(f"restart with {count} {kind}: restore done after", f"{fmt(restored, 2)} s")
    report.add(f"RSS per restored {kind} session", f"{fmt((host.rss() - empty_rss) / count, 0)} B")


async def expired_while_stopped(
    client: aiohttp.ClientSession, host: Host, sessions: Sequence[McpSession], report: Report
) -> None:
    host.stop()
    host.move_clock(IDLE_TIMEOUT + 1)
    took = await host.start()
    status = await status_of(client, sessions[-1])
    report.add(
        f"restart, {len(sessions)} expired while stopped: port open after",
        f"{fmt(took, 2)} s",
        f"first expired id: HTTP {status}",
    )
    watch = Watch()
    task = asyncio.create_task(watch_metrics(client, host, watch))
    try:
        await wait_for(lambda: _closes_seen(client, host, len(sessions)), CLOSE_WAIT)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    closes = await scrape(client, host)
    done = closes.get(f"{PREFIX}upstream_close_total", 0)
    report.add(
        "  their upstream DELETEs",
        f"{fmt(done, 0)} done",
        f"{fmt(watch.delete_rate(int(done), 0.0))}/s",
    )


async def _closes_seen(client: aiohttp.ClientSession, host: Host, count: int) -> bool:
    return (await scrape(client, host)).get(f"{PREFIX}upstream_close_total", 0) >= count


async def mass_expiry_while_serving(
    client: aiohttp.ClientSession, host: Host, probe: Probe, n: int, report: Report
) -> None:
    # The probe's session was pinned, and survived the restarts: re-point nothing.
    sessions, _ = await create_sessions(client, host.url, n)
    await asyncio.sleep(2.5)
    before = (await scrape(client, host)).get(f"{PREFIX}upstream_close_total", 0)
    async with Phase(client, host, probe) as mass:
        host.move_clock(IDLE_TIMEOUT + 1)
        await wait_for(lambda: _closed_at_least(mass, before + n), CLOSE_WAIT)
    report.add(f"mass expiry of {n} while serving", ms(mass.watch.sweeps), mass.stall())
    report.add("  their upstream DELETEs", f"{fmt(mass.watch.delete_rate(n, before))}/s")
    del sessions


async def run_hibernate_mode(
    client: aiohttp.ClientSession, workdir: Path, upstream_url: str, n: int, report: Report
) -> None:
    host = Host(workdir, upstream_url, "hibernate", "hibernate")
    try:
        await host.start()
        await asyncio.sleep(1.0)
        empty_rss = host.rss()
        await create_sessions(client, host.url, n)
        await asyncio.sleep(2.5)
        before = (await scrape(client, host)).get(f"{PREFIX}sessions_hibernated_total", 0)
        started = time.perf_counter()
        host.move_clock(IDLE_TIMEOUT + 1)

        async def all_dormant() -> bool:
            values = await scrape(client, host)
            return values.get(f"{PREFIX}sessions_hibernated_total", 0) >= before + n

        await wait_for(all_dormant, CLOSE_WAIT)
        report.add(f"hibernate {n} at once", f"{fmt(time.perf_counter() - started, 1)} s")
        await restart_and_measure(host, n, empty_rss, "dormant", report)
    finally:
        host.stop()


async def run(workdir: Path, args: argparse.Namespace) -> None:
    upstream, upstream_url = benchlib.start_upstream("fast", workdir)
    report = Report()
    try:
        async with benchlib.client_session(CONCURRENCY) as client:
            await run_close_mode(client, workdir, upstream_url, args.sessions, report)
            if not args.no_dormant:
                await run_hibernate_mode(client, workdir, upstream_url, args.sessions, report)
    finally:
        upstream.stop()
    print_table(["measure", "figure", "probe / note"], report.rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions per phase")
    parser.add_argument(
        "--no-dormant", action="store_true", help="skip the hibernate (dormant RSS) phase"
    )
    args = parser.parse_args(argv)
    if args.sessions < 100:
        parser.error("--sessions must be at least 100 (1% of them expire in one phase)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_header(
        "mcp-sidecar scale",
        {"sessions": args.sessions, "idle_timeout": IDLE_TIMEOUT, "sweep_interval": 1.0},
    )
    return benchlib.run_in_workdir(lambda workdir: run(workdir, args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
