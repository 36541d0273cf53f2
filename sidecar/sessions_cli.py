"""`mcp-sidecar sessions ...`: the admin API from a shell, or the database while stopped.

`list` and `show` also work with `--db PATH` on a stopped service (read-only: the file is
never written, locked or migrated). `close`, `pin` and `unpin` need the running service,
because only it can close a session upstream and abort its streams.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .config import Settings, load_settings, parse_host_port, resolve_config_path
from .errors import AdminClientError
from .sessions import Policy, State
from .store.sqlite import read_sessions
from .views import details, listing, session_view, table

HTTP_TIMEOUT = 10.0


def add_sessions_parser(commands: Any) -> None:
    sessions = commands.add_parser("sessions", help="list, show, close, pin or unpin sessions")
    actions = sessions.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list sessions")
    listing.add_argument("--state", choices=("live", "dormant", "closed"), default="live")
    listing.add_argument("--client", default="", help="identity, or part of the client label")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--offset", type=int, default=0)
    for name, text in (
        ("show", "show one session"),
        ("close", "close a session (upstream too)"),
        ("pin", "make a session persistent"),
        ("unpin", "make a session expire normally again"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("id", help="the full session id")
    for action in actions.choices.values():
        action.add_argument(
            "--admin", metavar="URL", help="admin API base URL (default: from admin.listen)"
        )
        action.add_argument("--token", help="admin bearer token (default: admin.token)")
        action.add_argument(
            "--config", metavar="PATH", help="config file to read admin.* and sessions.* from"
        )
        action.add_argument("--json", action="store_true", help="machine-readable output")
        if action.prog.split()[-1] in ("list", "show"):
            action.add_argument(
                "--db", metavar="PATH", help="read this database instead of asking the service"
            )


def run_sessions(args: argparse.Namespace) -> int:
    settings = load_settings(resolve_config_path(args.config))
    if getattr(args, "db", None):
        result = _from_database(args, settings)
    else:
        result = _from_admin(args, settings)
    print(_render(args, result))
    return 0


def _from_database(args: argparse.Namespace, settings: Settings) -> Any:
    s = settings.sessions
    policy = Policy(
        s.idle_timeout,
        s.max_lifetime,
        s.open_stream_keeps_alive,
        idle_action=s.idle_action,
        dormant_ttl=s.dormant_ttl,
    )
    now = time.time()
    if args.action == "show":
        found = [x for x in read_sessions(args.db) if x.id == args.id]
        if not found:
            raise AdminClientError(f"no session {args.id!r} in {args.db}")
        return session_view(found[0], policy, now)
    found = listing(read_sessions(args.db, State(args.state)), args.client)
    rows = [session_view(x, policy, now) for x in found]
    return {"total": len(rows), "sessions": rows[args.offset : args.offset + args.limit]}


def _from_admin(args: argparse.Namespace, settings: Settings) -> Any:
    base = args.admin or _admin_base(settings.admin.listen)
    token = args.token if args.token is not None else settings.admin.token
    quoted = urllib.parse.quote(getattr(args, "id", ""), safe="")
    if args.action == "list":
        query = urllib.parse.urlencode(
            {"state": args.state, "client": args.client, "limit": args.limit, "offset": args.offset}
        )
        return _call(base, "GET", f"/sessions?{query}", token)
    if args.action == "show":
        return _call(base, "GET", f"/sessions/{quoted}", token)
    if args.action == "close":
        return _call(base, "DELETE", f"/sessions/{quoted}", token)
    return _call(
        base, "PUT", f"/sessions/{quoted}/persistent", token, {"persistent": args.action == "pin"}
    )


def _admin_base(listen: str) -> str:
    host, port = parse_host_port(listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _call(base: str, method: str, path: str, token: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise AdminClientError(f"{method} {path}: HTTP {exc.code}: {_message(exc)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise AdminClientError(
            f"cannot reach the admin API at {base} ({exc}); is the service running? "
            "Use --admin URL, or --db PATH to read a stopped service's database"
        ) from exc


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except (ValueError, AttributeError):
        return str(exc.reason)


def _render(args: argparse.Namespace, result: Any) -> str:
    if args.json:
        return json.dumps(result, indent=2)
    if args.action == "list":
        return f"{table(result['sessions'])}\n({result['total']} {args.state} sessions)"
    return details(result)
