"""aiohttp's internals the sidecar uses are named in `sidecar/aiohttp_private.py` only, and
checked at start: with an aiohttp whose internals differ, the fast path (or the guarded
connections) turn themselves off with one warning line, and every request is still served.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from sidecar import aiohttp_private
from sidecar.config import load_settings
from sidecar.server import Server
from tests.peers.ops import mcp_session
from tests.peers.processes import HOST, UpstreamHandle, free_ports

SOURCES = Path(__file__).resolve().parents[1] / "sidecar"
# An import of one of aiohttp's own modules (`aiohttp.web_protocol`, `aiohttp.helpers`, ...),
# not of its API (`aiohttp`, `aiohttp.web`), or a private attribute of a server object.
INTERNAL = re.compile(
    r"^\s*(from|import) aiohttp\.(?!web\b)|\b(base|server|self)\._(kwargs|loop|request_count)\b"
    r"|\b_make_server\b|\b_process_keepalive\b",
    re.MULTILINE,
)


async def test_the_names_are_those_of_the_aiohttp_the_sidecar_runs_with() -> None:
    assert aiohttp_private.missing_for_connections() == []
    assert aiohttp_private.missing_for_fast_path() == []
    assert set(aiohttp_private.FAST_HANDLER_SLOTS) == {
        "_waiter",
        "_messages",
        "_request_in_progress",
        "_payload_parser",
        "_upgraded",
        "_force_close",
        "_close",
        "_handler_waiter",
        "_keepalive_timeout",
        "_loop",
        "_next_keepalive_close_time",
        "_keepalive_handle",
    }
    assert aiohttp_private.FAST_HANDLER_METHODS == ("_process_keepalive",)
    assert aiohttp_private.HANDLER_SLOTS == ("_request_count",)
    assert aiohttp_private.RUNNER_METHODS == ("_make_server",)
    assert aiohttp_private.missing_for_upstream() == []
    assert aiohttp_private.CONNECTOR_METHODS == ("_get",)


def test_no_other_module_reaches_into_aiohttp() -> None:
    offenders = [
        f"{path.relative_to(SOURCES)}: {match.group(0).strip()}"
        for path in sorted(SOURCES.rglob("*.py"))
        if path.name != "aiohttp_private.py"
        for match in INTERNAL.finditer(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "case",
    [
        (None, None),
        ("FAST_HANDLER_SLOTS", "server.fast_path is off"),
        ("HANDLER_SLOTS", "the fast path, server.header_timeout"),
    ],
    ids=["as-expected", "fast-path-name-missing", "connection-name-missing"],
)
async def test_a_missing_name_turns_the_fast_path_off_with_one_warning_and_serves_on(
    upstream: UpstreamHandle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    case: tuple[str | None, str | None],
) -> None:
    names, warning = case  # which list lacks a name, and the warning that says so
    if names is not None:  # as another aiohttp version would be
        expected = getattr(aiohttp_private, names)
        monkeypatch.setattr(aiohttp_private, names, (*expected, "_gone_in_this_version"))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    listen, admin_port = free_ports(2)
    settings = load_settings(
        overrides={
            "server": {"listen": f"{HOST}:{listen}", "fast_path": True},
            "upstream": {"url": upstream.url},
            "store": {"path": str(tmp_path / "sessions.db")},
            "admin": {"listen": f"{HOST}:{admin_port}"},
        },
        environ={},
    )
    server = Server(settings)
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        await server.start()
    try:
        async with mcp_session(f"http://{HOST}:{listen}/mcp") as client:
            assert await client.echo("served") == "served"
        # POSTs the fast path forwarded, not yet folded into the metrics (nothing scraped).
        fast_served = server.service.metrics.fast.forwarded
    finally:
        await server.stop()
    warnings = [r.getMessage() for r in caplog.records if "_gone_in_this_version" in r.getMessage()]
    if warning is None:
        assert warnings == []
        assert fast_served > 0
    else:
        assert len(warnings) == 1
        assert warning in warnings[0]
        assert fast_served == 0
