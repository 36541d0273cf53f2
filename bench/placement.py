"""What placing a new session on a replica costs (SPEC 2.8), by number of live sessions.

Placement needs the live sessions per replica. Counting them walks the whole session table,
so the pool counts at most once a second and keeps the count up with its own placements in
between; this prints the cost of one full count and of one placement, amortised over a
burst, for 1k, 10k and 100k live sessions on three replicas. No network: the pool and real
`Session` objects only.

    .venv/bin/python bench/placement.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.sessions import Binding, Session, Transport
from sidecar.upstream import UpstreamPool

REPLICAS = 3
BURST = 10_000


def sessions(pool: UpstreamPool, count: int) -> dict[str, Session]:
    names = [name for name, _ in pool]
    table = {}
    for i in range(count):
        session_id = f"s{i:032x}"
        table[session_id] = Session(
            id=session_id,
            transport=Transport.STREAMABLE_HTTP,
            client="bench",
            created_at=0.0,
            last_activity_at=0.0,
            protocol_version=None,
            binding=Binding(names[i % REPLICAS], session_id),
        )
    return table


def main() -> None:
    print("| live sessions | one full count | one placement (burst of 10k, amortised) |")
    print("|---:|---:|---:|")
    for count in (1_000, 10_000, 100_000):
        pool = UpstreamPool([f"http://127.0.0.1:{9000 + i}/mcp" for i in range(REPLICAS)], 1, 5)
        live = sessions(pool, count)

        def bound(live: dict[str, Session] = live) -> list[str]:
            return [s.binding.upstream for s in live.values() if s.binding is not None]

        started = time.perf_counter()
        pool.tally(bound())
        full = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(BURST):
            pool.place_live(bound)
        each = (time.perf_counter() - started) / BURST
        print(f"| {count:,} | {full * 1e3:.2f} ms | {each * 1e6:.1f} us |")


if __name__ == "__main__":
    main()
