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

from tests.peers.differential import AnswerCase, Pair, Script, run_answer, run_cases, start_pair
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


# Cases long runs of bench/differential.py found apart, kept so that they stay equal.
FOUND_IN_LONG_RUNS = [
    # A control byte in an error answer's session id, to an initialize, with an SSE head:
    # the fast path held its lane for a head it then refused to write, and answered nothing.
    AnswerCase(
        initialize=True,
        script=Script(
            data=b"HTTP/1.1 500 \xc3\xa9\nContent-Type: text/event-stream\n"
            b"Mcp-Session-Id: bad id\x01\nX-Up: a  b\nContent-Length: 59\n\n"
            b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n',
            close=False,
            creates=False,
        ),
        odd_head=True,
        control_session=True,
        description="initialize 500 sid=bad length",
    ),
    AnswerCase(
        initialize=False,
        script=Script(
            data=b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Mcp-Session-Id: bad id\x01\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'3b\r\nevent: message\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n\r\n0\r\n\r\n',
            close=False,
            creates=False,
        ),
        control_session=True,
        description="call 200 sid=bad chunked",
    ),
]


@pytest.mark.parametrize("case", FOUND_IN_LONG_RUNS, ids=lambda case: case.description)
def test_cases_found_in_long_runs_stay_equal(pair: Pair, case: AnswerCase) -> None:
    assert run_answer(pair, case) == []
