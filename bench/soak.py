"""Soak: many sessions, each with an open GET stream and steady calls, for minutes.

    python bench/soak.py [--sessions N] [--minutes M] [--call-interval S] [--sample S]

Starts the test suite's FastMCP server and one sidecar on 127.0.0.1 and free ports. Takes a
baseline of the sidecar's RSS and open fds (from /proc/PID) after one warm-up session has
come and gone, opens N sessions (initialize, notifications/initialized, a GET stream held
open), has each call `echo` every S seconds for M minutes, then closes the streams and
DELETEs the sessions. Prints a sample line (sessions held, requests, errors, RSS, fds) every
--sample seconds, and the baseline, peak and end figures. Every loop is bounded by the
duration; the end waits (bounded) for the fds to settle.

`run_soak()` is what tests/test_soak.py runs, small.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from benchlib import McpSession, close_session, initialize, request_body

from tests.peers.processes import start_sidecar, start_upstream

SETTLE_TIMEOUT = 20.0  # after closing: how long the fds may take to come back down


@dataclass(frozen=True)
class Sample:
    at: float
    held: int  # GET streams open (status 200, not ended)
    requests: int
    errors: int
    rss_kib: int
    fds: int

    def line(self) -> str:
        return (
            f"t={self.at:7.1f}s held={self.held:5} requests={self.requests:7} "
            f"errors={self.errors:4} rss={self.rss_kib / 1024:7.1f} MiB fds={self.fds:5}"
        )


@dataclass
class SoakResult:
    baseline: Sample | None = None
    peak: Sample | None = None
    end: Sample | None = None
    samples: list[Sample] = field(default_factory=list)
    sessions: int = 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Load:
    """The counters the sessions update; a sample reads them."""

    started: float = field(default_factory=time.monotonic)
    held: int = 0
    requests: int = 0
    errors: int = 0
    streams_failed: int = 0

    def sample(self, pid: int) -> Sample:
        return Sample(
            time.monotonic() - self.started,
            self.held,
            self.requests,
            self.errors,
            rss_kib(pid),
            open_fds(pid),
        )


async def _hold_stream(http: aiohttp.ClientSession, session: McpSession, load: Load) -> None:
    headers = {**session.headers, "Accept": "text/event-stream"}
    headers.pop("Content-Type", None)
    try:
        async with http.get(session.url, headers=headers, timeout=aiohttp.ClientTimeout()) as got:
            if got.status != 200:
                load.streams_failed += 1
                return
            load.held += 1
            try:
                while await got.content.readany():
                    pass
            finally:
                load.held -= 1
    except aiohttp.ClientError:
        load.streams_failed += 1


async def _calls(
    http: aiohttp.ClientSession,
    session: McpSession,
    load: Load,
    *,
    until: float,
    interval: float,
    rng: random.Random,
) -> None:
    await asyncio.sleep(rng.uniform(0, interval))  # spread the calls over the interval
    request_id = 0
    while time.monotonic() < until:
        request_id += 1
        body = request_body("echo", request_id)
        try:
            async with http.post(session.url, data=body, headers=session.headers) as answer:
                text = await answer.text()
                ok = answer.status == 200 and '"result"' in text
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        load.requests += 1
        load.errors += not ok
        await asyncio.sleep(interval)


async def _sampler(
    pid: int, load: Load, result: SoakResult, every: float, out: Callable[[str], None]
) -> None:
    while True:
        sample = load.sample(pid)
        result.samples.append(sample)
        if result.peak is None or sample.fds > result.peak.fds:
            result.peak = sample
        out(sample.line())
        await asyncio.sleep(every)


async def run_soak(
    url: str,
    pid: int,
    *,
    sessions: int,
    seconds: float,
    call_interval: float = 1.0,
    sample_every: float = 5.0,
    fd_slack: int = 0,
    out: Callable[[str], None] = print,
) -> SoakResult:
    """Soak the sidecar at `url` (process `pid`); see the module docstring."""
    result = SoakResult(sessions=sessions)
    connector = aiohttp.TCPConnector(limit=0)  # every session its own stream connection
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as http:
        warm = await initialize(http, url)
        await close_session(http, warm)
    # The client's pool is gone now, so the baseline holds no connection of this script.
    await asyncio.sleep(0)
    load = Load()
    result.baseline = load.sample(pid)
    out("baseline " + result.baseline.line())
    rng = random.Random(sessions)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as http:
        opened = await asyncio.gather(*(initialize(http, url) for _ in range(sessions)))
        streams = [asyncio.create_task(_hold_stream(http, s, load)) for s in opened]
        sampler = asyncio.create_task(_sampler(pid, load, result, sample_every, out))
        until = time.monotonic() + seconds
        try:
            await asyncio.gather(
                *(
                    _calls(http, s, load, until=until, interval=call_interval, rng=rng)
                    for s in opened
                )
            )
            result.peak = max([result.peak, load.sample(pid)], key=lambda s: s.fds if s else -1)
        finally:
            sampler.cancel()
            for task in streams:
                task.cancel()
            await asyncio.gather(sampler, *streams, return_exceptions=True)
            await asyncio.gather(*(close_session(http, s) for s in opened))
    result.end = await settle(pid, load, result.baseline, fd_slack)
    out("end " + result.end.line())
    return result


async def settle(pid: int, load: Load, baseline: Sample, slack: int = 0) -> Sample:
    """Wait (bounded) until the sidecar's fds are back to the baseline, then sample."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        sample = load.sample(pid)
        if sample.fds <= baseline.fds + slack or time.monotonic() > deadline:
            return sample
        await asyncio.sleep(0.1)


def _raise_fd_limit() -> None:
    # Each session holds a stream socket in this script and two in the sidecar (client and
    # upstream side); the children inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    del soft


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--call-interval", type=float, default=5.0)
    parser.add_argument("--sample", type=float, default=10.0)
    args = parser.parse_args()
    _raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-soak-") as tmp:
        upstream = start_upstream(Path(tmp), "streamable-http")
        sidecar = start_sidecar(Path(tmp), upstream.url, log={"level": "info"})
        try:
            result = asyncio.run(
                run_soak(
                    sidecar.url,
                    sidecar.proc.pid,
                    sessions=args.sessions,
                    seconds=args.minutes * 60,
                    call_interval=args.call_interval,
                    sample_every=args.sample,
                )
            )
        finally:
            sidecar.stop()
            upstream.stop()
    summary = {
        name: None if sample is None else sample.__dict__
        for name, sample in (
            ("baseline", result.baseline),
            ("peak", result.peak),
            ("end", result.end),
        )
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
