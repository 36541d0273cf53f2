"""The session model: what the sidecar knows about one MCP session, and when it expires.

A `Session` is plain data plus the rules that only need that data (expiry, activity). The
fields above the marker are persisted by `store.py`; the ones below live only in memory:
credentials (never written to disk, SPEC 2.4), the streams being relayed, and the ids of
server-initiated pings whose answers must not count as activity (SPEC 2.3).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from .jsonrpc import Batch, RequestId

# How many unanswered server ping ids to remember per session; a server that pings far more
# often than the client answers must not grow memory without bound.
MAX_REMEMBERED_PINGS = 64
# `active` in /healthz means activity within this window (SPEC 3.3).
ACTIVE_WINDOW = 60.0


class Transport(StrEnum):
    STREAMABLE_HTTP = "streamable_http"
    SSE = "sse"


class State(StrEnum):
    LIVE = "live"
    CLOSED = "closed"


class CloseReason(StrEnum):
    IDLE_TIMEOUT = "idle_timeout"
    MAX_LIFETIME = "max_lifetime"
    CLIENT_DELETE = "client_delete"
    ADMIN = "admin"
    EVICTED = "evicted"
    UPSTREAM_GONE = "upstream_gone"
    RESTART = "restart"


class Relay(Protocol):
    """A stream the proxy is relaying for a session; closing the session aborts it."""

    long_lived: bool  # a GET stream (ended on shutdown), not a call's answer (drained)

    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Policy:
    """The expiry rules in force; replaced as a whole when the config is reloaded."""

    idle_timeout: float
    max_lifetime: float = 0.0  # 0 = off
    open_stream_keeps_alive: bool = False
    ignore_methods: frozenset[str] = frozenset()
    # A legacy-transport call whose answer never arrives on the stream stops keeping its
    # session alive after this long (upstream.read_timeout).
    call_timeout: float = 300.0


@dataclass(eq=False, slots=True)
class Session:
    id: str
    transport: Transport
    client: str
    created_at: float
    last_activity_at: float
    protocol_version: str | None = None
    persistent: bool = False
    user_agent: str = ""
    client_info: str = ""
    requests: int = 0
    state: State = State.LIVE
    close_reason: CloseReason | None = None
    closed_at: float | None = None
    # For the legacy transport: the upstream message URL the endpoint event named.
    upstream_endpoint: str | None = None
    # ---- in memory only -------------------------------------------------------------
    credentials: dict[str, str] = field(default_factory=dict, repr=False)
    in_flight: int = 0
    open_streams: int = 0
    relays: set[Relay] = field(default_factory=set, repr=False)
    server_pings: OrderedDict[RequestId, None] = field(default_factory=OrderedDict, repr=False)
    # Legacy transport: calls answered on the SSE stream, not on their POST (id -> start).
    pending_calls: dict[RequestId, float] = field(default_factory=dict, repr=False)

    @property
    def live(self) -> bool:
        return self.state is State.LIVE

    @property
    def short_id(self) -> str:
        return short(self.id)

    def idle_seconds(self, now: float) -> float:
        return max(0.0, now - self.last_activity_at)

    def kept_alive(self, policy: Policy) -> bool:
        """In-flight calls (and, if configured, open streams) suspend the idle clock."""
        return self.in_flight > 0 or (policy.open_stream_keeps_alive and self.open_streams > 0)

    def expires_at(self, policy: Policy) -> float | None:
        """When this session expires if nothing happens; None if it never does by time."""
        if self.persistent or not self.live:
            return None
        deadline = None if self.kept_alive(policy) else self.last_activity_at + policy.idle_timeout
        if policy.max_lifetime > 0:
            lifetime_end = self.created_at + policy.max_lifetime
            deadline = lifetime_end if deadline is None else min(deadline, lifetime_end)
        return deadline

    def expiry_reason(self, policy: Policy, now: float) -> CloseReason | None:
        """Why this session is expired at `now`, or None while it is still usable."""
        if self.persistent or not self.live:
            return None
        if policy.max_lifetime > 0 and now - self.created_at >= policy.max_lifetime:
            return CloseReason.MAX_LIFETIME
        if not self.kept_alive(policy) and now - self.last_activity_at > policy.idle_timeout:
            return CloseReason.IDLE_TIMEOUT
        return None

    def remember_server_ping(self, request_id: RequestId) -> None:
        self.server_pings[request_id] = None
        while len(self.server_pings) > MAX_REMEMBERED_PINGS:
            self.server_pings.popitem(last=False)

    def call_started(self, request_id: RequestId, now: float) -> None:
        """Legacy transport: a call is in flight until its answer shows up on the stream."""
        if request_id not in self.pending_calls:
            self.pending_calls[request_id] = now
            self.in_flight += 1

    def call_answered(self, request_id: RequestId) -> bool:
        if self.pending_calls.pop(request_id, None) is None:
            return False
        self.in_flight = max(0, self.in_flight - 1)
        return True

    def forget_stale_calls(self, now: float, policy: Policy) -> None:
        """A call the upstream never answered must not keep the session alive forever."""
        for request_id, started in list(self.pending_calls.items()):
            if now - started > policy.call_timeout:
                self.call_answered(request_id)

    def shows_use(self, batch: Batch, policy: Policy) -> bool:
        """SPEC 2.3: does this client POST move last activity?

        Requests and notifications count unless their method is ignored; responses count
        unless they answer a server `ping` the sidecar relayed (those ids are consumed here).
        """
        counts = any(m.method not in policy.ignore_methods for m in batch.calls)
        for response in batch.responses:
            assert response.id is not None
            if response.id in self.server_pings:
                del self.server_pings[response.id]
            else:
                counts = True
        return counts


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A closed session's id, kept so it keeps getting 404 (and to name stuck clients)."""

    id: str
    reason: CloseReason
    closed_at: float
    client: str
    label: str


def short(session_id: str) -> str:
    """The form a session id takes in logs: never the whole id (SPEC 2.5)."""
    return session_id[:8] + "…"


def valid_session_id(value: str) -> bool:
    """1 to 256 visible ASCII characters (0x21 to 0x7E), as the MCP transport spec requires."""
    return 0 < len(value) <= 256 and all(0x21 <= ord(c) <= 0x7E for c in value)
