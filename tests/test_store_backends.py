"""The core lifecycle with the sidecar on each store backend (SPEC 2.6, 2.8), end to end.

One parametrised fixture, `backend`, runs each test with the sidecar on SQLite and on a real
`redis-server` of the test's own; what the store holds is read back through the `Store`
interface, never through one backend's tables or keys. Then Redis faults (SPEC 2.5 as for
SQLite's): Redis stopped mid-test refuses new sessions with 503 and Retry-After, live
sessions keep being served, and the sidecar recovers without a restart when Redis is back.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sidecar.sessions import Session, State
from sidecar.store.redis import RedisStore
from sidecar.store.sqlite import read_sessions
from tests.peers.mcp_clients import (
    RawSession,
    eventually,
    live_sessions,
    not_found_body,
    raw_client,
    sdk_session,
    sleep_until,
    text_of,
)
from tests.peers.processes import SidecarFactory, SidecarHandle, TomlValue, UpstreamHandle
from tests.peers.redis_server import RedisServer

pytestmark = pytest.mark.one_path  # admin, store and CLI: nothing through the proxy

SWEEP = 0.5
FLUSH = 0.2
PREFIX = "e2e:"


@dataclass
class Backend:
    """One store backend as the sidecar's config names it, and a reader for what it holds."""

    name: str
    redis: RedisServer | None = None

    def config(self, **extra: TomlValue) -> dict[str, TomlValue]:
        """The `[store]` section; SQLite keeps the per-sidecar path the factory gives it."""
        section: dict[str, TomlValue] = {"flush_interval": FLUSH, **extra}
        if self.redis is not None:
            section.update(backend="redis", url=self.redis.url, key_prefix=PREFIX)
        return section

    async def stored(self, sidecar: SidecarHandle, session_id: str) -> Session | None:
        """The session as the store holds it (read while the sidecar may still run)."""
        if self.redis is None:
            found = [s for s in read_sessions(str(sidecar.db_path)) if s.id == session_id]
            return found[0] if found else None
        store = RedisStore(self.redis.url, PREFIX)
        await store.open()
        try:
            return await store.get(session_id)
        finally:
            await store.close()


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "redis":
        yield Backend("redis", request.getfixturevalue("redis_server"))
    else:
        yield Backend("sqlite")


# ---- the lifecycle on each backend -----------------------------------------------------------


async def test_sdk_session_survives_a_sidecar_crash_and_restart(
    backend: Backend, upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": 30, "sweep_interval": SWEEP},
        store=backend.config(),
    )
    async with sdk_session(sidecar.url) as (session, get_id):
        session_id = get_id()
        assert session_id is not None
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"

        assert await asyncio.to_thread(sidecar.kill) == -signal.SIGKILL
        await asyncio.to_thread(sidecar.start)

        assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
        assert get_id() == session_id
        stored = await backend.stored(sidecar, session_id)
        assert stored is not None
        assert stored.state is State.LIVE
        assert stored.upstream_id == session_id
    assert upstream.deletes() == [session_id]  # the client's own DELETE on exit, forwarded


async def test_idle_session_is_closed_upstream_once_then_gets_404(
    backend: Backend, upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    idle = 1.5
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": idle, "sweep_interval": SWEEP},
        store=backend.config(),
    )
    async with sdk_session(upstream.url) as (observer, _), raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        assert await raw.call_text("add", {"a": 1, "b": 2}) == "3"
        await eventually(lambda: session_id in upstream.deletes(), within=idle + 5)

        async def upstream_freed_it() -> bool:
            return await live_sessions(observer) == 1

        await eventually(upstream_freed_it, what="upstream session count back to 1")
        response = await raw.post(raw.call_message("echo", request_id=9))
        assert response.status_code == 404
        assert response.json() == not_found_body(9)

        # Several more sweeps: the session is never closed upstream a second time.
        await sleep_until(time.monotonic() + 3 * SWEEP)
        stored = await backend.stored(sidecar, session_id)
    assert upstream.deletes().count(session_id) == 1
    assert stored is not None
    assert (stored.state, stored.close_reason) == (State.CLOSED, "idle_timeout")


async def test_session_expired_while_the_sidecar_was_down_is_closed_upstream_at_start(
    backend: Backend, upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    idle = 2.0
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": idle, "sweep_interval": SWEEP},
        store=backend.config(),
    )
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        last_used = time.monotonic()
        assert await asyncio.to_thread(sidecar.terminate) == 0, sidecar.output()
        await sleep_until(last_used + idle + 0.5)
        assert session_id not in upstream.deletes()

        await asyncio.to_thread(sidecar.start)
        await eventually(lambda: session_id in upstream.deletes(), what="DELETE at start")
        response = await raw.post(raw.call_message("echo", request_id=4))
        assert response.status_code == 404
    assert "1 expired while stopped" in sidecar.output()
    assert upstream.deletes().count(session_id) == 1


# ---- Redis faults ----------------------------------------------------------------------------


async def _metrics(http: httpx.AsyncClient, sidecar: SidecarHandle) -> str:
    return (await http.get(sidecar.admin_url + "/metrics")).text


async def test_redis_stopped_refuses_new_sessions_serves_live_ones_and_recovers(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory, redis_server: RedisServer
) -> None:
    backend = Backend("redis", redis_server)
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": 60, "sweep_interval": SWEEP},
        store=backend.config(),
    )
    async with raw_client() as http:
        live = RawSession(http, sidecar.url)
        assert (await live.initialize()).status_code == 200
        assert live.session_id is not None
        leaving = RawSession(http, sidecar.url)
        assert (await leaving.initialize()).status_code == 200
        assert leaving.session_id is not None

        await asyncio.to_thread(redis_server.stop, keep_data=True)
        refused = RawSession(http, sidecar.url)
        response = await refused.initialize()
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert "store" in response.json()["error"]["message"]
        assert "mcp-session-id" not in response.headers
        # The upstream session made for the refused initialize was closed again at once.
        await eventually(
            lambda: [d for d in upstream.deletes() if d != live.session_id], what="orphan DELETE"
        )
        # The live session is served from memory meanwhile, and its activity waits.
        assert await live.call_text("echo", {"text": "still here"}) == "still here"
        # A session the client ends meanwhile is closed at once (404 after); its close is
        # written when Redis is back.
        deleted = await http.delete(sidecar.url, headers=leaving.headers())
        assert deleted.status_code == 200, deleted.text
        gone = await leaving.post(leaving.call_message("echo", request_id=5))
        assert gone.status_code == 404
        metrics = await _metrics(http, sidecar)
        assert 'mcp_sidecar_store_errors_total{operation="insert"} 1.0' in metrics
        assert 'mcp_sidecar_store_errors_total{operation="close"} 1.0' in metrics
        assert 'mcp_sidecar_rejected_total{reason="store_unavailable"} 1.0' in metrics

        await asyncio.to_thread(redis_server.start)  # with its data, on the same port
        again = RawSession(http, sidecar.url)
        assert (await again.initialize()).status_code == 200  # no sidecar restart needed
        assert again.session_id is not None
        assert await live.call_text("echo", {"text": "after"}) == "after"

        async def activity_written() -> bool:
            stored = await backend.stored(sidecar, str(live.session_id))
            return stored is not None and stored.requests >= 3

        await eventually(activity_written, what="the held-back activity flushed to Redis")

        async def close_written() -> bool:
            stored = await backend.stored(sidecar, str(leaving.session_id))
            return stored is not None and stored.close_reason == "client_delete"

        await eventually(close_written, what="the held-back close written to Redis")

    for session_id in (live.session_id, again.session_id):
        stored = await backend.stored(sidecar, session_id)
        assert stored is not None, session_id
        assert stored.state is State.LIVE, session_id
    # And a restart of the sidecar loses none of them.
    await asyncio.to_thread(sidecar.restart)
    async with raw_client() as http:
        assert "restored 2 live" in sidecar.output()
        live.http = http
        assert await live.call_text("echo", {"text": "restarted"}) == "restarted"


async def test_redis_store_url_with_a_password(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path)
    server.extra_args = ["--requirepass", "s3cret-pass"]
    with server:
        url = server.url.replace("redis://", "redis://:s3cret-pass@")
        sidecar = sidecar_factory(
            upstream.url, store={"backend": "redis", "url": url, "key_prefix": PREFIX}
        )
        async with raw_client() as http:
            raw = RawSession(http, sidecar.url)
            assert (await raw.initialize()).status_code == 200
            assert raw.session_id is not None
        assert "s3cret-pass" not in sidecar.output()
        store = RedisStore(url, PREFIX)
        await store.open()
        try:
            stored = await store.get(raw.session_id)
        finally:
            await store.close()
        assert stored is not None
        assert stored.state is State.LIVE


async def test_redis_store_over_tls(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    with RedisServer(tmp_path, tls=True) as server:
        assert server.url.startswith("rediss://")
        sidecar = sidecar_factory(
            upstream.url, store={"backend": "redis", "url": server.url, "key_prefix": PREFIX}
        )
        async with raw_client() as http:
            raw = RawSession(http, sidecar.url)
            assert (await raw.initialize()).status_code == 200
            assert raw.session_id is not None
            assert await raw.call_text("add", {"a": 4, "b": 5}) == "9"
        stored = await Backend("redis", server).stored(sidecar, raw.session_id)
        assert stored is not None
        assert stored.state is State.LIVE
