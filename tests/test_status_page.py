"""The status page (SPEC 3.3 `GET /`) as a person sees it: in a real headless Chromium.

Sessions come from the real MCP Python SDK client through a real sidecar in front of FastMCP;
Chromium loads the admin listener's `/` and dumps the DOM after its scripts ran, so the
assertions read what a browser shows, not what a unit test thinks the HTML says. The same run
takes the screenshot; with `MCP_SIDECAR_UPDATE_SCREENSHOT=1` it replaces docs/status-page.png.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from mcp.types import Implementation

from tests.peers.ops import Admin, mcp_session
from tests.peers.processes import SidecarFactory, SidecarHandle, UpstreamHandle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).parent.parent / "docs" / "status-page.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


def chromium(url: str, profile: Path, *extra: str) -> str:
    """Run headless Chromium on `url` once; return what it printed (the DOM for --dump-dom)."""
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *extra,
            url,
        ],
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


@needs_chromium
async def test_status_page_in_chromium_shows_sessions_by_client_and_never_a_whole_id(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    # The page shows the store's path; a neutral one keeps the screenshot free of test dirs.
    store_dir = Path(tempfile.mkdtemp(prefix="mcp-sidecar-"))
    try:
        sidecar = sidecar_factory(upstream.url, store={"path": str(store_dir / "sessions.db")})
        dom, shot, ids = await _page_with_sessions(sidecar, tmp_path)
    finally:
        sidecar_factory.stop_all()
        shutil.rmtree(store_dir, ignore_errors=True)

    for whole in ids:
        assert whole not in dom
        assert whole[:8] + "…" in dom
    for shown in ("busy-ide 4.2", "claude-desktop/0.9", "nightly-report 0.3", "cron-agent/1.1"):
        assert shown in dom
    busiest = _section(dom, "busiest")
    assert busiest.index("busy-ide 4.2") < busiest.index("nightly-report 0.3")
    closes = _section(dom, "recent-closes")
    assert "client_delete" in closes
    assert "short-lived 1.0" in closes
    assert re.search(r'id="count-live"><b>2</b>', dom)
    assert "session lifecycle: idle_timeout=" in _section(dom, "what-it-enforces")
    assert "<polyline" in dom
    assert 'id="refresh"' in dom
    # The refresh script ran: the Content-Security-Policy's hash admits it.
    assert 'data-refresh="armed"' in dom
    assert shot.read_bytes().startswith(PNG_MAGIC)
    if os.environ.get("MCP_SIDECAR_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)


async def _page_with_sessions(
    sidecar: SidecarHandle, tmp_path: Path
) -> tuple[str, Path, list[str]]:
    """Open two SDK sessions (one busy), close a third, and load the page in Chromium twice:
    once for the DOM, once for the screenshot. Returns (DOM, PNG path, every session id)."""
    admin = Admin(sidecar.admin_url)
    async with (
        mcp_session(
            sidecar.url,
            headers={"User-Agent": "claude-desktop/0.9"},
            client_info=Implementation(name="busy-ide", version="4.2"),
        ) as busy,
        mcp_session(
            sidecar.url,
            headers={"User-Agent": "cron-agent/1.1"},
            client_info=Implementation(name="nightly-report", version="0.3"),
        ) as quiet,
    ):
        for n in range(5):
            assert await busy.echo(f"call {n}") == f"call {n}"
        async with mcp_session(
            sidecar.url, client_info=Implementation(name="short-lived", version="1.0")
        ) as gone:
            closed_id = gone.session_id
        # The SDK's DELETE on exit closes it: it must show under recent closes.
        assert (await admin.get(f"/sessions/{closed_id}")).json()["state"] == "closed"
        page = sidecar.admin_url + "/"
        dom = await asyncio.to_thread(chromium, page, tmp_path / "p1", "--dump-dom")
        shot = tmp_path / "status-page.png"
        await asyncio.to_thread(
            chromium, page, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1280,1100"
        )
        return dom, shot, [busy.session_id, quiet.session_id, closed_id]


def _section(dom: str, slug: str) -> str:
    found = re.search(rf'<section id="{slug}".*?</section>', dom, re.S)
    assert found, f"no section {slug} in the page"
    return found.group(0)


async def test_status_page_follows_the_admin_token_and_host_rules(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    token = "page-token-123"
    guarded = sidecar_factory(upstream.url, admin={"token": token})
    anonymous, right = Admin(guarded.admin_url), Admin(guarded.admin_url, token)
    refused = await anonymous.get("/")
    assert refused.status_code == 401
    assert "admin.token" in refused.json()["error"]
    wrong = await Admin(guarded.admin_url, "nope").get("/")
    assert wrong.status_code == 401
    page = await right.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "<h1>mcp-sidecar" in page.text

    open_one = sidecar_factory(upstream.url)
    local = Admin(open_one.admin_url)
    assert (await local.get("/")).status_code == 200
    rebound = await local.get("/", headers={"Host": "evil.example:80"})
    assert rebound.status_code == 403
    assert "Host not allowed" in rebound.json()["error"]


async def test_status_page_without_a_browser_counts_sessions_and_lists_admin_closes(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, sessions={"persistent": True})
    admin = Admin(sidecar.admin_url)
    async with (
        mcp_session(sidecar.url) as kept,
        mcp_session(
            sidecar.url, client_info=Implementation(name="closed-by-admin", version="9")
        ) as closed,
    ):
        assert (await admin.request("DELETE", f"/sessions/{closed.session_id}")).is_success
        page = (await admin.get("/")).text
        assert kept.session_id not in page
    assert closed.session_id not in page
    assert re.search(r'id="count-live"><b>1</b>', page)
    assert re.search(r'id="count-persistent"><b>1</b>', page)
    closes = _section(page, "recent-closes")
    assert "admin" in closes
    assert "closed-by-admin 9" in closes
    assert closed.session_id[:8] + "…" in closes


async def test_status_page_escapes_what_clients_send(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    hostile = Implementation(name="<script>alert(1)</script>", version='"><img src=x>')
    async with mcp_session(
        sidecar.url, headers={"User-Agent": "<b>agent</b>"}, client_info=hostile
    ) as client:
        page = (await Admin(sidecar.admin_url).get("/")).text
        assert client.session_id not in page
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>agent</b>" not in page
    assert "&lt;b&gt;agent&lt;/b&gt;" in page
    assert "<img src=x>" not in page
