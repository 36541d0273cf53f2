"""A small soak (bench/soak.py, run by import): after many streams and calls, the sidecar
gives back its fds and has not grown.

50 sessions, each with an open GET stream and an `echo` call every 0.5 s for 3 s, against a
real sidecar in front of FastMCP; the figures come from /proc/PID of the sidecar.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.peers.processes import SidecarFactory, UpstreamHandle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
soak = pytest.importorskip("soak")  # bench/soak.py; imports its sibling benchlib

SESSIONS = 50
SECONDS = 3.0
# The baseline is taken after a warm-up session came and went, so the sidecar's SQLite
# files, its listening sockets and its upstream connection pool already exist; what may
# differ at the end are idle keep-alive connections of that pool (reused, never one per
# session), so a few fds, nowhere near the 3 per session a leak of streams would leave.
FD_SLACK = 3
# CPython keeps freed arenas, so RSS after a peak does not fall back; bound the growth
# instead. Measured: +2 MiB for 50 sessions. 10 MiB is 200 KiB per session: a leaked
# stream buffer (64 KiB) on each side of every stream would cross it.
RSS_GROWTH_KIB = 10 * 1024


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_fds_return_to_baseline_and_rss_is_bounded_after_a_small_soak(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, log={"level": "info"})
    lines: list[str] = []
    result = await soak.run_soak(
        sidecar.url,
        sidecar.proc.pid,
        sessions=SESSIONS,
        seconds=SECONDS,
        call_interval=0.5,
        sample_every=1.0,
        fd_slack=FD_SLACK,
        out=lines.append,
    )
    report = "\n".join(lines)
    print(report)
    baseline, peak, end = result.baseline, result.peak, result.end
    assert baseline is not None
    assert peak is not None
    assert end is not None
    assert peak.held == SESSIONS, report  # every stream was really open at once
    assert peak.fds >= baseline.fds + 2 * SESSIONS, report  # ... and held sidecar fds
    assert end.requests >= SESSIONS * 2, report
    assert end.errors == 0, report
    assert end.held == 0, report
    assert end.fds <= baseline.fds + FD_SLACK, report
    assert end.rss_kib - baseline.rss_kib <= RSS_GROWTH_KIB, report
    assert sidecar.proc.running
    assert "Traceback" not in sidecar.output()
