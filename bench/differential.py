"""The differential fuzzer at scale: the generators and verdict of tests/test_differential.py.

    python bench/differential.py [--requests N] [--answers N] [--stop] [--all]

Starts one raw recording upstream and two sidecars in front of it on 127.0.0.1 and free
ports, one with `server.fast_path` on and one with it off, sends N generated raw client
requests and N generated raw upstream answers (derandomized: the same ones every run for the
same N) through both, and prints counts by kind, the known classes skipped (by finding), and
every difference with the case that made it. `--all` also sends the known classes (it then
finds them). Exits 1 on any difference, any untracked upstream session or a Traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: F401 - puts the repository root on sys.path

from tests.peers import differential
from tests.peers.differential import run_cases, start_pair


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--answers", type=int, default=10_000)
    parser.add_argument("--stop", action="store_true", help="stop at the first difference")
    parser.add_argument("--all", action="store_true", help="send the known classes too")
    args = parser.parse_args()
    if args.all:
        differential.KNOWN_DIFFERENCES = ()
    failed = False
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-differential-") as tmp:
        pair = start_pair(Path(tmp))
        try:
            for which, count in (("requests", args.requests), ("answers", args.answers)):
                started = time.monotonic()
                pair.skipped.clear()
                before = len(pair.found)
                try:
                    run_cases(pair, count, which, keep_going=not args.stop)
                except AssertionError as exc:
                    print(exc)
                elapsed = time.monotonic() - started
                print(
                    f"{which}: {sum(pair.sent.values())} sent in {elapsed:.1f}s, "
                    f"{len(pair.found) - before} differences"
                )
                for kind, n in sorted(pair.sent.items(), key=lambda item: -item[1])[:20]:
                    print(f"  {n:6d}  {kind}")
                print(
                    "  skipped as known, by finding (0: new, see KNOWN_DIFFERENCES):",
                    dict(sorted(pair.skipped.items())),
                )
            for report in pair.found:
                print("-" * 72)
                print(report)
            untracked = pair.untracked()
            tracebacks = pair.tracebacks()
            print(
                f"differences: {len(pair.found)}  untracked upstream sessions: "
                f"{len(untracked)}  issued in answers refused as unusable (502 both ways): "
                f"{len(pair.upstream.unknowable)}  sidecars with a Traceback: "
                f"{tracebacks or 'none'}"
            )
            failed = bool(pair.found or untracked or tracebacks)
        finally:
            pair.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
