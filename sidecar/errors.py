"""Every error the sidecar raises on purpose, in one tree.

    SidecarError                      base: catch this at a boundary (CLI, start-up)
    ├── ConfigError                   the TOML file, environment or flags are wrong
    ├── StoreError                    the SQLite database cannot be used
    │   ├── StoreCorruptError         the file is not a healthy SQLite database
    │   └── StoreTooNewError          written by a newer mcp-sidecar (schema ahead of us)
    ├── UpstreamError                 the MCP server behind the sidecar misbehaved
    │   ├── UpstreamUnreachableError  (also ConnectionError) connect refused / reset -> 502
    │   │   └── UpstreamRefusedError  no connection at all: the request never reached it
    │   └── UpstreamTimeoutError      (also TimeoutError) no answer in time -> 504
    └── AdminClientError              the CLI could not talk to the admin API

Library errors (aiohttp, sqlite3, pydantic) are translated into these at one boundary
each: `upstream.py`, `store.py` and `config.py`. Every message says what to do about it,
because the reader is an operator looking at a journal, not a developer with a debugger.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises deliberately."""


class ConfigError(SidecarError):
    """The configuration is invalid; `problems` holds one line per bad key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


class StoreError(SidecarError):
    """The session database cannot be opened or written."""


class StoreCorruptError(StoreError):
    """The database file exists but is not a usable SQLite database."""


class StoreTooNewError(StoreError):
    """The database schema is newer than this version of the sidecar understands."""


class UpstreamError(SidecarError):
    """The upstream MCP server could not be reached or did not answer properly."""


class UpstreamUnreachableError(UpstreamError, ConnectionError):
    """Connecting to the upstream failed (refused, reset, DNS); answered with 502."""


class UpstreamRefusedError(UpstreamUnreachableError):
    """No connection could be made (refused, no route): nothing of the request reached the
    upstream, so it may go to another replica (SPEC 2.8)."""


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    """The upstream did not answer within `upstream.read_timeout`; answered with 504."""


class AdminClientError(SidecarError):
    """The CLI could not complete a request against the admin API or database."""
