"""Fixtures for tests that run the real processes: the upstream MCP server and the sidecar.

Each fixture is function-scoped and stops what it started, so no test sees another's
sessions. Every test that starts a sidecar runs twice, with `server.fast_path` on (`[fast]`)
and off (`[reference]`), as both must behave alike (SPEC 2.5); a module marked `one_path`
(admin, store, CLI: nothing through the proxy) runs once, as configured.

The helpers behind them live in ``tests/peers/processes.py`` for tests that need more
control (a second upstream, a restart, SIGKILL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.peers.processes import SidecarFactory, UpstreamHandle
    from tests.peers.redis_server import RedisServer


@pytest.fixture
def upstream_factory(tmp_path: Path) -> Iterator[Callable[..., UpstreamHandle]]:
    """``upstream_factory(transport="streamable-http", stateless=False, json_response=False)``."""
    from tests.peers.processes import start_upstream

    started: list[UpstreamHandle] = []

    def start(transport: str = "streamable-http", **opts: Any) -> UpstreamHandle:
        handle = start_upstream(tmp_path, transport, **opts)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def upstream(upstream_factory: Callable[..., UpstreamHandle]) -> UpstreamHandle:
    """A stateful FastMCP server on Streamable HTTP; ``.url`` is ``http://127.0.0.1:P/mcp``."""
    return upstream_factory("streamable-http")


@pytest.fixture
def sse_upstream(upstream_factory: Callable[..., UpstreamHandle]) -> UpstreamHandle:
    """A FastMCP server on the legacy HTTP+SSE transport; ``.sse_url`` is ``…/sse``."""
    return upstream_factory("sse")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    definition = metafunc.definition
    if (
        "fast_path" in metafunc.fixturenames
        and not definition.get_closest_marker("one_path")
        and not _parametrizes_fast_path(definition)
    ):
        metafunc.parametrize("fast_path", [True, False], ids=["fast", "reference"], indirect=True)


def _parametrizes_fast_path(definition: pytest.Function) -> bool:
    """A test that names both ways itself (its own ids, or only one way with a reason)."""
    for mark in definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",")]
        if "fast_path" in names:
            return True
    return False


@pytest.fixture
def fast_path(request: pytest.FixtureRequest) -> Iterator[bool]:
    """`server.fast_path` for the sidecars this test starts without one in their config."""
    from tests.peers import processes

    on = bool(getattr(request, "param", True))
    before, processes.fast_path_default = processes.fast_path_default, on
    yield on
    processes.fast_path_default = before


@pytest.fixture
def sidecar_factory(tmp_path: Path, fast_path: bool) -> Iterator[SidecarFactory]:
    """``sidecar_factory(upstream.url, sessions={"idle_timeout": 2})`` -> SidecarHandle."""
    from tests.peers.processes import SidecarFactory

    factory = SidecarFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real, empty `redis-server` on a free port (skips where it is not installed)."""
    from tests.peers.redis_server import RedisServer

    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own, to fill for real (`tests.peers.disk.fill`)."""
    from tests.peers.disk import small_tmpfs

    with small_tmpfs(tmp_path / "disk") as mount:
        yield mount
