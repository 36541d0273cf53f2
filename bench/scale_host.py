"""The real sidecar server on a clock the scale benchmark can move forward.

`bench/scale.py` needs sessions to expire when it says so, not after real hours: this runs
`sidecar.server.Server` exactly as `mcp-sidecar serve` does, but its session clock is the
wall clock plus an offset in seconds read from `--skew-file` at start and again on every
SIGUSR1. Timers (sweep and flush intervals) still run on real time.

    python bench/scale_host.py --config config.toml --skew-file skew.txt
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sidecar import log as sidecar_log  # noqa: E402 - needs sys.path
from sidecar.config import load_settings  # noqa: E402
from sidecar.server import Server  # noqa: E402


class SkewedClock:
    """Wall time plus an offset the benchmark sets through a file and a signal."""

    def __init__(self, skew_file: Path) -> None:
        self.skew_file = skew_file
        self.offset = 0.0
        self.reread()

    def reread(self) -> None:
        try:
            self.offset = float(self.skew_file.read_text().strip() or 0)
        except FileNotFoundError:
            self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def run(config: Path, clock: SkewedClock) -> None:
    settings = load_settings(config)
    sidecar_log.configure(settings.log.level, settings.log.format)
    server = Server(settings, str(config), clock=clock)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, clock.reread)
    await server.run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--skew-file", type=Path, required=True)
    args = parser.parse_args(argv)
    uvloop.run(run(args.config, SkewedClock(args.skew_file)))


if __name__ == "__main__":
    main()
