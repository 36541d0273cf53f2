"""`mcp-sidecar store migrate` (SPEC 2.8): SQLite -> Redis -> SQLite keeps every session.

The command is run as the installed console script against a real `redis-server`. The end to
end test moves a real sidecar's store (sessions FastMCP created through it) to Redis, serves
them from there, and moves them back, comparing every persisted field at each step.
"""

from __future__ import annotations

import asyncio
from dataclasses import fields
from pathlib import Path

import pytest

from sidecar.sessions import Binding, CloseReason, ResumeState, Session, State, Transport
from sidecar.store import PendingClose, Store
from sidecar.store.copy import Copied, copy_store
from sidecar.store.redis import RedisStore
from sidecar.store.sqlite import SqliteStore
from tests.peers.mcp_clients import RawSession, not_found_body, raw_client
from tests.peers.processes import SidecarFactory, UpstreamHandle
from tests.peers.redis_server import RedisServer
from tests.test_cli import assert_clean_failure, cli

pytestmark = pytest.mark.one_path  # admin, store and CLI: nothing through the proxy

T0 = 1_700_000_000.0


def _session(number: int) -> Session:
    """Sessions of every kind: live, dormant with resume state, closed, legacy."""
    session = Session(
        id=f"client-{number}",
        transport=Transport.SSE if number % 7 == 0 else Transport.STREAMABLE_HTTP,
        client=f"auth:{number % 3}",
        created_at=T0 + number,
        last_activity_at=T0 + number + 0.123456789,
        protocol_version="2025-06-18",
        client_info="my-ide 1.2",
        requests=number,
        persistent=number % 5 == 0,
        binding=Binding(f"up-{number % 2}", f"upstream-{number}"),
        resume=ResumeState(initialize={"protocolVersion": "2025-06-18"}, log_level="info"),
    )
    if number % 4 == 1:
        session.state = State.DORMANT
        session.binding = None
        session.dormant_since = T0 + 50 + number
    elif number % 4 == 2:
        session.state = State.CLOSED
        session.close_reason = CloseReason.IDLE_TIMEOUT
        session.closed_at = T0 + 100 + number
    return session


async def _contents(store: Store) -> tuple[list[dict[str, object]], list[PendingClose]]:
    await store.open()
    try:
        sessions = [
            {f.name: getattr(s, f.name) for f in fields(Session) if f.name != "runtime"}
            for state in State
            for s in sorted(await store.load(state), key=lambda s: s.id)
        ]
        pending = sorted(await store.pending_closes(), key=lambda p: p.key)
    finally:
        await store.close()
    return sessions, pending


async def _fill(store: Store, count: int) -> None:
    await store.open()
    try:
        for number in range(count):
            await store.insert(_session(number))
        await store.save_pending(PendingClose("upstream-2", None, 3, T0 + 9, upstream="up-0"))
        await store.save_pending(PendingClose("gone-1", "2025-06-18", 0, T0, upstream="up-1"))
    finally:
        await store.close()


async def test_migrate_sqlite_to_redis_and_back_keeps_every_session(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    source = tmp_path / "source.db"
    back = tmp_path / "back.db"
    await _fill(SqliteStore(str(source)), 40)
    original = await _contents(SqliteStore(str(source)))
    assert len(original[0]) == 40

    there = await asyncio.to_thread(
        cli, "store", "migrate", "--from", f"sqlite:{source}", "--to", redis_server.url
    )
    assert there.returncode == 0, there.stderr
    assert there.stdout.startswith(
        "copied 20 live, 10 dormant and 10 closed sessions, 2 owed upstream DELETEs from "
    )
    assert await _contents(RedisStore(redis_server.url)) == original

    again = await asyncio.to_thread(
        cli, "store", "migrate", "--from", redis_server.url, "--to", f"sqlite:{back}"
    )
    assert again.returncode == 0, again.stderr
    assert await _contents(SqliteStore(str(back))) == original


async def test_copy_reports_progress_on_large_stores(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    await _fill(SqliteStore(str(tmp_path / "big.db")), 45)
    source, target = SqliteStore(str(tmp_path / "big.db")), RedisStore(redis_server.url)
    await source.open()
    await target.open()
    reports: list[tuple[int, int]] = []
    try:

        def progress(copied: Copied) -> None:
            reports.append((copied.total, copied.expected))

        copied = await copy_store(source, target, progress, every=10)
    finally:
        await source.close()
        await target.close()
    assert copied.total == 45
    assert [expected for _, expected in reports] == [45] * len(reports)
    totals = [total for total, _ in reports]
    assert totals == sorted(totals)
    assert len(reports) >= 1


async def test_migrate_refuses_a_target_that_already_holds_sessions(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    await _fill(SqliteStore(str(tmp_path / "a.db")), 3)
    await _fill(RedisStore(redis_server.url), 1)
    before = await _contents(RedisStore(redis_server.url))

    result = await asyncio.to_thread(
        cli, "store", "migrate", "--from", f"sqlite:{tmp_path / 'a.db'}", "--to", redis_server.url
    )
    assert_clean_failure(result, "already holds 1 sessions", "empty store")
    assert await _contents(RedisStore(redis_server.url)) == before


def test_migrate_names_what_is_wrong_with_a_location(tmp_path: Path) -> None:
    missing = cli(
        "store", "migrate", "--from", f"sqlite:{tmp_path / 'nope.db'}", "--to", "sqlite:/x"
    )
    assert_clean_failure(missing, "does not exist")
    assert not (tmp_path / "nope.db").exists()
    unknown = cli("store", "migrate", "--from", "mysql://db", "--to", f"sqlite:{tmp_path}/b.db")
    assert_clean_failure(unknown, "not a store location", "sqlite:PATH")


async def test_a_real_sidecars_sessions_move_to_redis_and_are_served_from_there(
    upstream: UpstreamHandle,
    sidecar_factory: SidecarFactory,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"idle_timeout": 60})
    async with raw_client() as http:
        kept = RawSession(http, sidecar.url)
        assert (await kept.initialize()).status_code == 200
        assert await kept.call_text("add", {"a": 2, "b": 3}) == "5"
        ended = RawSession(http, sidecar.url)
        assert (await ended.initialize()).status_code == 200
        ended_id = ended.session_id
        deleted = await http.delete(sidecar.url, headers=ended.headers())
        assert deleted.status_code == 200, deleted.text
        assert await asyncio.to_thread(sidecar.terminate) == 0, sidecar.output()
        on_sqlite = await _contents(SqliteStore(str(sidecar.db_path)))

        moved = await asyncio.to_thread(
            cli, "store", "migrate", "--from", f"sqlite:{sidecar.db_path}", "--to", redis_server.url
        )
        assert moved.returncode == 0, moved.stderr
        assert "1 live, 0 dormant and 1 closed sessions" in moved.stdout
        sidecar.update_config(store={"backend": "redis", "url": redis_server.url})
        await asyncio.to_thread(sidecar.start)

        assert await kept.call_text("echo", {"text": "from redis"}) == "from redis"
        ended.session_id = ended_id
        response = await ended.post(ended.call_message("echo", request_id=6))
        assert response.status_code == 404
        assert response.json() == not_found_body(6)
        assert await asyncio.to_thread(sidecar.terminate) == 0, sidecar.output()

    back = tmp_path / "back.db"
    returned = await asyncio.to_thread(
        cli, "store", "migrate", "--from", redis_server.url, "--to", f"sqlite:{back}"
    )
    assert returned.returncode == 0, returned.stderr
    sessions, pending = await _contents(SqliteStore(str(back)))
    assert [s["id"] for s in sessions] == [s["id"] for s in on_sqlite[0]]
    assert pending == on_sqlite[1]
    assert sessions[1] == on_sqlite[0][1]  # the closed one, unchanged
    assert sessions[0]["requests"] > on_sqlite[0][0]["requests"]  # served on Redis since
