"""SIGHUP reloads the config file (SPEC 3.1): timeouts and limits change live without
dropping a session; what cannot change live (listen addresses) is reported and ignored; an
invalid file is reported and the running configuration kept.
"""

from __future__ import annotations

import asyncio
import time

from tests.peers.mcp_clients import eventually
from tests.peers.ops import Admin, mcp_session
from tests.peers.processes import (
    SidecarFactory,
    SidecarHandle,
    UpstreamHandle,
    free_port,
    port_open,
)

RELOADED = "reloaded configuration; "


async def reloaded(sidecar: SidecarHandle, marker: str, count: int = 1) -> None:
    """Wait until `marker` is in the log `count` times (the reload runs asynchronously)."""

    async def logged() -> bool:
        return sidecar.output().count(marker) >= count

    await eventually(logged, within=5.0, what=f"{marker!r} in the log")


async def test_reload_applies_a_shorter_idle_timeout_without_dropping_sessions(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"idle_timeout": 30})
    admin = Admin(sidecar.admin_url)
    async with (
        mcp_session(sidecar.url, terminate_on_close=False) as idle,
        mcp_session(sidecar.url, terminate_on_close=False) as busy,
    ):
        sidecar.reload(sessions={"idle_timeout": 2})
        reload_at = time.monotonic()
        await reloaded(sidecar, RELOADED + "session lifecycle: idle_timeout=2s sweep_interval=1s")
        # The reload itself drops nothing: both sessions are still live and usable.
        assert (await admin.health())["live"] == 2
        assert await busy.echo("after reload") == "after reload"

        async def idle_closed_by_sweeper() -> bool:
            await busy.echo("keep busy")  # activity well inside the new 2 s timeout
            view = await admin.session(idle.session_id)
            return bool(view["state"] == "closed")

        await eventually(idle_closed_by_sweeper, within=8.0, what="the idle session expiring")
        took = time.monotonic() - reload_at
        view = await admin.session(idle.session_id)
        assert view["close_reason"] == "idle_timeout"
        # By the new value: 2 s idle plus at most one new sweep interval (1 s), not by the old
        # 30 s timeout nor after the old 10 s sweep interval.
        assert took < 5.0, f"closed {took:.1f}s after the reload"

        async def deleted_upstream() -> bool:
            return idle.session_id in upstream.deletes()

        await eventually(deleted_upstream, what="the upstream DELETE of the idle session")
        for _ in range(3):
            await asyncio.sleep(0.5)
            assert await busy.echo() == "hi"
        assert (await admin.session(busy.session_id))["state"] == "live"
        assert busy.session_id not in upstream.deletes()


async def test_reload_reports_and_ignores_a_listen_address_change(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    admin = Admin(sidecar.admin_url)
    old_listen, old_admin = sidecar.config["server"]["listen"], sidecar.config["admin"]["listen"]
    new_port, new_admin_port = free_port(), free_port()
    async with mcp_session(sidecar.url, terminate_on_close=False) as client:
        sidecar.reload(
            server={"listen": f"127.0.0.1:{new_port}"},
            admin={"listen": f"127.0.0.1:{new_admin_port}"},
            sessions={"max_sessions": 7},
        )
        await reloaded(sidecar, RELOADED)
        output = sidecar.output()
        assert "reload: server.listen changed but needs a restart; ignored until then" in output
        assert "reload: admin.listen changed but needs a restart; ignored until then" in output
        # Still on the old ports, not on the new ones; the session carries on.
        assert await client.echo("same port") == "same port"
        assert (await admin.health())["live"] == 1
        assert not port_open("127.0.0.1", new_port)
        assert not port_open("127.0.0.1", new_admin_port)
    assert old_listen != f"127.0.0.1:{new_port}"
    assert old_admin != f"127.0.0.1:{new_admin_port}"
    assert sidecar.returncode is None


async def test_reload_of_an_invalid_config_is_logged_and_the_old_one_kept(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"idle_timeout": 60})
    admin = Admin(sidecar.admin_url)
    async with mcp_session(sidecar.url, terminate_on_close=False) as first:
        # A limit that would refuse a second session, in a file that is invalid as a whole.
        sidecar.reload(sessions={"idle_timeout": "soon", "max_sessions": 1})
        await reloaded(sidecar, "reload failed, keeping the running configuration")
        output = sidecar.output()
        assert "sessions.idle_timeout: 'soon' is not allowed" in output
        assert "Traceback" not in output
        assert sidecar.returncode is None

        # Nothing of the bad file applied: no session limit, the old timeout.
        async with mcp_session(sidecar.url, terminate_on_close=False) as second:
            assert await second.echo() == "hi"
        assert await first.echo() == "hi"
        assert (await admin.health())["live"] == 2
        view = await admin.session(first.session_id)
        assert view["idle_seconds"] < 5
        assert view["state"] == "live"

        # A later valid file is applied as usual.
        sidecar.reload(sessions={"idle_timeout": 45, "max_sessions": 0})
        await reloaded(sidecar, RELOADED + "session lifecycle: idle_timeout=45s")
        assert (await admin.health())["live"] == 2


async def test_reload_never_loosens_admin_auth_on_a_kept_listener(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    """A reload that clears admin.token is reported and ignored: the listener keeps the rules
    it started with (SPEC 2.5), so it can never be left open without a token."""
    token = "kept-admin-token"
    sidecar = sidecar_factory(upstream.url, admin={"token": token})
    sidecar.reload(admin={"token": ""})
    await reloaded(sidecar, RELOADED)
    assert "reload: admin.token changed but needs a restart; ignored until then" in (
        sidecar.output()
    )
    anonymous = await Admin(sidecar.admin_url).get("/sessions")
    assert anonymous.status_code == 401
    assert (await Admin(sidecar.admin_url, token).get("/sessions")).status_code == 200
    assert token not in sidecar.output()
