"""The `mcp-sidecar` command line (SPEC 3.2), run as the installed console script.

`sessions ...` talks to a real sidecar's admin API (or reads its database once it is
stopped); `check-config` and `serve` are given real files. Every failure must end in a
message that says what went wrong and a non-zero exit code, never in a traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.peers.mcp_clients import eventually
from tests.peers.ops import Admin, mcp_session
from tests.peers.processes import (
    SidecarFactory,
    SidecarHandle,
    TomlValue,
    UpstreamHandle,
    free_port,
    port_open,
    to_toml,
)

pytestmark = pytest.mark.one_path  # admin, store and CLI: nothing through the proxy

TOKEN = "cli-test-token"
TABLE_HEADER = ["id", "state", "transport", "idle", "requests", "persistent", "client"]


def console_script() -> str:
    script = Path(sys.executable).with_name("mcp-sidecar")
    found = str(script) if script.exists() else shutil.which("mcp-sidecar")
    assert found, "the mcp-sidecar console script is not installed (pip install -e .)"
    return found


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run `mcp-sidecar ARGS` with no MCP_SIDECAR_* variables from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_SIDECAR_")}
    return subprocess.run(
        [console_script(), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


async def acli(*args: str) -> subprocess.CompletedProcess[str]:
    """`cli` off the event loop, so SDK sessions held open by the test keep working."""
    return await asyncio.to_thread(cli, *args)


def admin_args(sidecar: SidecarHandle, token: str = TOKEN) -> list[str]:
    return ["--admin", sidecar.admin_url, "--token", token]


def assert_clean_failure(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def table_rows(output: str) -> list[list[str]]:
    lines = output.splitlines()
    assert lines[0].split() == TABLE_HEADER, output
    return [line.split() for line in lines[1:-1]]


async def make_sessions(sidecar: SidecarHandle, *names: str) -> list[str]:
    """Sessions left live in the sidecar (their SDK clients go without a DELETE)."""
    from mcp.types import Implementation

    ids = []
    for name in names:
        async with mcp_session(
            sidecar.url,
            client_info=Implementation(name=name, version="1.0"),
            terminate_on_close=False,
        ) as client:
            await client.echo()
        ids.append(client.session_id)
    return ids


async def test_sessions_list_and_show_print_tables_and_json(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, admin={"token": TOKEN})
    first, second = await make_sessions(sidecar, "first-ide", "second-ide")

    listed = await acli("sessions", "list", *admin_args(sidecar))
    assert listed.returncode == 0, listed.stderr
    rows = table_rows(listed.stdout)
    assert [row[0] for row in rows] == [first, second]  # whole ids, to paste into `close`
    assert all(row[1:3] == ["live", "streamable_http"] for row in rows)
    assert "(first-ide 1.0)" in listed.stdout
    assert "(second-ide 1.0)" in listed.stdout
    assert listed.stdout.splitlines()[-1] == "(2 live sessions)"

    as_json = json.loads((await acli("sessions", "list", "--json", *admin_args(sidecar))).stdout)
    assert as_json["total"] == 2
    assert [s["id"] for s in as_json["sessions"]] == [first, second]
    api = (await Admin(sidecar.admin_url, TOKEN).json("/sessions"))["sessions"]
    assert [s.keys() for s in as_json["sessions"]] == [s.keys() for s in api]  # one shape

    paged = await acli(
        "sessions", "list", "--limit", "1", "--offset", "1", "--json", *admin_args(sidecar)
    )
    assert [s["id"] for s in json.loads(paged.stdout)["sessions"]] == [second]
    only = await acli("sessions", "list", "--client", "second-ide", "--json", *admin_args(sidecar))
    assert [s["id"] for s in json.loads(only.stdout)["sessions"]] == [second]

    # Without --admin/--token, both come from the service's config file (admin.*).
    configured = await acli("sessions", "list", "--json", "--config", str(sidecar.config_path))
    assert configured.returncode == 0, configured.stderr
    assert json.loads(configured.stdout)["total"] == 2

    shown = await acli("sessions", "show", first, *admin_args(sidecar))
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert fields["id"] == first
    assert fields["state"] == "live"
    assert fields["persistent"] == "False"
    assert fields["close_reason"] == "-"
    shown_json = json.loads(
        (await acli("sessions", "show", first, "--json", *admin_args(sidecar))).stdout
    )
    assert (shown_json["id"], shown_json["state"]) == (first, "live")


async def test_sessions_close_pin_unpin_act_through_the_admin_api(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, admin={"token": TOKEN})
    admin = Admin(sidecar.admin_url, TOKEN)
    (session_id,) = await make_sessions(sidecar, "pinned-ide")

    pinned = await acli("sessions", "pin", session_id, "--json", *admin_args(sidecar))
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout)["persistent"] is True
    assert (await admin.session(session_id))["persistent"] is True

    unpinned = await acli("sessions", "unpin", session_id, *admin_args(sidecar))
    assert unpinned.returncode == 0, unpinned.stderr
    fields = dict(line.split(None, 1) for line in unpinned.stdout.splitlines())
    assert (fields["id"], fields["persistent"]) == (session_id, "False")
    assert (await admin.session(session_id))["persistent"] is False

    closed = await acli("sessions", "close", session_id, *admin_args(sidecar))
    assert closed.returncode == 0, closed.stderr
    fields = dict(line.split(None, 1) for line in closed.stdout.splitlines())
    assert (fields["state"], fields["close_reason"]) == ("closed", "admin")

    async def deleted_upstream() -> bool:
        return session_id in upstream.deletes()

    await eventually(deleted_upstream, what="the upstream DELETE")
    listed = json.loads(
        (await acli("sessions", "list", "--state", "closed", "--json", *admin_args(sidecar))).stdout
    )
    assert [s["id"] for s in listed["sessions"]] == [session_id]
    again = await acli("sessions", "close", session_id, *admin_args(sidecar))
    assert_clean_failure(again, "HTTP 409", "already closed")


async def test_sessions_errors_end_in_a_message_not_a_traceback(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url, admin={"token": TOKEN})
    unknown = await acli("sessions", "show", "no-such-id", *admin_args(sidecar))
    assert_clean_failure(unknown, "HTTP 404", "no such session")
    assert unknown.returncode == 1
    for action in ("close", "pin", "unpin"):
        result = await acli("sessions", action, "no-such-id", *admin_args(sidecar))
        assert_clean_failure(result, "HTTP 404")

    wrong_token = await acli("sessions", "list", *admin_args(sidecar, "wrong"))
    assert_clean_failure(wrong_token, "HTTP 401", "admin.token")
    no_token = await acli("sessions", "list", "--admin", sidecar.admin_url)
    assert_clean_failure(no_token, "HTTP 401")

    nobody = f"http://127.0.0.1:{free_port()}"
    unreachable = await acli("sessions", "list", "--admin", nobody)
    assert_clean_failure(unreachable, "cannot reach the admin API", nobody, "--db")
    assert unreachable.returncode == 1


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_sessions_list_and_show_read_a_stopped_services_database_read_only(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(upstream.url)
    live, closed = await make_sessions(sidecar, "kept-ide", "closed-ide")
    assert (await Admin(sidecar.admin_url).request("DELETE", f"/sessions/{closed}")).is_success
    assert await asyncio.to_thread(sidecar.terminate) == 0

    db = sidecar.db_path
    files_before = sorted(p.name for p in db.parent.iterdir())
    digest, mtime = file_digest(db), db.stat().st_mtime_ns

    listed = cli("sessions", "list", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    rows = table_rows(listed.stdout)
    assert [row[0] for row in rows] == [live]
    assert listed.stdout.splitlines()[-1] == "(1 live sessions)"
    closed_json = json.loads(
        cli("sessions", "list", "--db", str(db), "--state", "closed", "--json").stdout
    )
    assert [(s["id"], s["close_reason"]) for s in closed_json["sessions"]] == [(closed, "admin")]
    assert closed_json["total"] == 1

    # --client means what it means to the admin API: the identity, or part of the label.
    for client in ("kept-ide", "OPS-TEST/1.0", "ip:127.0.0.1"):
        found = json.loads(
            cli("sessions", "list", "--db", str(db), "--client", client, "--json").stdout
        )
        assert [s["id"] for s in found["sessions"]] == [live], client
    nobody = json.loads(
        cli("sessions", "list", "--db", str(db), "--client", "closed-ide", "--json").stdout
    )
    assert nobody == {"total": 0, "sessions": []}

    shown = cli("sessions", "show", live, "--db", str(db), "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert (view["id"], view["state"], view["client_label"]) == (
        live,
        "live",
        "ops-test/1.0 (kept-ide 1.0)",
    )
    text = cli("sessions", "show", closed, "--db", str(db))
    assert "closed" in text.stdout
    assert "admin" in text.stdout

    missing = cli("sessions", "show", "no-such-id", "--db", str(db))
    assert_clean_failure(missing, "no-such-id")

    # Read-only: not a byte of the database changed. SQLite may leave an empty -wal and its
    # index (-shm) beside a WAL database opened read-only; they hold no data.
    assert (file_digest(db), db.stat().st_mtime_ns) == (digest, mtime)
    extra = {p.name for p in db.parent.iterdir()} - set(files_before)
    assert extra <= {"sessions.db-wal", "sessions.db-shm"}
    wal = db.parent / "sessions.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0

    nowhere = cli("sessions", "list", "--db", str(db.parent / "absent.db"))
    assert_clean_failure(nowhere, "absent.db", "does not exist")
    assert not (db.parent / "absent.db").exists()

    # close/pin/unpin need the running service: --db is not an option for them.
    refused = cli("sessions", "close", live, "--db", str(db))
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr


# --- check-config and serve ------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_check_config_prints_the_effective_configuration(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "good.toml",
        to_toml(
            {
                "upstream": {"url": "http://127.0.0.1:9/mcp"},
                "sessions": {"idle_timeout": "90s", "max_sessions": 5},
                "admin": {"token": "hide-me"},
            }
        ),
    )
    result = cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["upstream"]["url"] == "http://127.0.0.1:9/mcp"
    assert effective["sessions"]["idle_timeout"] == "90s"
    assert effective["sessions"]["max_sessions"] == 5
    assert effective["server"]["listen"] == "127.0.0.1:8080"  # defaults filled in
    assert effective["admin"]["token"] == "***"
    assert "hide-me" not in result.stdout + result.stderr
    assert "valid" in result.stderr


def test_check_config_lists_every_problem_one_per_line_and_exits_2(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bad.toml",
        "[sessions]\n"
        'idle_timeout = "soon"\n'
        'on_limit = "panic"\n'
        "idel = 3\n"
        "[upstream]\n"
        'url = "ftp://example"\n',
    )
    result = cli("check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    problems = [line.strip() for line in lines[1:]]
    assert lines[0] == "mcp-sidecar: invalid configuration:"
    assert len(problems) == 4, result.stderr
    by_key = {p.split(":", 1)[0]: p for p in problems}
    assert by_key.keys() == {
        "sessions.idle_timeout",
        "sessions.on_limit",
        "sessions.idel",
        "upstream.url",
    }
    assert "'soon' is not allowed" in by_key["sessions.idle_timeout"]
    assert "'reject'" in by_key["sessions.on_limit"]
    assert "'evict_idle'" in by_key["sessions.on_limit"]
    assert "unknown key" in by_key["sessions.idel"]
    assert "http://" in by_key["upstream.url"]

    missing = cli("check-config", str(tmp_path / "absent.toml"))
    assert missing.returncode == 2
    assert "absent.toml" in missing.stderr
    assert "Traceback" not in missing.stderr
    broken = cli("check-config", str(write(tmp_path, "broken.toml", "[sessions\n")))
    assert broken.returncode == 2
    assert "not valid TOML" in broken.stderr
    assert "line 1" in broken.stderr


def serve(config: Path, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return cli("serve", "--config", str(config), timeout=timeout)


def base_config(
    tmp_path: Path, **sections: dict[str, TomlValue]
) -> dict[str, dict[str, TomlValue]]:
    config: dict[str, dict[str, TomlValue]] = {
        "server": {"listen": f"127.0.0.1:{free_port()}"},
        "upstream": {"url": "http://127.0.0.1:9/mcp"},
        "store": {"path": str(tmp_path / "sessions.db")},
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def test_serve_with_an_invalid_config_exits_2_without_a_traceback(tmp_path: Path) -> None:
    config = base_config(tmp_path, sessions={"idle_timeout": -5, "bind_to": "nobody"})
    result = serve(write(tmp_path, "config.toml", to_toml(config)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "sessions.idle_timeout: -5 is not allowed" in result.stderr
    assert "sessions.bind_to" in result.stderr
    assert not (tmp_path / "sessions.db").exists()  # stopped before touching anything


@pytest.mark.parametrize("damage", ["garbage", "newer_schema"])
def test_serve_refuses_a_damaged_or_newer_database_and_leaves_it_untouched(
    tmp_path: Path, damage: str
) -> None:
    db = tmp_path / "sessions.db"
    if damage == "garbage":
        db.write_bytes(b"this is not an SQLite file\n" * 200)
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA user_version=99")
    before = db.read_bytes()
    result = serve(write(tmp_path, "config.toml", to_toml(base_config(tmp_path))))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    expected = "not a usable SQLite database" if damage == "garbage" else "newer mcp-sidecar"
    assert expected in result.stderr
    assert "Nothing was changed" in result.stderr
    assert "stopped;" not in result.stderr  # it never started, so it claims nothing kept
    assert db.read_bytes() == before


def test_serve_refuses_a_non_loopback_admin_listener_without_a_token(tmp_path: Path) -> None:
    admin_port = free_port()
    config = base_config(tmp_path, admin={"listen": f"0.0.0.0:{admin_port}"})
    result = serve(write(tmp_path, "config.toml", to_toml(config)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "admin.token" in result.stderr
    assert "0.0.0.0" in result.stderr
    assert not port_open("127.0.0.1", admin_port)
    assert not (tmp_path / "sessions.db").exists()


@pytest.mark.parametrize("flags", [["--listen", "127.0.0.1"], ["--upstream", "not a url"]])
def test_serve_rejects_bad_flags_naming_the_key(tmp_path: Path, flags: Sequence[str]) -> None:
    path = write(tmp_path, "config.toml", to_toml(base_config(tmp_path)))
    result = cli("serve", "--config", str(path), *flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "(from the command line)" in result.stderr


def test_version_names_the_package_version() -> None:
    import sidecar

    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mcp-sidecar {sidecar.__version__}"
