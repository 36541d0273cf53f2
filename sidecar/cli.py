"""The `mcp-sidecar` command line (SPEC 3.2): serve, check-config, sessions, store, demo.

Usage errors and configuration errors end in a clear message and an exit code, never a
traceback: 2 for a bad command line or config, 1 for a failure at run time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import Settings, load_settings, resolve_config_path
from .errors import ConfigError, SidecarError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-sidecar",
        description="Session lifecycle for MCP servers: expire idle sessions, close them "
        "upstream, keep state in SQLite or Redis.",
    )
    parser.add_argument("--version", action="version", version=f"mcp-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the sidecar in front of an MCP server")
    _config_flag(serve)
    serve.add_argument("--upstream", metavar="URL", help="upstream MCP endpoint (upstream.url)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="client listener (server.listen)")

    check = commands.add_parser(
        "check-config", help="validate a config file and print the effective configuration"
    )
    check.add_argument("path", nargs="?", help="config file (default: as for serve)")

    from .sessions_cli import add_sessions_parser

    add_sessions_parser(commands)

    from .store_cli import add_store_parser

    add_store_parser(commands)

    demo = commands.add_parser(
        "demo",
        help="watch a session being created, used, expired "
        "and re-created against a real MCP server",
    )
    demo.add_argument(
        "--idle-timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="the demo sidecar's idle timeout (default: 3)",
    )
    return parser


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config (default: $MCP_SIDECAR_CONFIG, else "
        "/etc/mcp-sidecar/config.toml if present, else built-in defaults)",
    )


def load(path: str | None, overrides: dict[str, Any] | None = None) -> Settings:
    return load_settings(path, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"mcp-sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SidecarError as exc:
        print(f"mcp-sidecar: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from .server import serve

        path = resolve_config_path(args.config)
        # The flag names one upstream: it replaces replicas a file may list.
        replicas: list[str] | None = [] if args.upstream else None
        overrides = {
            "upstream": {"url": args.upstream, "urls": replicas},
            "server": {"listen": args.listen},
        }
        return serve(load(path, overrides), path, overrides)
    if args.command == "check-config":
        path = resolve_config_path(args.path)
        settings = load(path)
        print(f"# {path or 'built-in defaults'}: valid", file=sys.stderr)
        print(settings.to_toml(), end="")
        return EXIT_OK
    if args.command == "sessions":
        from .sessions_cli import run_sessions

        return run_sessions(args)
    if args.command == "store":
        from .store_cli import run_store

        return run_store(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.idle_timeout)
    raise AssertionError(args.command)  # argparse rejects unknown commands


def run() -> None:
    sys.exit(main())
