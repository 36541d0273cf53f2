"""SIGKILL the sidecar under session traffic, N times, and count the sessions lost.

    python bench/crash.py [--rounds N] [--seed S]

Starts the test suite's FastMCP server and one sidecar on 127.0.0.1 and free ports, then
runs the rounds of tests/peers/crashing.py (clients create, use and close sessions; the
sidecar is killed by PID at a seeded random moment and restarted on the same database) and
prints one line per round and the totals. Exits 1 if a session was lost or reopened, or the
database failed `PRAGMA integrity_check`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import benchlib  # noqa: F401 - puts the repository root on sys.path

from tests.peers.crashing import crash_rounds
from tests.peers.processes import start_sidecar, start_upstream


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20261202)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-crash-") as tmp:
        upstream = start_upstream(Path(tmp), "streamable-http")
        sidecar = start_sidecar(Path(tmp), upstream.url, log={"level": "info"})
        try:
            results = asyncio.run(crash_rounds(sidecar, args.rounds, args.seed))
        finally:
            sidecar.stop()
            upstream.stop()
    for result in results:
        print(result.summary())
    lost = sum(len(r.lost) for r in results)
    reopened = sum(len(r.reopened) for r in results)
    answered = sum(len(r.answered) for r in results)
    bad_db = sum(r.integrity != "ok" for r in results)
    print(
        f"rounds: {len(results)}, sessions answered: {answered}, lost: {lost}, "
        f"reopened: {reopened}, integrity failures: {bad_db}"
    )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
