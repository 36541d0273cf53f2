"""Store faults on real filesystems, end to end (SPEC 2.5 "The store failing is not the
client's fault"): a full disk and another process's write lock, with the real FastMCP server.

Each fault: a new `initialize` gets 503 with Retry-After and leaves no session upstream, a
live session keeps being served, and once the fault is gone the sidecar works again without a
restart and, after one, has lost nothing it acknowledged.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.peers.mcp_clients import RawSession, eventually, raw_client
from tests.peers.processes import SidecarFactory, SidecarHandle, UpstreamHandle


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own (tests run as root); skipped where mounting is refused."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Write until the filesystem says ENOSPC; returns the filler file to remove later."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


async def _assert_new_session_refused(
    http: httpx.AsyncClient, sidecar: SidecarHandle, upstream: UpstreamHandle, live: RawSession
) -> None:
    refused = RawSession(http, sidecar.url)
    response = await refused.initialize()
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    assert "store" in response.json()["error"]["message"]
    assert "mcp-session-id" not in response.headers
    # The session the upstream made for it was closed again: its DELETE reached the upstream,
    # and the upstream's own table holds only the live session.
    await eventually(
        lambda: [d for d in upstream.deletes() if d != live.session_id], what="orphan DELETE"
    )

    async def upstream_holds_one() -> bool:
        return await live.call_text("live_sessions") == "1"

    await eventually(upstream_holds_one, what="upstream back to one session")
    # A live session is served from memory meanwhile.
    assert await live.call_text("echo", {"text": "still here"}) == "still here"


async def _acknowledged_sessions_survive_a_restart(
    sidecar: SidecarHandle, ids: list[str | None]
) -> None:
    sidecar.restart()
    with sqlite3.connect(sidecar.db_path) as db:
        rows = dict(db.execute("SELECT id, state FROM sessions"))
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    for session_id in ids:
        assert rows.get(session_id) == "live", session_id


async def test_disk_full_refuses_new_sessions_serves_live_ones_and_recovers(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory, small_disk: Path
) -> None:
    sidecar = sidecar_factory(upstream.url, store={"path": str(small_disk / "sessions.db")})
    async with raw_client() as http:
        live = RawSession(http, sidecar.url)
        assert (await live.initialize()).status_code == 200
        filler = _fill(small_disk)
        try:
            await _assert_new_session_refused(http, sidecar, upstream, live)
        finally:
            filler.unlink()
        again = RawSession(http, sidecar.url)
        assert (await again.initialize()).status_code == 200  # no restart needed
        metrics = (await http.get(sidecar.admin_url + "/metrics")).text
    assert 'mcp_sidecar_store_errors_total{operation="insert"} 1.0' in metrics
    await _acknowledged_sessions_survive_a_restart(sidecar, [live.session_id, again.session_id])


async def test_write_lock_held_by_another_process_refuses_new_sessions_and_recovers(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    async with raw_client() as http:
        live = RawSession(http, sidecar.url)
        assert (await live.initialize()).status_code == 200
        lock = sqlite3.connect(sidecar.db_path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            await _assert_new_session_refused(http, sidecar, upstream, live)
        finally:
            lock.rollback()
            lock.close()
        again = RawSession(http, sidecar.url)
        assert (await again.initialize()).status_code == 200
    await _acknowledged_sessions_survive_a_restart(sidecar, [live.session_id, again.session_id])
