"""Fuzz the session rules (SPEC 2.1, 2.5, 2.6): random requests, one real sidecar, in front
of FastMCP and in front of the TypeScript SDK's server-everything (Express).

One sidecar and one upstream serve each upstream's tests (started once: a thousand cases
must not pay a process start each). The generators and the verdict live in
``tests/peers/fuzzing.py``; ``bench/fuzz.py`` runs the same ones at a larger count. The
verdict comes from the upstream's own request log, never from the sidecar's account: I1
(every session the upstream holds is tracked live) and I2 (nothing naming a closed, unknown
or foreign session reached it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers.fuzzing import ALICE, FuzzStack, FuzzTarget, run_cases, start_stack
from tests.peers.mcp_clients import ACCEPT_BOTH, PROTOCOL_VERSION
from tests.peers.node_peers import node_available

# Cases per upstream: FastMCP is the suite's main peer; server-everything gets half, to keep
# the suite's time, still enough to meet every path spelling and method many times
# (bench/fuzz.py runs 10,000 against each).
CASES = {"fastmcp": 1000, "everything": 500}
CHECK_EVERY = 100
JSON_HEADERS = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json"}
_NODE_MISSING = node_available()


@pytest.fixture(
    scope="module",
    params=[
        "fastmcp",
        pytest.param(
            "everything",
            marks=[
                pytest.mark.node,
                pytest.mark.skipif(_NODE_MISSING is not None, reason=_NODE_MISSING or ""),
            ],
        ),
    ],
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzStack]:
    kind = str(request.param)
    fuzz = start_stack(tmp_path_factory.mktemp(f"fuzz-{kind}"), kind)
    try:
        yield fuzz
    finally:
        fuzz.stop()


@pytest.fixture(scope="module")
def target(stack: FuzzStack) -> Iterator[FuzzTarget]:
    fuzz = stack.target()
    yield fuzz
    fuzz.close()


def test_random_requests_keep_the_session_rules(target: FuzzTarget, stack: FuzzStack) -> None:
    # Every case runs even after a violation, so one run lists them all; then it fails.
    cases = CASES[stack.upstream_kind]
    run_cases(target, cases, check_every=CHECK_EVERY, keep_going=True)
    print(target.report())
    assert target.sent >= cases * 0.9, target.report()  # hypothesis really drew them
    kinds = {kind.split(":")[0] for kind in target.by_kind}
    assert {"no-session", "header", "query", "repeated"} <= kinds, target.by_kind
    assert target.violations == [], "\n".join([target.report(), *target.violations])


def test_the_sidecar_logged_no_traceback(target: FuzzTarget, stack: FuzzStack) -> None:
    sidecar = stack.sidecar
    assert target.sent > 0, "runs after the fuzz test, on the same sidecar"
    assert sidecar.proc.running, sidecar.output()
    assert "Traceback" not in sidecar.output(), sidecar.output()[-5000:]


@pytest.mark.parametrize(
    ("method", "path", "version"),
    [
        ("POST", "/MCP", PROTOCOL_VERSION),  # FastMCP: 404, no such route
        ("DELETE", "/mcp/sub", PROTOCOL_VERSION),  # FastMCP: 404; client answered 200
        ("DELETE", "/mcp", "1999-01-01"),  # FastMCP: 400, bad version; client answered 200
        ("PATCH", "/m%63p", PROTOCOL_VERSION),  # Express: 404, it does not decode the path
        ("POST", "/%6Dcp", PROTOCOL_VERSION),  # Express: 404, same
        ("PUT", "/mcp", PROTOCOL_VERSION),  # Express: 404, no PUT route (not "no session")
        ("PATCH", "/mcp", PROTOCOL_VERSION),  # Express: 404, same
        ("DELETE", "/MCP", PROTOCOL_VERSION),  # Express: 200, it closed the session itself
    ],
)
def test_an_upstream_refusal_leaves_the_session_tracked_or_closed_upstream(
    method: str,
    path: str,
    version: str,
    target: FuzzTarget,
    stack: FuzzStack,
) -> None:
    """The minimal requests the fuzz found breaking I1: the session's own client names it in a
    request the upstream's router refuses (a path spelling FastMCP's case-sensitive Starlette
    routes do not know, an encoded path Express does not decode, a method Express has no
    route for, a DELETE with a protocol version FastMCP rejects), or in a DELETE Express
    serves on a spelling. The upstream still holds the session, so the sidecar must keep
    tracking it live or close it upstream, and must not send a DELETE for a closed one."""
    sidecar = stack.sidecar
    session_id = target._initialize(ALICE)
    answer = target.http.request(
        method,
        sidecar.base + path,
        headers={
            "Authorization": ALICE,
            "Mcp-Session-Id": session_id,
            "MCP-Protocol-Version": version,
            **JSON_HEADERS,
        },
        content=b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}' if method == "POST" else None,
    )
    assert answer.status_code != 500, answer.text
    assert not target.held_untracked(session_id), (answer.status_code, target.history(session_id))
    assert not target.side_doors(target.view.all), target.history(session_id)


def test_a_version_only_cors_accepted_is_not_the_one_the_sidecar_closes_with(
    target: FuzzTarget, stack: FuzzStack
) -> None:
    """The third minimal break, found against server-everything: Express's CORS answers any
    OPTIONS 204 without asking MCP, so a version noted from it ("accepted") went into the
    sidecar's own DELETE later, which the upstream refused (400): the session stayed there."""
    sidecar = stack.sidecar
    session_id = target._initialize(ALICE)
    own = {"Authorization": ALICE, "Mcp-Session-Id": session_id}
    options = target.http.request(
        "OPTIONS", sidecar.base + "/mcp", headers={**own, "MCP-Protocol-Version": "1999-01-01"}
    )
    assert options.status_code != 500, options.text
    closed = target.http.delete(f"{sidecar.admin_url}/sessions/{session_id}")
    assert closed.status_code in (200, 202, 204), closed.text
    assert not target.held_untracked(session_id), target.history(session_id)
