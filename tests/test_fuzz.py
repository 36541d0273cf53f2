"""Fuzz the session rules (SPEC 2.1, 2.5, 2.6): random requests, one real sidecar, one FastMCP.

One sidecar and one upstream serve the whole module (started once: a thousand cases must not
pay a process start each). The generators and the verdict live in ``tests/peers/fuzzing.py``;
``bench/fuzz.py`` runs the same ones at a larger count. The verdict comes from the upstream's
own request log, never from the sidecar's account: I1 (every session the upstream holds is
tracked live) and I2 (nothing naming a closed, unknown or foreign session reached it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers.fuzzing import ALICE, FuzzTarget, run_cases
from tests.peers.mcp_clients import ACCEPT_BOTH, PROTOCOL_VERSION
from tests.peers.processes import SidecarHandle, UpstreamHandle, start_sidecar, start_upstream

CASES = 1000
CHECK_EVERY = 100
JSON_HEADERS = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[UpstreamHandle, SidecarHandle]]:
    tmp_path = tmp_path_factory.mktemp("fuzz")
    upstream = start_upstream(tmp_path, "streamable-http")
    try:
        sidecar = start_sidecar(tmp_path, upstream.url, log={"level": "info"})
        try:
            yield upstream, sidecar
        finally:
            sidecar.stop()
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def target(stack: tuple[UpstreamHandle, SidecarHandle]) -> Iterator[FuzzTarget]:
    upstream, sidecar = stack
    fuzz = FuzzTarget(
        base=sidecar.base, admin_url=sidecar.admin_url, upstream_log=upstream.request_log
    )
    yield fuzz
    fuzz.close()


def test_random_requests_keep_the_session_rules(
    target: FuzzTarget, stack: tuple[UpstreamHandle, SidecarHandle]
) -> None:
    # Every case runs even after a violation, so one run lists them all; then it fails.
    run_cases(target, CASES, check_every=CHECK_EVERY, keep_going=True)
    print(target.report())
    assert target.sent >= CASES * 0.9, target.report()  # hypothesis really drew them
    kinds = {kind.split(":")[0] for kind in target.by_kind}
    assert {"no-session", "header", "query", "repeated"} <= kinds, target.by_kind
    assert target.violations == [], "\n".join([target.report(), *target.violations])


def test_the_sidecar_logged_no_traceback(
    target: FuzzTarget, stack: tuple[UpstreamHandle, SidecarHandle]
) -> None:
    _, sidecar = stack
    assert target.sent > 0, "runs after the fuzz test, on the same sidecar"
    assert sidecar.proc.running, sidecar.output()
    assert "Traceback" not in sidecar.output(), sidecar.output()[-5000:]


@pytest.mark.parametrize(
    ("method", "path", "version"),
    [
        ("POST", "/MCP", PROTOCOL_VERSION),  # FastMCP: 404, no such route
        ("DELETE", "/mcp/sub", PROTOCOL_VERSION),  # FastMCP: 404; client answered 200
        ("DELETE", "/mcp", "1999-01-01"),  # FastMCP: 400, bad version; client answered 200
    ],
)
def test_an_upstream_refusal_leaves_the_session_tracked_or_closed_upstream(
    method: str,
    path: str,
    version: str,
    target: FuzzTarget,
    stack: tuple[UpstreamHandle, SidecarHandle],
) -> None:
    """The minimal requests the fuzz found breaking I1: the session's own client names it in a
    request FastMCP refuses (a path spelling its case-sensitive Starlette routes do not know,
    a DELETE with a protocol version it rejects). The upstream still holds the session, so
    the sidecar must keep tracking it live or close it upstream."""
    _, sidecar = stack
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
