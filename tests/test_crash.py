"""Crash safety of the store (SPEC 2.6): SIGKILL the sidecar while clients create and close
sessions, restart it on the same database, and compare with what the clients were answered.

The rounds are in ``tests/peers/crashing.py`` (shared with ``bench/crash.py``): the kill is
at a seeded random moment once sessions are flowing, of the sidecar process this test
started, by its PID.
"""

from __future__ import annotations

from tests.peers.crashing import crash_rounds
from tests.peers.processes import SidecarFactory, UpstreamHandle

ROUNDS = 3
SEED = 20261202


async def test_answered_sessions_survive_sigkill_and_closed_stay_closed(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, log={"level": "info"})
    results = await crash_rounds(sidecar, ROUNDS, SEED)
    report = "\n".join(r.summary() for r in results)
    print(report)
    assert len(results) == ROUNDS
    assert all(r.answered for r in results), report  # every round crashed mid-traffic
    assert sum(len(r.deleted) for r in results) > 0, report  # closes were under test too
    assert [sorted(r.lost) for r in results] == [[]] * ROUNDS, report
    assert [sorted(r.reopened) for r in results] == [[]] * ROUNDS, report
    assert [r.integrity for r in results] == ["ok"] * ROUNDS, report
