"""The session model: what the sidecar knows about one MCP session, and when it expires.

A `Session` is the persisted record plus the rules that only need that data (expiry). Its
`runtime` holds what lives only in this process: credentials (never written to disk, SPEC
2.4), the streams being relayed, calls in flight, and the ids of server-initiated pings whose
answers must not count as activity (SPEC 2.3). The runtime is allocated on first use, so a
session nobody is using costs only its record.

The id a client holds is the session's key; the upstream session behind it is a `Binding`
that resuming can replace (SPEC 2.7). A dormant session has no binding: its upstream session
was closed, and the next request re-creates one from the stored `ResumeState`.
"""

from __future__ import annotations

import json
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from .deadlines import Bucket
from .jsonrpc import RequestId

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
    DORMANT = "dormant"  # hibernated: no upstream session, the client's id still answers
    CLOSED = "closed"


class CloseReason(StrEnum):
    IDLE_TIMEOUT = "idle_timeout"
    MAX_LIFETIME = "max_lifetime"
    CLIENT_DELETE = "client_delete"
    ADMIN = "admin"
    EVICTED = "evicted"
    UPSTREAM_GONE = "upstream_gone"
    RESTART = "restart"
    DORMANT_TTL = "dormant_ttl"
    RESUME_FAILED = "resume_failed"


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
    # SPEC 2.7: "close" ends an idle session; "hibernate" frees the upstream and keeps the id.
    idle_action: Literal["close", "hibernate"] = "close"
    dormant_ttl: float = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class Binding:
    """The upstream session behind a client's id: which upstream, and the id it issued."""

    upstream: str  # the upstream's name in the pool ("" = the only or first one)
    session_id: str


class ResumeState:
    """What re-creating the upstream session needs (SPEC 2.7), never credentials.

    `initialize` is the params object of the client's `initialize` request (protocol version,
    capabilities, `clientInfo`); the rest is the session-scoped setup the client sent after
    it, replayed in this order: the logging level, then each resource subscription. The
    params are held as compact JSON text: parsed, they cost several times the memory, and
    they are needed only on the rare resume.
    """

    __slots__ = ("initialize_json", "log_level", "subscriptions")

    def __init__(
        self,
        initialize: dict[str, Any] | str,
        log_level: str | None = None,
        subscriptions: list[str] | None = None,
    ) -> None:
        self.initialize_json = initialize if isinstance(initialize, str) else _compact(initialize)
        self.log_level = log_level
        self.subscriptions = list(subscriptions or [])

    @property
    def initialize(self) -> dict[str, Any]:
        params = json.loads(self.initialize_json)
        return params if isinstance(params, dict) else {}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResumeState):
            return NotImplemented
        return (self.initialize, self.log_level, self.subscriptions) == (
            other.initialize,
            other.log_level,
            other.subscriptions,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable: equal by value, never a key

    def __repr__(self) -> str:
        return (
            f"ResumeState(initialize={self.initialize_json}, log_level={self.log_level!r}, "
            f"subscriptions={self.subscriptions!r})"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> ResumeState:
        return ResumeState(self.initialize_json, self.log_level, self.subscriptions)

    def to_json(self) -> str:
        if self.log_level is None and not self.subscriptions:
            # Every new session's: the text `_compact` would make, without encoding it again.
            return _INITIALIZE_KEY + self.initialize_json + _NO_SETUP
        setup = _compact({"log_level": self.log_level, "subscriptions": self.subscriptions})
        return '{"initialize":' + self.initialize_json + "," + setup[1:]

    @classmethod
    def from_json(cls, text: str | None) -> ResumeState | None:
        if not text:
            return None
        if text.startswith(_INITIALIZE_KEY + "{"):
            # As `to_json` wrote it: the params' compact text is taken as it stands. Parsing
            # it and dumping it again was ~70% of reading a session back (a wake, a restore,
            # a slice of dormant sessions closed at their TTL).
            start = len(_INITIALIZE_KEY)
            initialize, end = _DECODER.raw_decode(text, start)
            if isinstance(initialize, dict) and text[end : end + 1] in (",", "}"):
                rest = json.loads("{" + text[end + 1 :]) if text[end] == "," else {}
                return cls(
                    text[start:end], rest.get("log_level"), list(rest.get("subscriptions") or [])
                )
        data = json.loads(text)
        initialize = data.get("initialize")
        return cls(
            initialize=initialize if isinstance(initialize, dict) else {},
            log_level=data.get("log_level"),
            subscriptions=list(data.get("subscriptions") or []),
        )


_INITIALIZE_KEY = '{"initialize":'
_NO_SETUP = ',"log_level":null,"subscriptions":[]}'
_DECODER = json.JSONDecoder()


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(eq=False, slots=True)
class Runtime:
    """A session's state in this process only; gone on restart, never persisted."""

    credentials: dict[str, str] = field(default_factory=dict, repr=False)
    in_flight: int = 0
    open_streams: int = 0
    relays: set[Relay] = field(default_factory=set, repr=False)
    server_pings: OrderedDict[RequestId, None] = field(default_factory=OrderedDict, repr=False)
    # Legacy transport: calls answered on the SSE stream, not on their POST (id -> start).
    pending_calls: dict[RequestId, float] = field(default_factory=dict, repr=False)


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
    # None while dormant; at creation the upstream's id is the client's (SPEC 2.7).
    binding: Binding | None = None
    resume: ResumeState | None = None
    dormant_since: float | None = None
    resumes: int = 0
    runtime: Runtime | None = field(default=None, repr=False)
    # The sweeper's index entry (`deadlines.py`); process-only, never copied to a new record.
    due: Bucket | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.binding is None and self.state is State.LIVE:
            self.binding = Binding("", self.id)
        # Thousands of sessions share a handful of these values (one client, one user agent,
        # one protocol version): one copy each instead of one per session (~200 B a session).
        self.client = sys.intern(self.client)
        self.user_agent = sys.intern(self.user_agent)
        self.client_info = sys.intern(self.client_info)
        if self.protocol_version is not None:
            self.protocol_version = sys.intern(self.protocol_version)

    # ---- the runtime, allocated on first use --------------------------------------------
    @property
    def rt(self) -> Runtime:
        if self.runtime is None:
            self.runtime = Runtime()
        return self.runtime

    @property
    def in_flight(self) -> int:
        return 0 if self.runtime is None else self.runtime.in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self.rt.in_flight = value

    @property
    def open_streams(self) -> int:
        return 0 if self.runtime is None else self.runtime.open_streams

    @open_streams.setter
    def open_streams(self, value: int) -> None:
        self.rt.open_streams = value

    @property
    def credentials(self) -> dict[str, str]:
        return {} if self.runtime is None else self.runtime.credentials

    @credentials.setter
    def credentials(self, value: dict[str, str]) -> None:
        if value or self.runtime is not None:
            self.rt.credentials = value

    @property
    def relays(self) -> set[Relay]:
        return self.rt.relays

    @property
    def server_pings(self) -> OrderedDict[RequestId, None]:
        return self.rt.server_pings

    @property
    def pending_calls(self) -> dict[RequestId, float]:
        return self.rt.pending_calls

    @property
    def has_pending_calls(self) -> bool:
        return self.runtime is not None and bool(self.runtime.pending_calls)

    # ---- the record's rules -------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.state is State.LIVE

    @property
    def dormant(self) -> bool:
        return self.state is State.DORMANT

    @property
    def usable(self) -> bool:
        """Live or dormant: the client's id still answers."""
        return self.state is not State.CLOSED

    @property
    def short_id(self) -> str:
        return short(self.id)

    @property
    def upstream_id(self) -> str | None:
        return None if self.binding is None else self.binding.session_id

    def idle_seconds(self, now: float) -> float:
        return max(0.0, now - self.last_activity_at)

    def kept_alive(self, policy: Policy) -> bool:
        """In-flight calls (and, if configured, open streams) suspend the idle clock."""
        return self.in_flight > 0 or (policy.open_stream_keeps_alive and self.open_streams > 0)

    def expires_at(self, policy: Policy) -> float | None:
        """When this session expires if nothing happens; None if it never does by time."""
        if self.dormant:
            return self._dormant_deadline(policy)
        if self.persistent or not self.live:
            return None
        deadline = None if self.kept_alive(policy) else self.last_activity_at + policy.idle_timeout
        if policy.max_lifetime > 0:
            lifetime_end = self.created_at + policy.max_lifetime
            deadline = lifetime_end if deadline is None else min(deadline, lifetime_end)
        return deadline

    def _dormant_deadline(self, policy: Policy) -> float:
        end = (self.dormant_since or self.last_activity_at) + policy.dormant_ttl
        if policy.max_lifetime > 0:
            end = min(end, self.created_at + policy.max_lifetime)
        return end

    def expiry_reason(self, policy: Policy, now: float) -> CloseReason | None:
        """Why this session is expired at `now`, or None while it is still usable.

        A dormant session ends for good at `max_lifetime` or `dormant_ttl`; a live one at
        `max_lifetime`, or goes idle (to be closed, or hibernated, by `idle_action`).
        """
        if self.state is State.CLOSED or (self.persistent and self.live):
            return None
        if policy.max_lifetime > 0 and now - self.created_at >= policy.max_lifetime:
            return CloseReason.MAX_LIFETIME
        if self.dormant:
            return CloseReason.DORMANT_TTL if now >= self._dormant_deadline(policy) else None
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
        if not self.has_pending_calls:
            return
        for request_id, started in list(self.pending_calls.items()):
            if now - started > policy.call_timeout:
                self.call_answered(request_id)


class Dormant(float):
    """A hibernated session as memory holds it until a request (or an admin) needs it whole.

    At 100,000 dormant sessions the full `Session` cost ~430 B each; this record keeps only
    what deciding about a dormant id needs without the store: who may use it (`client`),
    how it is named in a tombstone (`label`), and its deadline (`created_at` for
    `max_lifetime`, the float's own value for `dormant_since`). A float subclass holds its
    number inline: one object where a slot would point to a second one (24 B a session).
    The rest (resume state, counters, user agent) is in the store; `SessionManager` reads
    it back, once, when the id is used. Compared and hashed by identity, never as a number:
    the sessions one sweep hibernates share their `dormant_since`.
    """

    __slots__ = ("client", "created_at", "due", "id", "label")
    id: str
    client: str
    label: str
    created_at: float
    # The sweeper's index entry (`deadlines.py`), as on a `Session`.
    due: Bucket | None

    def __new__(
        cls, session_id: str, client: str, label: str, created_at: float, dormant_since: float
    ) -> Dormant:
        record = super().__new__(cls, dormant_since)
        record.id = session_id
        # Many sessions share one client and one label: one copy each.
        record.client = sys.intern(client)
        record.label = sys.intern(label)
        record.created_at = created_at
        record.due = None
        return record

    @classmethod
    def of(cls, session: Session, label: str) -> Dormant:
        since = session.dormant_since or session.last_activity_at
        return cls(session.id, session.client, label, session.created_at, since)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def __hash__(self) -> int:
        return object.__hash__(self)

    def __bool__(self) -> bool:
        return True  # a record, even one dormant since 0.0 (a test's clock): `a or b` holds

    def __repr__(self) -> str:
        return f"Dormant({short(self.id)}, since={self.dormant_since})"

    @property
    def dormant_since(self) -> float:
        return float(self)

    def expires_at(self, policy: Policy) -> float:
        """The end of a dormant session, as `Session.expires_at` reckons it."""
        end = self.dormant_since + policy.dormant_ttl
        if policy.max_lifetime > 0:
            end = min(end, self.created_at + policy.max_lifetime)
        return end

    def expiry_reason(self, policy: Policy, now: float) -> CloseReason | None:
        """As `Session.expiry_reason` for a dormant session."""
        if policy.max_lifetime > 0 and now - self.created_at >= policy.max_lifetime:
            return CloseReason.MAX_LIFETIME
        return CloseReason.DORMANT_TTL if now >= self.expires_at(policy) else None

    def stand_in(self) -> Session:
        """The session as far as memory knows it, for an id whose row the store lost: it
        answers, and ends, as it did when the whole record stayed in memory. The label
        stands in for the user agent (the parts it was made of are in the lost row)."""
        return Session(
            id=self.id,
            transport=Transport.STREAMABLE_HTTP,  # only those hibernate
            client=self.client,
            created_at=self.created_at,
            last_activity_at=self.dormant_since,
            user_agent="" if self.label == "unknown" else self.label,
            state=State.DORMANT,
            dormant_since=self.dormant_since,
        )


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


# One C-level scan: checked on every request naming a session (a per-character generator
# was ~3% of the fast path's CPU).
_SESSION_ID = re.compile(r"[\x21-\x7e]{1,256}")


def valid_session_id(value: str) -> bool:
    """1 to 256 visible ASCII characters (0x21 to 0x7E), as the MCP transport spec requires."""
    return _SESSION_ID.fullmatch(value) is not None
