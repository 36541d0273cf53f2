"""The session table and every decision about it: look up, admit, create, touch, close.

The proxy, the sweeper and the admin API all act through one `SessionManager`, so a rule
(expiry, binding, limits, closing) is written once. The per-request methods (`resolve`,
`touch`, `begin_call`) are synchronous and touch no SQL: activity is marked dirty and written
behind by `flush()`. Creating and closing await the store, because SPEC 2.6 wants both
committed before the client hears about them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from .aio import uncancellable
from .clients import StuckClients, client_label
from .closer import UpstreamCloser
from .errors import StoreError
from .log import Throttled
from .metrics import Metrics
from .sessions import (
    ACTIVE_WINDOW,
    CloseReason,
    Policy,
    Session,
    State,
    Tombstone,
    Transport,
)
from .store import ActivityRow, PendingClose, Store

log = logging.getLogger("sidecar.sessions")

# Closed ids kept in memory to answer 404 and name stuck clients (~300 bytes each, so about
# 60 MB at the cap); older ones live on in the store until tombstone_ttl.
MAX_TOMBSTONES_IN_MEMORY = 200_000

Clock = Callable[[], float]


class Outcome(StrEnum):
    """What a session id resolves to; the non-LIVE values are also rejection reasons."""

    LIVE = "live"
    EXPIRED = "expired"  # expired now, or closed earlier (tombstone)
    UNKNOWN = "unknown"
    BINDING = "binding"  # exists, but belongs to another client identity


@dataclass(frozen=True, slots=True)
class Resolution:
    outcome: Outcome
    session: Session | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int = 0
    max_sessions_per_client: int = 0
    on_limit: Literal["reject", "evict_idle"] = "reject"
    bind_to: Literal["identity", "none"] = "identity"
    persistent_default: bool = False


class LimitReachedError(Exception):
    """`initialize` refused: the session limit is reached and `on_limit` is "reject"."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__(f"session limit reached ({scope})")


class SessionManager:
    def __init__(
        self,
        store: Store,
        closer: UpstreamCloser,
        metrics: Metrics,
        *,
        policy: Policy,
        limits: Limits,
        tombstone_ttl: float,
        clock: Clock = time.time,
    ) -> None:
        self.store = store
        self.closer = closer
        self.metrics = metrics
        self.policy = policy
        self.limits = limits
        self.tombstone_ttl = tombstone_ttl
        self.clock = clock
        self.live: dict[str, Session] = {}
        # Oldest first (insertion order is closing order), so expiry and the cap pop the front.
        self.tombstones: OrderedDict[str, Tombstone] = OrderedDict()
        self.stuck = StuckClients()
        self._per_client: Counter[str] = Counter()
        self._reserved = 0  # initializes admitted but not yet answered (limit accounting)
        self._pending: Counter[str] = Counter()  # the same, per client identity
        # Closes the store refused (disk full, locked): rewritten by every flush until it works.
        self._unpersisted_closes: list[tuple[Session, PendingClose | None]] = []
        self._store_log = Throttled(log)
        self._dirty: set[str] = set()
        metrics.bind_session_counts(
            lambda: {"live": len(self.live), "closed": len(self.tombstones)}
        )

    # ---- request path ------------------------------------------------------------------
    async def resolve(self, session_id: str, identity: str) -> Resolution:
        """Map a request's session id to a live session, closing it if it just expired.

        Expiry is decided here, at request time, so an expired id never reaches the upstream
        even if the sweeper has not run yet (SPEC 2.4).
        """
        session = self.live.get(session_id)
        if session is None:
            tombstone = self.tombstones.get(session_id)
            if tombstone is None:
                return Resolution(Outcome.UNKNOWN)
            self.stuck.record(tombstone.label, session_id, self.clock())
            return Resolution(Outcome.EXPIRED)
        if self.limits.bind_to == "identity" and session.client != identity:
            return Resolution(Outcome.BINDING)
        now = self.clock()
        if session.pending_calls:
            session.forget_stale_calls(now, self.policy)
        reason = session.expiry_reason(self.policy, now)
        if reason is not None:
            await self.close(session, reason)
            self.stuck.record(_label(session), session_id, self.clock())
            return Resolution(Outcome.EXPIRED)
        return Resolution(Outcome.LIVE, session)

    def touch(self, session: Session) -> None:
        """Record client activity (SPEC 2.3); written to the store by the next flush."""
        session.last_activity_at = self.clock()
        self._dirty.add(session.id)

    def count_request(self, session: Session) -> None:
        session.requests += 1
        self._dirty.add(session.id)

    def begin_call(self, session: Session) -> None:
        session.in_flight += 1

    def abandon_call(self, session: Session) -> None:
        """A call that never reached the upstream: undone, and not activity."""
        session.in_flight = max(0, session.in_flight - 1)

    def end_call(self, session: Session) -> None:
        """A call finished: it kept the session alive, and its end is activity too."""
        session.in_flight = max(0, session.in_flight - 1)
        if session.live:
            self.touch(session)

    # ---- creation ----------------------------------------------------------------------
    async def admit(self, identity: str) -> None:
        """Make room for one more session, or raise LimitReachedError (SPEC 2.5).

        The check, any eviction's in-memory close and the reservation happen with no await
        in between, so concurrent initializes at the limit can never overshoot it; only the
        evicted sessions' store write is awaited afterwards.
        """
        now = self.clock()
        victims = self._reserve(identity, now)
        if victims:
            try:
                await uncancellable(self._persist_closes(victims, CloseReason.EVICTED, False, now))
            except BaseException:
                self.release(identity)  # the caller only releases what admit() returned from
                raise

    def _reserve(self, identity: str, now: float) -> list[Session]:
        """Choose every victim first, close them in memory only if all limits can be met."""
        victims: list[Session] = []
        for scope, limit, owner in (
            ("max_sessions", self.limits.max_sessions, None),
            ("max_sessions_per_client", self.limits.max_sessions_per_client, identity),
        ):
            freed = sum(1 for v in victims if owner is None or v.client == owner)
            if limit <= 0 or self._used(owner) - freed < limit:
                continue
            victim = (
                self._eviction_candidate(owner, victims)
                if self.limits.on_limit == "evict_idle"
                else None
            )
            if victim is None:
                raise LimitReachedError(scope)
            victims.append(victim)
        for victim in victims:
            self._mark_closed(victim, CloseReason.EVICTED, now)
        self._reserved += 1
        self._pending[identity] += 1
        return victims

    def _used(self, owner: str | None) -> int:
        """Sessions and admitted-but-unanswered initializes, in all or one client's scope."""
        if owner is None:
            return len(self.live) + self._reserved
        return self._per_client[owner] + self._pending[owner]

    def release(self, identity: str) -> None:
        """The admitted `initialize` of `identity` is over (session created or not)."""
        self._reserved = max(0, self._reserved - 1)
        self._pending[identity] -= 1
        if self._pending[identity] <= 0:
            del self._pending[identity]

    def _eviction_candidate(self, owner: str | None, taken: list[Session]) -> Session | None:
        candidates = [
            s
            for s in self.live.values()
            if not s.persistent
            and s.in_flight == 0
            and (owner is None or s.client == owner)
            and s not in taken
        ]
        return min(candidates, key=lambda s: s.last_activity_at, default=None)

    async def create(
        self,
        session_id: str,
        transport: Transport,
        identity: str,
        *,
        protocol_version: str | None,
        user_agent: str = "",
        client_info: str = "",
        credentials: dict[str, str] | None = None,
        upstream_endpoint: str | None = None,
    ) -> Session:
        """Track a session the upstream just created; committed before this returns.

        Shielded: if the client disconnects mid-way, the session is still tracked (and will
        be expired and closed upstream) rather than left in the store but not in memory.
        """
        now = self.clock()
        session = Session(
            id=session_id,
            transport=transport,
            client=identity,
            created_at=now,
            last_activity_at=now,
            protocol_version=protocol_version,
            persistent=self.limits.persistent_default,
            user_agent=user_agent,
            client_info=client_info,
            requests=1,
            credentials=credentials or {},
            upstream_endpoint=upstream_endpoint,
        )
        return await uncancellable(self._register(session))

    async def _register(self, session: Session) -> Session:
        await self.store.insert(session)
        session_id, identity = session.id, session.client
        self.tombstones.pop(session_id, None)
        self.live[session_id] = session
        self._per_client[identity] += 1
        self.metrics.sessions_created.inc()
        log.info(
            "created session %s transport=%s client=%s",
            session.short_id,
            session.transport.value,
            _label(session),
        )
        return session

    # ---- closing -----------------------------------------------------------------------
    async def close(
        self, session: Session, reason: CloseReason, *, upstream_done: bool = False
    ) -> None:
        await self.close_many([session], reason, upstream_done=upstream_done)

    async def close_many(
        self, sessions: Iterable[Session], reason: CloseReason, *, upstream_done: bool = False
    ) -> None:
        """Close sessions: 404 from now on, streams aborted, upstream DELETE owed.

        The in-memory state flips first, so a request racing the store write already gets
        404; the store write then makes the close durable before callers acknowledge it.
        """
        now = self.clock()
        closing = [s for s in sessions if s.live]
        for session in closing:
            self._mark_closed(session, reason, now)
        await uncancellable(self._persist_closes(closing, reason, upstream_done, now))

    async def _persist_closes(
        self, closing: list[Session], reason: CloseReason, upstream_done: bool, now: float
    ) -> None:
        """One transaction for all of them; the upstream DELETEs go out whatever the disk says.

        When the store refuses the write (disk full, locked), the sessions stay closed in
        memory, their closes are queued for the flusher to write once the store works again,
        and the DELETEs owed are handed to the closer now: memory and disk then disagree only
        while a DELETE is owed, never silently (SPEC 2.5). Should the process die before the
        retry lands, the restored session is live on disk, expires again and is closed again.
        """
        closes = [(s, self._pending_close(s, reason, upstream_done, now)) for s in closing]
        try:
            await self.store.mark_closed_many(closes)
        except StoreError as exc:
            self.store_failed("close", exc)
            self._unpersisted_closes.extend(closes)
        for session, pending in closes:
            if pending is not None:
                self.closer.schedule(pending, session.credentials)
            session.credentials = {}
            self.metrics.sessions_closed.labels(reason.value).inc()
            log.info(
                "closed session %s reason=%s idle=%ds",
                session.short_id,
                reason.value,
                session.idle_seconds(now),
            )

    def store_failed(self, operation: str, exc: StoreError) -> None:
        """Count and log (throttled) a store write that failed; the caller keeps its data."""
        self.metrics.store_errors.labels(operation).inc()
        self._store_log.warning(operation, "store write (%s) failed: %s", operation, exc)

    async def _retry_unpersisted_closes(self) -> None:
        if not self._unpersisted_closes:
            return
        closes, self._unpersisted_closes = self._unpersisted_closes, []
        try:
            await self.store.mark_closed_many(closes)
        except StoreError:
            self._unpersisted_closes = closes + self._unpersisted_closes
            raise
        log.info("store works again: %d closes written", len(closes))

    def _mark_closed(self, session: Session, reason: CloseReason, now: float) -> None:
        session.state = State.CLOSED
        session.close_reason = reason
        session.closed_at = now
        self.live.pop(session.id, None)
        self._dirty.discard(session.id)
        self._per_client[session.client] -= 1
        if self._per_client[session.client] <= 0:
            del self._per_client[session.client]
        self._remember(Tombstone(session.id, reason, now, session.client, _label(session)))
        for relay in list(session.relays):
            relay.abort()
        session.relays.clear()

    def _pending_close(
        self, session: Session, reason: CloseReason, upstream_done: bool, now: float
    ) -> PendingClose | None:
        """Streamable HTTP sessions are closed upstream with a DELETE (SPEC 2.4).

        Legacy SSE sessions are closed by aborting their stream (done in _mark_closed); an
        upstream that already said the session is gone, or answered the client's own
        DELETE, is owed nothing.
        """
        if upstream_done or session.transport is not Transport.STREAMABLE_HTTP:
            return None
        if reason is CloseReason.UPSTREAM_GONE:
            return None
        return PendingClose(session.id, session.protocol_version, 0, now)

    async def set_persistent(self, session: Session, persistent: bool) -> None:
        await self.store.set_persistent(session.id, persistent)
        session.persistent = persistent

    # ---- background work (sweeper, flusher, start-up) ------------------------------------
    async def sweep(self) -> int:
        """Close every expired session; returns how many were closed."""
        now = self.clock()
        by_reason: dict[CloseReason, list[Session]] = {}
        for session in list(self.live.values()):
            session.forget_stale_calls(now, self.policy)
            reason = session.expiry_reason(self.policy, now)
            if reason is not None:
                by_reason.setdefault(reason, []).append(session)
        for reason, sessions in by_reason.items():
            await self.close_many(sessions, reason)
        self._forget_old_tombstones(now)
        return sum(len(s) for s in by_reason.values())

    def _remember(self, tombstone: Tombstone) -> None:
        """Keep a closed id answering 404, within a memory bound.

        Past MAX_TOMBSTONES_IN_MEMORY the oldest are forgotten here (they stay in the store
        until tombstone_ttl): a forgotten id resolves as unknown, which gets the same 404
        under `unknown = "reject"`, and is judged by the upstream under "forward".
        """
        self.tombstones.pop(tombstone.id, None)
        self.tombstones[tombstone.id] = tombstone
        while len(self.tombstones) > MAX_TOMBSTONES_IN_MEMORY:
            self.tombstones.popitem(last=False)

    def _forget_old_tombstones(self, now: float) -> None:
        horizon = now - self.tombstone_ttl
        while self.tombstones:
            oldest = next(iter(self.tombstones.values()))
            if oldest.closed_at >= horizon:
                break
            self.tombstones.popitem(last=False)

    async def purge_tombstones(self) -> int:
        count = await self.store.purge_tombstones(self.clock() - self.tombstone_ttl)
        if count:
            log.info(
                "purged %d closed sessions older than tombstone_ttl=%ds", count, self.tombstone_ttl
            )
        return count

    async def flush(self) -> int:
        """Write all pending activity in one transaction (SPEC 2.6 write-behind)."""
        try:
            await uncancellable(self._retry_unpersisted_closes())
        except StoreError as exc:
            self.store_failed("close", exc)
            return 0
        if not self._dirty:
            return 0
        dirty, self._dirty = self._dirty, set()
        rows = [
            ActivityRow(s.id, s.last_activity_at, s.requests, s.protocol_version, s.client_info)
            for s in (self.live.get(i) for i in dirty)
            if s is not None
        ]
        start = time.perf_counter()
        try:
            await self.store.write_activity(rows)
        except StoreError as exc:
            self._dirty |= dirty  # try again next time rather than lose the activity
            self.store_failed("activity", exc)
            return 0
        except Exception:
            self._dirty |= dirty
            raise
        self.metrics.store_flush_duration.observe(time.perf_counter() - start)
        return len(rows)

    async def restore(self) -> None:
        """Pick up where the last run left off (SPEC 2.6)."""
        now = self.clock()
        closed = await self.store.load(State.CLOSED, now - self.tombstone_ttl)
        for tombstone_session in sorted(closed, key=lambda s: s.closed_at or 0.0):
            assert tombstone_session.close_reason is not None
            assert tombstone_session.closed_at is not None
            self._remember(
                Tombstone(
                    tombstone_session.id,
                    tombstone_session.close_reason,
                    tombstone_session.closed_at,
                    tombstone_session.client,
                    _label(tombstone_session),
                )
            )
        # Read before closing anything below: those closes schedule their own DELETEs, and
        # reading after would schedule each of them a second time.
        owed = await self.store.pending_closes()
        restored = await self.store.load(State.LIVE)
        for session in restored:
            self.live[session.id] = session
            self._per_client[session.client] += 1
        legacy = [s for s in restored if s.transport is Transport.SSE]
        await self.close_many(legacy, CloseReason.RESTART)
        expired = await self.sweep()
        for pending in owed:
            self.closer.schedule(pending, {})
        log.info(
            "restored %d live sessions (%d expired while stopped, %d legacy closed), %d tombstones",
            len(self.live),
            expired,
            len(legacy),
            len(self.tombstones),
        )

    # ---- views ---------------------------------------------------------------------------
    def health_counts(self) -> dict[str, object]:
        now = self.clock()
        live = list(self.live.values())
        active = sum(
            1 for s in live if now - s.last_activity_at <= ACTIVE_WINDOW or s.in_flight > 0
        )
        return {
            "live": len(live),
            "active": active,
            "idle": len(live) - active,
            "persistent": sum(1 for s in live if s.persistent),
            "by_client": dict(self._per_client),
        }


def _label(session: Session) -> str:
    return client_label(session.user_agent, session.client_info)
