"""Store faults on real filesystems, end to end (SPEC 2.5 "The store failing is not the
client's fault"): a full disk, another process's write lock and a disk that fails with real
I/O errors (an ext4 filesystem shut down under the sidecar), with the real FastMCP server.

Each fault: a new `initialize` gets 503 with Retry-After and leaves no session upstream, a
live session keeps being served, and once the fault is gone the sidecar works again without a
restart and, after one, has lost nothing it acknowledged.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.peers.disk import fill
from tests.peers.mcp_clients import RawSession, eventually, raw_client
from tests.peers.processes import SidecarFactory, SidecarHandle, UpstreamHandle


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
        filler = fill(small_disk)
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


# EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32): the filesystem fails every operation with EIO from
# then on, as a dying disk would, until it is unmounted and mounted again.
EXT4_IOC_SHUTDOWN = (2 << 30) | (4 << 16) | (ord("X") << 8) | 125
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:  # the tool is not installed: a refusal like any other
        return subprocess.CompletedProcess(command, 127, "", f"{command[0]}: not installed")


class Ext4Disk:
    """A small ext4 image on a loop device, mounted at `mount`."""

    def __init__(self, image: Path, mount: Path, device: str) -> None:
        self.image = image
        self.mount = mount
        self.device = device

    def shut_down(self) -> None:
        os.sync()  # what was written before the fault is on the disk; the fault is the news
        fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def unmount(self) -> bool:
        """False while a process still holds a file on it (EBUSY)."""
        return _run("umount", str(self.mount)).returncode == 0

    def mount_again(self) -> None:
        done = _run("mount", self.device, str(self.mount))
        assert done.returncode == 0, done.stderr


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Ext4Disk]:
    """16 MiB of ext4 on a loop device (tests run as root); skipped where that is refused."""
    image, mount = tmp_path / "ext4.img", tmp_path / "ext4"
    mount.mkdir()
    made = _run("truncate", "-s", "16M", str(image))
    if made.returncode == 0:
        made = _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 image here ({made.stderr.strip()})")
    attached = _run("losetup", "--find", "--show", str(image))
    if attached.returncode != 0:
        pytest.skip(f"cannot attach a loop device ({attached.stderr.strip()}); needs root")
    device = attached.stdout.strip()
    try:
        mounted = _run("mount", device, str(mount))
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount ext4 here ({mounted.stderr.strip()}); needs root")
        try:
            yield Ext4Disk(image, mount, device)
        finally:
            if _run("umount", str(mount)).returncode != 0:
                _run("umount", "-l", str(mount))
    finally:
        _run("losetup", "-d", device)


async def test_disk_io_errors_refuse_new_sessions_serve_live_ones_and_recover_after_remount(
    ext4_disk: Ext4Disk, upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    """Real EIO from the kernel, not a full disk: every write and the ROLLBACK after it fail.
    Once the filesystem is mounted again, the sidecar reopens its database by itself."""
    store = {"path": str(ext4_disk.mount / "sessions.db")}
    sidecar = sidecar_factory(upstream.url, store=store)
    async with raw_client() as http:
        live = RawSession(http, sidecar.url)
        assert (await live.initialize()).status_code == 200
        ext4_disk.shut_down()
        await _assert_new_session_refused(http, sidecar, upstream, live)

        async def remounted() -> bool:
            # The sidecar lets go of the dead filesystem's files at its next write attempt
            # (this refused initialize, or its own activity flush); until then it is busy.
            if ext4_disk.unmount():
                return True
            assert (await RawSession(http, sidecar.url).initialize()).status_code == 503
            return False

        await eventually(remounted, what="the dead filesystem released and unmounted")
        ext4_disk.mount_again()
        again = RawSession(http, sidecar.url)
        assert (await again.initialize()).status_code == 200  # no restart needed
        assert await live.call_text("echo", {"text": "after"}) == "after"
        assert await live.call_text("live_sessions") == "2"  # no orphan upstream
        metrics = (await http.get(sidecar.admin_url + "/metrics")).text
    assert 'mcp_sidecar_store_errors_total{operation="insert"}' in metrics
    assert "Traceback" not in sidecar.output()
    await _acknowledged_sessions_survive_a_restart(sidecar, [live.session_id, again.session_id])
