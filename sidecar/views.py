"""How sessions are shown to people and scripts: the admin API's JSON and the CLI's tables.

One shape for both, so `mcp-sidecar sessions list --json` and `GET /sessions` never drift.
Times are ISO 8601 in UTC; `idle_seconds` is a number for sorting and alerting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from .clients import client_label
from .sessions import Policy, Session, State, short

TABLE_COLUMNS = ("id", "state", "transport", "idle", "requests", "persistent", "client")


def session_view(session: Session, policy: Policy, now: float) -> dict[str, Any]:
    expires = session.expires_at(policy)
    return {
        "id": session.id,
        "state": session.state.value,
        "transport": session.transport.value,
        "protocol_version": session.protocol_version,
        "client": session.client,
        "client_label": client_label(session.user_agent, session.client_info),
        "created_at": iso(session.created_at),
        "last_activity_at": iso(session.last_activity_at),
        "idle_seconds": round(session.idle_seconds(now), 3) if session.usable else None,
        "expires_at": iso(expires) if expires is not None else None,
        "persistent": session.persistent,
        "requests": session.requests,
        "in_flight": session.in_flight,
        # Shortened: the upstream's id is a credential to the upstream session (SPEC 2.7).
        "upstream_id": short(session.upstream_id) if session.upstream_id else None,
        # The pool member's name; "" (the only upstream) is shown as none.
        "upstream": session.binding.upstream or None if session.binding is not None else None,
        "resumes": session.resumes,
        "dormant_since": iso(session.dormant_since) if session.dormant_since else None,
        "close_reason": session.close_reason.value if session.close_reason else None,
        "closed_at": iso(session.closed_at) if session.closed_at is not None else None,
    }


def listing(sessions: Iterable[Session], client: str = "") -> list[Session]:
    """The sessions a listing shows, in its order: live ones oldest first, closed ones most
    recently closed first. `client` matches an identity exactly or a client label in part."""
    query = client.lower()
    chosen = [
        s
        for s in sessions
        if not client
        or client == s.client
        or query in client_label(s.user_agent, s.client_info).lower()
    ]
    return sorted(
        chosen, key=lambda s: -(s.closed_at or 0.0) if s.state is State.CLOSED else s.created_at
    )


def iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of session views; ids in full, so they can be pasted into `close`."""
    cells = [TABLE_COLUMNS] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True))
        for line in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    idle = row.get("idle_seconds")
    state = row["state"] if row["state"] != "closed" else f"closed:{row.get('close_reason')}"
    return (
        row["id"],
        state,
        row["transport"],
        "-" if idle is None else f"{idle:.0f}s",
        str(row["requests"]),
        "yes" if row["persistent"] else "no",
        row["client_label"],
    )


def details(row: dict[str, Any]) -> str:
    """One session, one field per line (for `sessions show`)."""
    width = max(len(key) for key in row)
    return "\n".join(
        f"{key.ljust(width)}  {'-' if value is None else value}" for key, value in row.items()
    )
