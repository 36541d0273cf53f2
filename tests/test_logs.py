"""What the sidecar writes to its log (SPEC 2.5, 3.4): the lines an operator greps for, in
text or JSON, and never a whole session id, even at debug level.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from mcp.shared.exceptions import McpError

from tests.peers.mcp_clients import eventually
from tests.peers.ops import Admin, assert_session_not_found, mcp_session, raw_post
from tests.peers.processes import SidecarFactory, SidecarHandle, UpstreamHandle


async def create_use_expire(sidecar: SidecarHandle) -> str:
    """A session's whole life through the sidecar: created, used, expired, knocked on."""
    admin = Admin(sidecar.admin_url)
    async with mcp_session(sidecar.url, headers={"Authorization": "Bearer tok-123"}) as client:
        await client.echo("hello")

        async def expired() -> bool:
            return bool((await admin.session(client.session_id))["state"] == "closed")

        await eventually(expired, what="the session expiring")
        with pytest.raises(McpError):
            await client.echo("again")
    assert_session_not_found(await raw_post(sidecar.url, client.session_id))
    return client.session_id


def assert_no_whole_id(output: str, session_id: str) -> None:
    assert session_id[:8] in output  # the id is logged, shortened
    assert session_id not in output, "a whole session id reached the log"
    assert session_id[:9] not in output.replace(session_id[:8] + "…", "")
    assert "tok-123" not in output  # nor the client's credential


async def test_text_log_says_what_is_enforced_and_each_close_without_whole_ids(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"idle_timeout": 1})
    session_id = await create_use_expire(sidecar)
    output = sidecar.output()
    store = sidecar.db_path
    assert (
        f"session lifecycle: idle_timeout=1s sweep_interval=1s max_lifetime=off "
        f"persistent=false idle_action=close recover_lost=false store={store}"
    ) in output
    closed = re.search(
        rf"closed session {re.escape(session_id[:8])}… reason=idle_timeout idle=(\d+)s", output
    )
    assert closed is not None, output
    assert 1 <= int(closed.group(1)) <= 3
    assert_no_whole_id(output, session_id)


async def test_json_log_is_one_object_per_line_without_whole_ids(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(
        upstream.url, sessions={"idle_timeout": 1}, log={"format": "json", "level": "debug"}
    )
    session_id = await create_use_expire(sidecar)
    assert await asyncio.to_thread(sidecar.terminate) == 0  # the shutdown lines too
    output = sidecar.output()
    entries = []
    for line in output.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)  # every line, not only most of them
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    messages = [e["message"] for e in entries]
    assert any(m.startswith("session lifecycle: idle_timeout=1s ") for m in messages)
    closed = f"closed session {session_id[:8]}… reason=idle_timeout idle="
    assert any(m.startswith(closed) for m in messages), messages
    assert {e["logger"] for e in entries} >= {"sidecar.server", "sidecar.sessions"}
    assert_no_whole_id(output, session_id)
