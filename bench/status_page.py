"""How long the status page (admin `GET /`) takes with many sessions.

Builds a `Service` in this process (nothing listens, the store is never opened: the page reads
only memory), fills its session table with N synthetic sessions spread over 1,000 client
identities with varied activity, request counts and clientInfo, then times:

* `scan`: `top_sessions()`, the one bounded pass over the live table (longest idle, busiest,
  active and persistent counts), which the page caches for `TOP_CACHE_SECONDS`;
* `page, cold`: gather + render with the cache expired (what one request pays at most once
  per cache period);
* `page, cached`: gather + render within the cache period (every other request);
* `HTTP GET /`: the whole request through aiohttp's test client (cold cache each time).

Usage: `.venv/bin/python bench/status_page.py [--sessions 1000,100000] [--repeat 20]`.
Prints a Markdown table of medians and 95th percentiles in milliseconds, and the page size.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402 - needs sys.path

from sidecar.admin import build_admin_app  # noqa: E402
from sidecar.app import Service  # noqa: E402
from sidecar.config import load_settings  # noqa: E402
from sidecar.monitor import Sample, top_sessions  # noqa: E402
from sidecar.sessions import CloseReason, Session, Transport  # noqa: E402
from sidecar.status import gather  # noqa: E402
from sidecar.status_html import render  # noqa: E402

CLIENTS = 1000
NOW = 1_800_000_000.0


def fill(service: Service, count: int, rng: random.Random) -> None:
    manager = service.manager
    for number in range(count):
        identity = f"ip:10.0.{number % CLIENTS // 256}.{number % 256}"
        session = Session(
            id=f"{rng.getrandbits(128):032x}",
            transport=Transport.STREAMABLE_HTTP,
            client=identity,
            created_at=NOW - rng.uniform(0, 86400),
            last_activity_at=NOW - rng.expovariate(1 / 600),
            user_agent=f"agent/{number % 7}",
            client_info=f"client-{number % 50} 1.{number % 9}",
            persistent=number % 97 == 0,
        )
        session.requests = int(rng.paretovariate(1.2))
        manager.live[session.id] = session
        manager.admission.bound(identity)
    for minute in range(120):
        service.monitor.history.add(Sample(NOW - 3600 + minute * 30, count, count // 10))
    for session in list(manager.live.values())[:50]:
        service.monitor.record_close(session, CloseReason.IDLE_TIMEOUT, NOW)


def timed(work: Callable[[], object], repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        runs.append((time.perf_counter() - start) * 1000)
    return runs


async def timed_http(service: Service, repeat: int) -> tuple[list[float], int]:
    runs, size = [], 0
    async with TestClient(TestServer(build_admin_app(service))) as client:
        for _ in range(repeat):
            service.monitor.cache_seconds = 0.0
            start = time.perf_counter()
            response = await client.get("/")
            body = await response.read()
            runs.append((time.perf_counter() - start) * 1000)
            assert response.status == 200, body[:200]
            size = len(body)
    return runs, size


def row(what: str, sessions: int, runs: list[float]) -> str:
    p95 = statistics.quantiles(runs, n=20)[-1] if len(runs) > 1 else runs[0]
    return f"| {sessions:,} | {what} | {statistics.median(runs):.2f} | {p95:.2f} |"


def measure(sessions: int, repeat: int, workdir: Path) -> list[str]:
    settings = load_settings(
        None,
        environ={},
        overrides={
            "upstream": {"url": "http://127.0.0.1:9/mcp"},
            "store": {"path": str(workdir / f"bench-{sessions}.db")},
        },
    )
    service = Service(settings, clock=lambda: NOW)
    fill(service, sessions, random.Random(sessions))
    live = service.manager.live

    def cold() -> str:
        service.monitor.cache_seconds = 0.0
        return render(gather(service))

    def cached() -> str:
        service.monitor.cache_seconds = 3600.0
        return render(gather(service))

    cached()  # fill the cache
    http_runs, size = asyncio.run(timed_http(service, repeat))
    return [
        row(
            "scan (top-N, counts)",
            sessions,
            timed(lambda: top_sessions(live.values(), NOW), repeat),
        ),
        row("page, cold cache", sessions, timed(cold, repeat)),
        row("page, cached scan", sessions, timed(cached, repeat)),
        row(f"HTTP GET / (cold, {size:,} bytes)", sessions, http_runs),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sessions", default="1000,100000")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    lines = ["| sessions | what | median ms | p95 ms |", "|---:|---|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-bench-") as workdir:
        for count in (int(n) for n in args.sessions.split(",")):
            lines += measure(count, args.repeat, Path(workdir))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
