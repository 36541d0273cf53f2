"""Unit tests for `sidecar.closer`: owed upstream DELETEs against a scripted fake upstream.

The upstream is a real aiohttp server answering DELETE with a scripted sequence of statuses;
the store is a real SQLite file, so the test sees what a restart would find (`pending_closes`).
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar import closer as closer_module
from sidecar.closer import UpstreamCloser
from sidecar.metrics import Metrics
from sidecar.store import PendingClose
from sidecar.store.sqlite import SqliteStore as Store
from sidecar.upstream import UpstreamPool

ServerFactory = Callable[..., Awaitable[TestServer]]
STATIC = {"X-Static-Token": "static-value"}


@dataclass
class FakeUpstream:
    """Answers DELETE /mcp with the scripted statuses, then 200; records what it saw."""

    db_path: Path
    statuses: list[int] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        with sqlite3.connect(self.db_path) as db:
            pending = db.execute(
                "SELECT attempts, last_error FROM pending_closes WHERE session_id=?",
                (request.headers.get("Mcp-Session-Id"),),
            ).fetchone()
        db.close()
        self.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": request.headers.copy(),
                "pending": pending,
            }
        )
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/mcp", self.handle)
        return app


@dataclass
class Harness:
    closer: UpstreamCloser
    store: Store
    metrics: Metrics
    db_path: Path

    def result(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "mcp_sidecar_upstream_close_total", {"result": result}
        )
        return value or 0.0

    def pending_rows(self) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path) as db:
            rows = list(
                db.execute(
                    "SELECT session_id, protocol_version, attempts, last_error FROM pending_closes"
                )
            )
        db.close()
        return rows

    async def owe(
        self, session_id: str, credentials: dict[str, str] | None = None, *, due: float = 0.0
    ) -> None:
        """What `SessionManager.close_many` does: persist the owed close, then schedule it."""
        pending = PendingClose(session_id, "2025-06-18", 0, time.time() + due)
        await self.store.save_pending(pending)
        self.closer.schedule(pending, credentials or {})

    async def settled(self) -> None:
        """Wait until no close is queued or running and none is owed in the store."""
        await eventually(lambda: not self.closer.backlog and not self.pending_rows())


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll `condition` until it holds (the closer works in its own task), or fail."""
    async with asyncio.timeout(limit):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(closer_module, "BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(closer_module, "BACKOFF_MAX", 0.05)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
def fake(db_path: Path) -> FakeUpstream:
    return FakeUpstream(db_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def start(db_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Harness]]]:
    cleanup: list[Callable[[], Awaitable[None]]] = []

    async def build(url: str) -> Harness:
        store = Store(str(db_path))
        await store.open()
        metrics = Metrics()
        upstream = UpstreamPool(url, connect_timeout=1.0, read_timeout=2.0, static_headers=STATIC)
        await upstream.start()
        closer = UpstreamCloser(upstream, store, metrics)
        task = asyncio.create_task(closer.run(), name="test-closer")

        async def stop() -> None:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert closer._attempts == set()
            await upstream.close()
            await store.close()

        cleanup.append(stop)
        return Harness(closer, store, metrics, db_path)

    yield build
    for stop in reversed(cleanup):
        await stop()


async def test_failed_close_is_retried_with_backoff_and_dropped_on_success(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
) -> None:
    fake.statuses = [503, 503, 200]
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    await h.owe("sess-1", {"Authorization": "Bearer client-token"})
    await h.settled()
    assert [s["method"] for s in fake.seen] == ["DELETE"] * 3
    # Each retry was recorded before it was attempted, so a restart would resume it.
    assert [s["pending"] for s in fake.seen] == [(0, None), (1, "HTTP 503"), (2, "HTTP 503")]
    assert h.pending_rows() == []
    assert h.result("retry") == 2
    assert h.result("ok") == 1
    # The in-memory credentials ride along on every attempt, retries included.
    assert [s["headers"].get("Authorization") for s in fake.seen] == ["Bearer client-token"] * 3
    assert h.closer._credentials == {}


async def test_delete_carries_session_id_protocol_version_static_headers_and_credentials(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
) -> None:
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    await h.owe("sess-42", {"Authorization": "Bearer abc", "Cookie": "sid=1"})
    await h.settled()
    (seen,) = fake.seen
    assert seen["method"] == "DELETE"
    assert seen["path"] == "/mcp"
    headers = seen["headers"]
    assert headers["Mcp-Session-Id"] == "sess-42"
    assert headers["MCP-Protocol-Version"] == "2025-06-18"
    assert headers["X-Static-Token"] == "static-value"
    assert headers["Authorization"] == "Bearer abc"
    assert headers["Cookie"] == "sid=1"
    assert h.result("ok") == 1


async def test_close_resumed_after_a_restart_has_no_credentials(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
) -> None:
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    await h.owe("sess-1")  # as restore() does: from the store, credentials never persisted
    await h.settled()
    (seen,) = fake.seen
    assert "Authorization" not in seen["headers"]
    assert seen["headers"]["X-Static-Token"] == "static-value"


@pytest.mark.parametrize(("status", "result"), [(404, "gone"), (405, "unsupported")])
async def test_404_and_405_are_final_after_one_attempt(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
    status: int,
    result: str,
) -> None:
    fake.statuses = [status, 500, 500]
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    await h.owe("sess-1")
    await h.settled()
    await asyncio.sleep(0.05)  # several backoff periods: nothing more may arrive
    assert len(fake.seen) == 1
    assert h.pending_rows() == []
    assert h.result(result) == 1
    assert h.result("retry") == 0


async def test_other_client_errors_are_not_retried(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
) -> None:
    fake.statuses = [401]
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    await h.owe("sess-1")
    await h.settled()
    await asyncio.sleep(0.05)
    assert len(fake.seen) == 1
    assert h.result("refused") == 1


async def test_connection_refused_is_retried_until_the_upstream_is_back(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
) -> None:
    port = _free_port()
    h = await start(f"http://127.0.0.1:{port}/mcp")
    await h.owe("sess-1")
    await eventually(lambda: bool(h.pending_rows()) and h.pending_rows()[0][2] >= 2)
    ((session_id, version, attempts, error),) = h.pending_rows()
    assert (session_id, version) == ("sess-1", "2025-06-18")
    assert attempts >= 2
    assert "cannot reach the upstream" in error
    assert h.result("retry") >= 2
    await aiohttp_server(fake.app(), port=port)
    await h.settled()
    assert len(fake.seen) == 1
    assert h.result("ok") == 1


async def test_gives_up_after_max_attempts_and_says_so(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(closer_module, "MAX_ATTEMPTS", 3)
    fake.statuses = [503] * 10
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    await h.owe("sess-1", {"Authorization": "Bearer t"})
    await h.settled()
    assert len(fake.seen) == 3
    assert h.result("retry") == 3
    assert h.result("abandoned") == 1
    assert h.pending_rows() == []
    assert h.closer._credentials == {}


async def test_close_due_later_is_not_attempted_early(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
) -> None:
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    await h.owe("later", due=60)
    await h.owe("now")
    await eventually(lambda: bool(fake.seen))
    await asyncio.sleep(0.05)
    assert [s["headers"]["Mcp-Session-Id"] for s in fake.seen] == ["now"]
    assert [r[0] for r in h.pending_rows()] == ["later"]
    assert h.closer.backlog == 1


async def test_many_closes_all_complete(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
) -> None:
    fake.statuses = [503] * 5
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    for i in range(30):
        await h.owe(f"sess-{i:02d}")
    await h.settled()
    ids = {s["headers"]["Mcp-Session-Id"] for s in fake.seen}
    assert ids == {f"sess-{i:02d}" for i in range(30)}
    assert len(fake.seen) == 35
    assert h.result("ok") == 30
    assert h.result("retry") == 5


async def test_cancelling_run_cancels_attempts_in_progress(
    aiohttp_server: ServerFactory,
    db_path: Path,
) -> None:
    started = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(30)
        return web.Response()

    app = web.Application()
    app.router.add_route("DELETE", "/mcp", hang)
    server = await aiohttp_server(app)
    store = Store(str(db_path))
    await store.open()
    upstream = UpstreamPool(str(server.make_url("/mcp")), 1.0, 60.0)
    await upstream.start()
    closer = UpstreamCloser(upstream, store, Metrics())
    task = asyncio.create_task(closer.run())
    try:
        pending = PendingClose("sess-1", None, 0, time.time())
        await store.save_pending(pending)
        closer.schedule(pending, {})
        async with asyncio.timeout(5):
            await started.wait()
        assert closer.backlog == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert closer.backlog == 0
        # Still owed: the next start resumes it.
        assert await store.pending_closes() == [pending]
    finally:
        await upstream.close()
        await store.close()


async def test_deletes_owed_to_an_upstream_back_up_go_out_at_once(
    aiohttp_server: ServerFactory,
    fake: FakeUpstream,
    start: Callable[[str], Awaitable[Harness]],
) -> None:
    # A replica that was down for long has its DELETEs minutes away on the backoff; the
    # health check that sees it up again makes them due now.
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    await h.owe("backed-off", due=600)
    assert h.closer.retry_now("another-replica") == 0
    assert h.closer.backlog == 1
    assert h.closer.retry_now("") == 1
    await h.settled()
    assert [s["headers"]["Mcp-Session-Id"] for s in fake.seen] == ["backed-off"]
    assert h.result("ok") == 1


class SharedStore(Store):
    """The SQLite file standing in for a store other sidecars share (SPEC 2.8): what the
    rescan reads is what a dead sidecar left in it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.shared = True

    async def claim_owed(self, pending: PendingClose) -> bool:
        return True


async def test_a_rescan_takes_up_the_due_deletes_another_sidecar_left_behind(
    aiohttp_server: ServerFactory, fake: FakeUpstream, db_path: Path
) -> None:
    server = await aiohttp_server(fake.app())
    store = SharedStore(str(db_path))
    await store.open()
    upstream = UpstreamPool(str(server.make_url("/mcp")), connect_timeout=1.0, read_timeout=2.0)
    await upstream.start()
    now = [1000.0]
    closer = UpstreamCloser(upstream, store, Metrics(), clock=lambda: now[0])
    task = asyncio.create_task(closer.run(), name="test-closer")
    try:
        # Owed by a sidecar that died: one due now, one at its backoff a minute later.
        await store.save_pending(PendingClose("orphaned-due", "2025-06-18", 3, 990.0))
        await store.save_pending(PendingClose("orphaned-later", "2025-06-18", 4, 1060.0))
        held = PendingClose("held-here", "2025-06-18", 0, 1030.0)
        await store.save_pending(held)
        closer.schedule(held, {})

        assert await closer.rescan() == 1
        await eventually(
            lambda: [s["headers"]["Mcp-Session-Id"] for s in fake.seen] == ["orphaned-due"]
        )
        now[0] = 1100.0  # both now due: only the one nobody here holds is taken up again
        assert await closer.rescan() == 1
        assert await closer.rescan() == 0  # held from now on: never scheduled twice
        await eventually(lambda: len(fake.seen) == 3)
        sent = sorted(s["headers"]["Mcp-Session-Id"] for s in fake.seen)
        assert sent == ["held-here", "orphaned-due", "orphaned-later"]
        await eventually(lambda: not closer.backlog)
        assert await store.pending_closes() == []
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await upstream.close()
        await store.close()


class PausedReadStore(SharedStore):
    """Its first `pending_closes` returns what it read only once the test says so: the
    rows of a rescan are then older than what happened meanwhile."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.read = asyncio.Event()
        self.go = asyncio.Event()

    async def pending_closes(self) -> list[PendingClose]:
        rows = await super().pending_closes()
        if not self.read.is_set():
            self.read.set()
            await self.go.wait()
        return rows


async def test_a_rescan_does_not_take_up_a_delete_that_ended_while_it_read_the_store(
    aiohttp_server: ServerFactory, fake: FakeUpstream, db_path: Path
) -> None:
    """The rows a rescan reads can predate an attempt of this closer that ends meanwhile
    (DELETE sent, row dropped, key let go): taking it up again would send it twice."""
    server = await aiohttp_server(fake.app())
    store = PausedReadStore(str(db_path))
    await store.open()
    upstream = UpstreamPool(str(server.make_url("/mcp")), connect_timeout=1.0, read_timeout=2.0)
    await upstream.start()
    closer = UpstreamCloser(upstream, store, Metrics(), clock=lambda: 1000.0)
    owed = PendingClose("ends-meanwhile", "2025-06-18", 0, 990.0)
    await store.save_pending(owed)
    closer.schedule(owed, {})  # held here, not yet attempted: the closer is not running
    rescan = asyncio.create_task(closer.rescan())
    task: asyncio.Task[None] | None = None
    try:
        await store.read.wait()  # the rescan holds the row as it was
        task = asyncio.create_task(closer.run(), name="test-closer")
        await eventually(lambda: closer.backlog == 0 and len(fake.seen) == 1)
        assert await SharedStore.pending_closes(store) == []  # dropped for good
        store.go.set()
        assert await rescan == 0
        assert closer.backlog == 0
    finally:
        store.go.set()
        await asyncio.gather(rescan, return_exceptions=True)
        if task is not None:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await upstream.close()
        await store.close()


async def test_a_store_of_its_own_is_never_rescanned(
    start: Callable[[str], Awaitable[Harness]], aiohttp_server: ServerFactory, fake: FakeUpstream
) -> None:
    server = await aiohttp_server(fake.app())
    h = await start(str(server.make_url("/mcp")))
    await h.store.save_pending(PendingClose("restart-only", "2025-06-18", 0, 0.0))
    assert await h.closer.rescan() == 0  # alone on its store, it read them all at its start
