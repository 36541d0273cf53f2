"""Who a client is, and which clients keep knocking on closed sessions.

Client identity (SPEC 2.5) is the SHA-256 of the `Authorization` header when one is sent, else
the peer's IP address. It is what sessions are bound to and what `max_sessions_per_client`
counts; hashing means the store and the admin API never hold a credential.

`StuckClients` answers the operator's question "which client fails to re-initialize after a
404?" (SPEC 2.4). It is keyed by the label a human recognises (User-Agent plus the `clientInfo`
of the session's `initialize`), bounded in size, and deliberately not a Prometheus label:
client strings are unbounded and would explode metric cardinality.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from .request_head import field_text

MAX_STUCK_CLIENTS = 1000
# Distinct closed ids remembered per client, to count sessions; beyond it only requests are
# counted. Keeps the worst case (1,000 clients) to a few tens of MB.
MAX_IDS_PER_CLIENT = 1000


def client_identity(authorization: str | None, remote: str | None) -> str:
    """The identity a session is bound to: a credential hash, or the client address. The
    blanks around the header's value are not part of it (RFC 9110 §5.5), whichever parser
    read it: `Bearer tok ` is the client `Bearer tok` is."""
    if authorization:
        credential = field_text(authorization).encode("utf-8", "replace")
        return "auth:" + hashlib.sha256(credential).hexdigest()[:32]
    return "ip:" + (remote or "unknown")


def client_label(user_agent: str, client_info: str) -> str:
    """How a client is shown to an operator: e.g. `python-httpx/0.28 (my-ide 1.2)`."""
    if user_agent and client_info:
        return f"{user_agent} ({client_info})"
    return user_agent or client_info or "unknown"


def initialize_client(params: Any) -> tuple[str, str | None]:
    """(`clientInfo` as "name version", requested protocol version) from initialize params."""
    if not isinstance(params, dict):
        return "", None
    info = params.get("clientInfo")
    described = ""
    if isinstance(info, dict):
        described = f"{info.get('name', '')} {info.get('version', '')}".strip()[:200]
    version = params.get("protocolVersion")
    return described, version if isinstance(version, str) else None


@dataclass(slots=True)
class StuckClient:
    client: str
    requests: int
    sessions: int
    first_seen: float
    last_seen: float


class StuckClients:
    """Counts requests on closed session ids per client label, least recently seen evicted."""

    def __init__(self, capacity: int = MAX_STUCK_CLIENTS) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, StuckClient] = OrderedDict()
        self._session_ids: dict[str, set[str]] = {}

    def record(self, label: str, session_id: str, now: float) -> None:
        entry = self._entries.pop(label, None)
        if entry is None:
            entry = StuckClient(label, 0, 0, now, now)
            self._session_ids[label] = set()
        ids = self._session_ids[label]
        if session_id not in ids and len(ids) < MAX_IDS_PER_CLIENT:
            ids.add(session_id)
            entry.sessions += 1
        entry.requests += 1
        entry.last_seen = now
        self._entries[label] = entry
        while len(self._entries) > self._capacity:
            evicted, _ = self._entries.popitem(last=False)
            self._session_ids.pop(evicted, None)

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> list[dict[str, Any]]:
        """Most requests first: the worst offender is what the operator looks for."""
        rows = sorted(self._entries.values(), key=lambda e: (-e.requests, -e.last_seen))
        return [asdict(row) for row in rows]
