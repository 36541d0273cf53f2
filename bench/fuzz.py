"""Fuzz the sidecar's session rules at scale: the generators and verdict of tests/test_fuzz.py.

    python bench/fuzz.py [--upstream fastmcp|everything] [--cases N] [--check-every K] [--stop]

Starts the test suite's FastMCP server (stateful Streamable HTTP), or the TypeScript SDK's
server-everything behind tests/node/request_log.mjs (needs `npm ci --prefix tests/node`),
and one sidecar in front of it on 127.0.0.1 and free ports, sends N hypothesis-drawn cases
(derandomized: the same ones every run for the same N), checks each answer and I2 after each
case and I1 every K cases (see tests/peers/fuzzing.py), and prints counts by kind, body and
status, and every violation. Keeps going after a violation unless --stop; exits 1 if there
was any, or if the sidecar logged a Traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: F401 - puts the repository root on sys.path

from tests.peers.fuzzing import UPSTREAMS, run_cases, start_stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", choices=UPSTREAMS, default="fastmcp")
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--check-every", type=int, default=100)
    parser.add_argument("--stop", action="store_true", help="stop at the first violation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-fuzz-") as tmp:
        stack = start_stack(Path(tmp), args.upstream)
        target = stack.target()
        started = time.monotonic()
        try:
            run_cases(target, args.cases, check_every=args.check_every, keep_going=not args.stop)
        except AssertionError as exc:
            target.violations.append(str(exc))
        finally:
            elapsed = time.monotonic() - started
            target.close()
            traceback = "Traceback" in stack.sidecar.output()
            stack.stop()
    print(f"upstream: {args.upstream}")
    print(target.report())
    print(f"wall: {elapsed:.1f} s ({target.sent / max(elapsed, 1e-9):.0f} cases/s)")
    print(f"sidecar logged a Traceback: {traceback}")
    print(f"violations: {len(target.violations)}")
    for violation in target.violations:
        print("  " + violation[:2000])
    return 1 if target.violations or traceback else 0


if __name__ == "__main__":
    sys.exit(main())
