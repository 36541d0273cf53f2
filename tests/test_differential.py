"""Proven equal, continuously (SPEC 2.5 "One proxy, whichever way in"): generated raw client
requests and generated raw upstream answers through a sidecar with the fast path and one
without, in front of one recording upstream; the same answers, upstream bytes and session
state from both (generators and verdict in ``tests/peers/differential.py``; ``bench/
differential.py`` runs the same ones at a larger count).

The two sidecars and the upstream are started once for the module: hundreds of cases must
not pay a process start each. Classes of difference already reported are skipped
(`KNOWN_DIFFERENCES`), so a failure here is a new one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers.differential import Pair, run_cases, start_pair
from tests.peers.mcp_clients import eventually

CASES = 500


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    started = start_pair(tmp_path_factory.mktemp("differential"))
    try:
        yield started
    finally:
        started.stop()


def test_generated_requests_get_the_same_answers_upstream_bytes_and_state(pair: Pair) -> None:
    run_cases(pair, CASES, "requests")
    assert sum(pair.sent.values()) >= CASES
    assert pair.tracebacks() == []


def test_generated_upstream_answers_give_the_same_answers_and_state(pair: Pair) -> None:
    run_cases(pair, CASES, "answers")
    assert sum(pair.sent.values()) >= CASES
    assert pair.tracebacks() == []


async def test_no_upstream_session_is_left_untracked(pair: Pair) -> None:
    await eventually(lambda: not pair.untracked(), what="every upstream session tracked or closed")
