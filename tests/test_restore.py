"""Serving while the restore at start still runs (SPEC 2.6): the proxy port opens before the
sessions of the last run are read back, and every id gets the answer it will get after.

The sidecar is the real `Server` (both listeners, the SQLite store, the upstream pool) on a
database prepared through the store's own writes, in front of a real FastMCP upstream. The
store's `load_slices` is held at a gate the test opens, so "the restore has not reached this
id yet" is a fact of the test, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.config import load_settings
from sidecar.server import Server
from sidecar.sessions import Binding, CloseReason, Dormant, ResumeState, Session, State, Transport
from sidecar.store.sqlite import SqliteStore
from tests.peers.mcp_clients import (
    PROTOCOL_VERSION,
    RawSession,
    eventually,
    initialize_message,
    not_found_body,
    raw_client,
)
from tests.peers.ops import Admin
from tests.peers.processes import HOST, UpstreamHandle, free_ports

ME = "ip:127.0.0.1"  # the identity of a client on loopback without credentials
SOMEONE_ELSE = "auth:0123456789abcdef0123456789abcdef"
IDLE = 3600.0


class Gate:
    """Holds the restore after it has read its first slice of each kind, until opened."""

    def __init__(self, server: Server) -> None:
        self.opened = asyncio.Event()
        store = server.service.store
        self._read = store.load_slices
        store.load_slices = self._held  # type: ignore[method-assign]

    async def _held(self, *args: Any, **kwargs: Any) -> AsyncIterator[list[Session]]:
        async for page in self._read(*args, **kwargs):
            await self.opened.wait()  # the slice is read: what it says may be stale now
            yield page


class Clock:
    """Session time the test moves forward (timers still run on real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@asynccontextmanager
async def restoring_server(
    tmp_path: Path, upstream: UpstreamHandle, clock: Clock | None = None, **sessions: Any
) -> AsyncIterator[tuple[Server, Gate, str]]:
    """The server started on `tmp_path/sessions.db` with its restore held at the gate."""
    listen, admin_port = free_ports(2)
    settings = load_settings(
        overrides={
            "server": {"listen": f"{HOST}:{listen}"},
            "admin": {"listen": f"{HOST}:{admin_port}"},
            "upstream": {"url": upstream.url},
            "sessions": {"idle_timeout": f"{int(IDLE)}s", **sessions},
            "store": {"path": str(tmp_path / "sessions.db")},
        },
        environ={},
    )
    server = Server(settings, clock=clock or time.time)
    gate = Gate(server)
    await server.start()
    try:
        yield server, gate, f"http://{HOST}:{listen}/mcp"
    finally:
        gate.opened.set()
        await server.stop()


async def upstream_session(http: httpx.AsyncClient, upstream: UpstreamHandle) -> str:
    """A session the upstream really holds, as if a sidecar had created it before."""
    raw = RawSession(http, upstream.url)
    assert (await raw.initialize("restored-client")).status_code == 200
    assert raw.session_id is not None
    return raw.session_id


def record(session_id: str, *, client: str = ME, last_use: float | None = None) -> Session:
    now = time.time()
    used = now - 60 if last_use is None else last_use
    return Session(
        id=session_id,
        transport=Transport.STREAMABLE_HTTP,
        client=client,
        created_at=used - 10,
        last_activity_at=used,
        protocol_version=PROTOCOL_VERSION,
        user_agent="restore-test",
        client_info="restored-client 1.0",
        requests=2,
        binding=Binding("", session_id),
        resume=ResumeState(initialize_message("restored-client")["params"], "info", []),
    )


async def prepare(path: Path, write: Callable[[SqliteStore], Any]) -> None:
    store = SqliteStore(str(path))
    await store.open()
    try:
        await write(store)
    finally:
        await store.close()


async def hibernated(store: SqliteStore, session: Session, ago: float = 30) -> None:
    await store.insert(session)
    session.state = State.DORMANT
    session.binding = None
    session.dormant_since = time.time() - ago
    await store.hibernate_many([(session, None)])


async def closed(store: SqliteStore, session: Session) -> None:
    await store.insert(session)
    session.state = State.CLOSED
    session.close_reason = CloseReason.CLIENT_DELETE
    session.closed_at = time.time() - 30
    await store.mark_closed_many([(session, None)])


def call(session_id: str, request_id: int = 7) -> tuple[dict[str, Any], dict[str, str]]:
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "still here"}},
    }
    headers = {
        "Accept": "application/json, text/event-stream",
        "Mcp-Session-Id": session_id,
        "MCP-Protocol-Version": PROTOCOL_VERSION,
    }
    return body, headers


async def echo(http: httpx.AsyncClient, url: str, session_id: str) -> httpx.Response:
    body, headers = call(session_id)
    return await http.post(url, json=body, headers=headers)


def answered(response: httpx.Response) -> bool:
    return response.status_code == 200 and "still here" in response.text


async def test_every_kind_of_id_gets_its_final_answer_before_the_restore_reaches_it(
    tmp_path: Path, upstream: UpstreamHandle
) -> None:
    async with raw_client() as http:
        live_id = await upstream_session(http, upstream)
        expired_id = await upstream_session(http, upstream)
        foreign_id = await upstream_session(http, upstream)

        async def write(store: SqliteStore) -> None:
            await store.insert(record(live_id))
            await store.insert(record(expired_id, last_use=time.time() - 2 * IDLE))
            await store.insert(record(foreign_id, client=SOMEONE_ELSE))
            await hibernated(store, record("dormant-id"))
            await hibernated(store, record("dormant-past-ttl"), ago=8 * 86400)
            await closed(store, record("closed-id"))
            legacy = record("legacy-id")
            legacy.transport = Transport.SSE
            await store.insert(legacy)

        await prepare(tmp_path / "sessions.db", write)
        async with restoring_server(tmp_path, upstream, idle_action="hibernate") as (
            server,
            gate,
            url,
        ):
            manager = server.service.manager
            assert manager.restoring
            assert (manager.live, len(manager.dormant), len(manager.tombstones)) == ({}, 0, 0)
            ready = await Admin(f"http://{server.settings.admin.listen}").get("/readyz")
            assert (ready.status_code, ready.json()) == (200, {"ready": True, "restoring": True})

            assert answered(await echo(http, url, live_id))
            # Dormant, and idle past its timeout while stopped (so hibernated now, its old
            # upstream session DELETEd): both resumed behind their own ids.
            for waking in ("dormant-id", expired_id):
                response = await echo(http, url, waking)
                assert answered(response), (waking, response.text)
            gone = (foreign_id, "closed-id", "legacy-id", "dormant-past-ttl", "never-seen")
            for session_id in gone:
                response = await echo(http, url, session_id)
                assert (response.status_code, response.json()) == (404, not_found_body(7)), (
                    session_id
                )
            await eventually(lambda: expired_id in upstream.deletes(), what="expired's DELETE")
            assert manager.restoring  # all of it answered before any slice was taken

            gate.opened.set()
            await asyncio.wait_for(manager.restored.wait(), 30)

            # Each session once: the slices skipped what the requests had decided on.
            assert sorted(manager.live) == sorted([live_id, "dormant-id", expired_id, foreign_id])
            assert dict(manager.admission.per_client) == {ME: 3, SOMEONE_ELSE: 1}
            assert len(manager.dormant) == 0
            assert set(manager.tombstones) == {"closed-id", "legacy-id", "dormant-past-ttl"}
            for session_id in (live_id, "dormant-id", expired_id):
                assert answered(await echo(http, url, session_id))
            assert (await echo(http, url, "legacy-id")).status_code == 404
            assert upstream.deletes().count(expired_id) == 1
            ready = await Admin(f"http://{server.settings.admin.listen}").get("/readyz")
            assert (ready.status_code, ready.json()) == (200, {"ready": True})


async def test_a_slice_read_before_a_close_does_not_bring_the_session_back(
    tmp_path: Path, upstream: UpstreamHandle
) -> None:
    async with raw_client() as http:
        ending = await upstream_session(http, upstream)
        kept = await upstream_session(http, upstream)

        async def write(store: SqliteStore) -> None:
            await store.insert(record(ending))
            await store.insert(record(kept))

        await prepare(tmp_path / "sessions.db", write)
        async with restoring_server(tmp_path, upstream) as (server, gate, url):
            manager = server.service.manager
            # The first live slice (both sessions) is read and held at the gate; meanwhile
            # one is used and the other ended by its client.
            assert answered(await echo(http, url, kept))
            _, headers = call(ending)
            assert (await http.delete(url, headers=headers)).status_code == 200
            held = manager.live[kept]

            gate.opened.set()
            await asyncio.wait_for(manager.restored.wait(), 30)

            assert manager.live == {kept: held}  # the object the request used, not a copy
            assert dict(manager.admission.per_client) == {ME: 1}
            response = await echo(http, url, ending)
            assert (response.status_code, response.json()) == (404, not_found_body(7))
            assert answered(await echo(http, url, kept))
            assert upstream.deletes().count(ending) == 1


async def test_initialize_during_the_restore_counts_the_sessions_not_read_back_yet(
    tmp_path: Path, upstream: UpstreamHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with raw_client() as http:
        restored = await upstream_session(http, upstream)
        await prepare(tmp_path / "sessions.db", lambda store: store.insert(record(restored)))
        async with restoring_server(tmp_path, upstream, max_sessions_per_client=1) as (
            server,
            gate,
            url,
        ):
            manager = server.service.manager
            admitting = asyncio.Event()
            admit = manager.admit

            async def spied(identity: str) -> None:
                admitting.set()
                await admit(identity)

            monkeypatch.setattr(manager, "admit", spied)
            raw = RawSession(http, url)
            initialize = asyncio.create_task(raw.initialize("newcomer"))
            await asyncio.wait_for(admitting.wait(), 30)  # it reached the limits' check
            gate.opened.set()

            response = await initialize
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == "30"
            assert list(manager.live) == [restored]


async def test_a_dormant_session_keeps_what_its_resume_needs_across_a_restart(
    tmp_path: Path, upstream: UpstreamHandle
) -> None:
    clock = Clock()
    async with raw_client() as http:
        async with restoring_server(tmp_path, upstream, clock, idle_action="hibernate") as (
            server,
            gate,
            url,
        ):
            gate.opened.set()
            manager = server.service.manager
            raw = RawSession(http, url)
            assert (await raw.initialize("round-trip")).status_code == 200
            session_id = raw.session_id
            assert session_id is not None
            level = {"jsonrpc": "2.0", "id": 3, "method": "logging/setLevel"}
            level["params"] = {"level": "warning"}
            assert (await raw.post(level)).status_code == 200
            live = manager.live[session_id]
            before = (live.resume, live.protocol_version, live.client, live.created_at)
            assert before[0] is not None
            assert before[0].log_level == "warning"

            clock.offset += 2 * IDLE
            await manager.sweep()
            dormant = manager.dormant.get(session_id)
            # A compact record, no resume state: left in the store until it wakes.
            assert isinstance(dormant, Dormant)
            stored = await server.service.store.get(session_id)
            assert stored is not None
            assert stored.resume == before[0]

        async with restoring_server(tmp_path, upstream, clock, idle_action="hibernate") as (
            server,
            gate,
            url,
        ):
            gate.opened.set()
            manager = server.service.manager
            await asyncio.wait_for(manager.restored.wait(), 30)
            restored = manager.dormant.get(session_id)
            assert isinstance(restored, Dormant)
            known = {r["response_session_id"] for r in upstream.requests()}

            raw.url = url
            assert await raw.call_text("echo", {"text": "awake"}) == "awake"

            woken = manager.live[session_id]
            assert (woken.resume, woken.protocol_version, woken.client, woken.created_at) == (
                before
            )
            issued = [r["response_session_id"] for r in upstream.requests()]
            (new_id,) = [i for i in dict.fromkeys(issued) if i and i not in known]
            methods = [
                m
                for r in upstream.requests()
                if new_id in (r["session_id"], r["response_session_id"])
                for m in r.get("rpc_methods", [])
            ]
            assert methods[:4] == [
                "initialize",
                "notifications/initialized",
                "logging/setLevel",
                "tools/call",
            ], methods
