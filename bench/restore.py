"""Restore at start, in process: how soon the proxy port accepts, how long the restore runs
behind it, the longest event-loop stall meanwhile, and RSS per restored session.

A database of N sessions is written straight into a temporary SQLite file (the store's own
schema and row format), then `sidecar.server.Server` starts on it exactly as `mcp-sidecar
serve` builds it (admin and proxy listeners on free loopback ports, the store, the restore).
Three kinds of start, each in a fresh process so RSS is its own:

* `live`: N live sessions, all still in their idle timeout;
* `expired`: N live sessions that all expired while the sidecar was stopped (their closes
  run in the background; the upstream is a closed port, so each DELETE fails fast and is
  retried later, as it would be against an upstream that is down);
* `dormant`: N hibernated sessions (`idle_action = "hibernate"`), each with a resume state.

    python bench/restore.py [--sessions 100000] [--kinds live,expired,dormant]

Prints a table, with this harness's figures from before serve-while-restoring beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sidecar.config import load_settings  # noqa: E402 - needs sys.path
from sidecar.server import Server  # noqa: E402
from sidecar.sessions import Binding, ResumeState, Session, State, Transport  # noqa: E402
from sidecar.store.sqlite import _COLUMNS, SqliteStore, _row  # noqa: E402

IDLE_TIMEOUT = 3600.0
# This harness at `99dfcf8` (before serve-while-restoring), 100,000 sessions, load average
# 2.2 on 2 cores: the whole restore ran before the port opened.
BEFORE = {
    "live": "port 2.90 s, 937 B",
    "expired": "port 3.51 s",
    "dormant": "port 2.57 s, 827 B",
}
INITIALIZE = {
    "protocolVersion": "2025-06-18",
    "capabilities": {"roots": {"listChanged": True}, "sampling": {}},
    "clientInfo": {"name": "bench-client", "version": "1.0.0"},
}


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(path: str, count: int, kind: str) -> None:
    """N sessions of one kind, written in one transaction with the store's own row format."""
    asyncio.run(_create_schema(path))
    now = time.time()
    last_use = now - 2 * IDLE_TIMEOUT if kind == "expired" else now - 60
    rows = [_row(_session(now, last_use, kind)) for _ in range(count)]
    placeholders = ", ".join("?" * len(rows[0]))
    with sqlite3.connect(path) as db:
        db.executemany(f"INSERT INTO sessions ({_COLUMNS}) VALUES ({placeholders})", rows)


async def _create_schema(path: str) -> None:
    store = SqliteStore(path)
    await store.open()
    await store.close()


def _session(now: float, last_use: float, kind: str) -> Session:
    session_id = uuid.uuid4().hex
    dormant = kind == "dormant"
    return Session(
        id=session_id,
        transport=Transport.STREAMABLE_HTTP,
        client="bench-identity",
        created_at=last_use - 10,
        last_activity_at=last_use,
        protocol_version="2025-06-18",
        user_agent="python-httpx/0.28.1",
        client_info="bench-client/1.0.0",
        requests=3,
        state=State.DORMANT if dormant else State.LIVE,
        binding=None if dormant else Binding("", session_id),
        resume=ResumeState(INITIALIZE, "info", []),
        dormant_since=now - 30 if dormant else None,
    )


async def measure(path: str, kind: str) -> dict[str, Any]:
    """Start the real server on the prepared file; time the port, then the whole restore."""
    settings = load_settings(
        overrides={
            "server": {"listen": f"127.0.0.1:{free_port()}"},
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "upstream": {"url": f"http://127.0.0.1:{free_port()}/mcp"},
            "store": {"path": path},
            "sessions": {
                "idle_timeout": f"{int(IDLE_TIMEOUT)}s",
                "idle_action": "hibernate" if kind == "dormant" else "close",
            },
            "log": {"level": "warning"},
        }
    )
    gc.collect()
    empty = rss()
    gaps: list[float] = []
    ticking = asyncio.Event()
    ticker = asyncio.create_task(_tick(gaps, ticking))
    await ticking.wait()
    server = Server(settings)
    start = time.perf_counter()
    await server.start()
    port_open = time.perf_counter() - start
    gaps.clear()  # the stalls that count: those a request could meet, once the port is open
    manager = server.service.manager
    await _restored(server)
    restored = time.perf_counter() - start
    ticker.cancel()
    gc.collect()
    held = len(manager.live) + len(manager.dormant)
    grown = rss() - empty
    await server.stop()
    return {
        "port_open_s": port_open,
        "restored_s": restored,
        "max_gap_ms": max(gaps, default=0.0) * 1000,
        "held": held,
        "rss_per_session": grown / max(1, held if kind != "expired" else 1),
    }


async def _restored(server: Server) -> None:
    """Until the restore behind the port has finished (at once, where there is none)."""
    done = getattr(server.service.manager, "restored", None)
    if done is not None:
        await done.wait()


async def _tick(gaps: list[float], ticking: asyncio.Event) -> None:
    """How long the loop went without running this task: the stalls a request would see."""
    last = time.perf_counter()
    ticking.set()
    while True:
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last - 0.001)
        last = now


def run_one(count: int, kind: str) -> dict[str, Any]:
    import uvloop  # noqa: PLC0415 - the server's own loop, only where it runs

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "sessions.db")
        prepare(path, count, kind)
        return uvloop.run(measure(path, kind))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--kinds", default="live,expired,dormant")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one kind, JSON out
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.sessions, args.one)))
        return
    load = os.getloadavg()
    print(f"{args.sessions:,} sessions; load average before: {load[0]:.2f} {load[1]:.2f}")
    print("| kind | port open | restored | loop stall, port open | RSS / session | 99dfcf8 |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--sessions", str(args.sessions), "--one", kind],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        per = "-" if kind == "expired" else f"{r['rss_per_session']:,.0f} B"
        print(
            f"| {kind} | {r['port_open_s']:.3f} s | {r['restored_s']:.3f} s | "
            f"{r['max_gap_ms']:.1f} ms | {per} | {BEFORE[kind]} |"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
