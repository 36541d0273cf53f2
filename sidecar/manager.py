"""The session table and every decision about it: look up, admit, create, touch, close,
hibernate and resume.

The transports, the sweeper and the admin API all act through one `SessionManager`, so a rule
(expiry, binding, limits, closing) is written once, and nothing else changes a session's
fields. Limit accounting lives in `admission.py`, closed ids in `tombstones.py`, dormant ids
(held compact until used) in `dormant.py`.
The per-request methods (`resolve`, `touch`, `begin_call`) are synchronous and touch no SQL:
activity is marked dirty and written behind by `flush()`. Creating, closing, hibernating and
resuming await the store, because SPEC 2.6 wants them committed before the client hears.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

from .activity import Use
from .admission import Admission, LimitReachedError, Limits
from .aio import uncancellable
from .clients import StuckClients, client_label
from .closer import UpstreamCloser
from .deadlines import Deadlines, Scheduled
from .dormant import DormantSessions
from .errors import StoreError
from .jsonrpc import Batch, RequestId, ends_handshake
from .log import Throttled
from .metrics import Metrics
from .pacing import TURN_LIMIT, Pacing, yield_turn
from .peer_events import Event, closed, moved, pinned
from .sessions import (
    ACTIVE_WINDOW,
    Binding,
    CloseReason,
    Dormant,
    Policy,
    ResumeState,
    Session,
    State,
    Tombstone,
    Transport,
    short,
)
from .store import ActivityRow, PendingClose, Store
from .tombstones import MAX_TOMBSTONES_IN_MEMORY, Tombstones

log = logging.getLogger("sidecar.sessions")

__all__ = [
    "MAX_TOMBSTONES_IN_MEMORY",
    "Clock",
    "CloseListener",
    "LimitReachedError",
    "Limits",
    "Outcome",
    "Resolution",
    "SessionManager",
]

Clock = Callable[[], float]
CloseListener = Callable[[Session, CloseReason, float], None]

# Sessions ended per store transaction when many expire at once: each slice's write yields to
# the event loop, so a mass expiry never stalls the requests being served meanwhile.
SWEEP_SLICE = 500
# Sessions whose close is announced (DELETE queued, metrics, log line, listeners) between two
# turns of the event loop at most: ~20 us each, so a slice of 500 in one go held the loop
# ~10 ms on a quiet machine and far longer on a busy one, while requests waited. A turn also
# ends once it used `pacing.TURN_BUDGET`, whichever comes first (`self.pacing`).
ANNOUNCE_RUN = TURN_LIMIT
# Dirty sessions turned into activity rows between two turns of the event loop (~1 us each).
FLUSH_RUN = 1000
# Sessions read back per slice of the restore at start: each slice is one short query and
# its records built on the loop, so requests are served between slices (500 held the loop
# 13-14 ms at 100,000 sessions, 250 holds it 5-9 ms; the restore takes no longer).
RESTORE_SLICE = 250


class Outcome(StrEnum):
    """What a session id resolves to; the non-LIVE values are also rejection reasons."""

    LIVE = "live"
    EXPIRED = "expired"  # expired now, or closed earlier (tombstone)
    UNKNOWN = "unknown"
    BINDING = "binding"  # exists, but belongs to another client identity
    DORMANT = "dormant"  # hibernated: the next request resumes it (SPEC 2.7)


@dataclass(frozen=True, slots=True)
class Resolution:
    outcome: Outcome
    session: Session | None = None


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
        self.limits = limits
        self.tombstone_ttl = tombstone_ttl
        self.clock = clock
        self.live: dict[str, Session] = {}  # sessions with an upstream binding
        self.dormant = DormantSessions()
        # Sessions being hibernated, whole, until the store has their resume state: a request
        # for one meanwhile takes this object rather than read a row not written yet.
        self._hibernating: dict[str, Session] = {}
        self.tombstones = Tombstones()
        self.stuck = StuckClients()
        self.admission = Admission()
        # Closes the store refused (disk full, locked): rewritten by every flush until it works.
        self._unpersisted_closes: list[tuple[Session, PendingClose | None]] = []
        self._store_log = Throttled(log)
        # Dirty ids as dicts (values None), not sets: a dict of strings is not tracked by the
        # garbage collector, a set always is, and every young collection walked the new
        # dirty set whole, up to 100,000 ids in a burst (~4 ms each, a few times a flush).
        self._dirty: dict[str, None] = {}
        self._resume_dirty: dict[str, None] = {}
        # The sweeper's work list: sessions by when they could first expire, and those whose
        # idle clock is suspended (calls in flight, a stream that keeps them alive), which
        # have no deadline until that ends and so are looked at on every sweep.
        self._deadlines = Deadlines()
        self._kept: set[Session] = set()
        self._policy = policy
        # Tells the other sidecars on a shared store (SPEC 2.8; `peers.py` wires it): queues,
        # never blocks. Alone on its store the sidecar tells nobody.
        self.announce: Callable[[Event], None] = _tell_nobody
        # Called with (session, reason, now) after each close is logged: the status page's
        # recent closes. A listener must be cheap and must not raise.
        self.close_listeners: list[CloseListener] = []
        # Called between the slices of a sweep. The server passes `heap.settle`: a mass
        # expiry of 100,000 runs for many seconds, and the records it creates meanwhile
        # (tombstones, owed DELETEs) made each full garbage collection in it walk more of
        # them, 80-100 ms with the loop stopped, again and again.
        self.between_slices: Callable[[], None] = _nothing
        # The turns mass closes and hibernations are cut into (time and count; see pacing.py).
        self.pacing = Pacing()
        # The restore at start runs behind an open port (`restore`): while it does, an id not
        # in memory yet is read from the store, as on a shared store, so it gets the answer
        # it will get once restored; `_counted` is set once every live session is in memory
        # (the limits wait for it), `restored` once the restore has ended.
        self.restoring = False
        self.restored = asyncio.Event()
        self._counted = asyncio.Event()
        self._counted.set()
        # Dropped from memory while restoring (a claim lost on a shared store): a slice read
        # before that must not bring the stale copy back.
        self._dropped: set[str] = set()
        metrics.bind_session_counts(
            lambda: {
                "live": len(self.live),
                "dormant": len(self.dormant),
                "closed": len(self.tombstones),
            }
        )

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """A reload may move deadlines earlier (a shorter idle_timeout): file every session
        again under the new rules; the entries left behind are dropped as stale."""
        self._policy = policy
        for session in [*self.live.values(), *self.dormant]:
            self._schedule(session)

    def _schedule(self, session: Session | Dormant) -> None:
        """File a session under the earliest time it could expire (SPEC 2.4)."""
        if isinstance(session, Session) and session.live and session.kept_alive(self._policy):
            self._kept.add(session)
        deadline = session.expires_at(self._policy)
        if deadline is not None:
            self._deadlines.schedule(session, deadline)

    # ---- request path ------------------------------------------------------------------
    async def resolve(self, session_id: str, identity: str) -> Resolution:
        """Map a request's session id to a live (or dormant) session, ending it if it just
        expired.

        Expiry is decided here, at request time, so an expired id never reaches the upstream
        even if the sweeper has not run yet (SPEC 2.4). A live session that went idle under
        `idle_action = "hibernate"` is hibernated here and resolves as dormant.
        """
        held = self.live.get(session_id) or self.dormant.get(session_id)
        if isinstance(held, Dormant) and self._foreign(held.client, identity):
            return Resolution(Outcome.BINDING)  # told without reading the store
        session = await self._whole(session_id)
        if session is None and self._reads_store and self.tombstones.get(session_id) is None:
            session = await self._adopt(session_id)
        if session is None:
            tombstone = self.tombstones.get(session_id)
            if tombstone is None:
                return Resolution(Outcome.UNKNOWN)
            self.stuck.record(tombstone.label, session_id, self.clock())
            return Resolution(Outcome.EXPIRED)
        if self._foreign(session.client, identity):
            return Resolution(Outcome.BINDING)
        now = self.clock()
        session.forget_stale_calls(now, self.policy)
        reason = session.expiry_reason(self.policy, now)
        if reason is CloseReason.IDLE_TIMEOUT and self.store.shared:
            await self._merge_uses([session])  # another sidecar may have served it since
            reason = session.expiry_reason(self.policy, now)
        if reason is not None and self._hibernates(session, reason):
            await self.hibernate_many([session], waking=session)  # the request wakes it
        elif reason is not None:
            await self.close(session, reason)
            self.stuck.record(_label(session), session_id, self.clock())
            return Resolution(Outcome.EXPIRED)
        return Resolution(Outcome.DORMANT if session.dormant else Outcome.LIVE, session)

    def _foreign(self, client: str, identity: str) -> bool:
        return self.limits.bind_to == "identity" and client != identity

    async def _whole(self, session_id: str) -> Session | None:
        """The live or dormant session held for an id, whole: a dormant one held compact is
        read back from the store first (once; later requests share it). Raises `StoreError`
        when the store cannot answer: the client must hear "retry later" (503), as when a
        wake reads the resume state."""
        while isinstance(
            held := self.live.get(session_id) or self.dormant.get(session_id), Dormant
        ):
            await self._read_back(held)
        return held

    async def _read_back(self, record: Dormant) -> None:
        """Replace a compact dormant record by the whole session, as the store holds it now."""
        whole = self._hibernating.get(record.id)
        if whole is not None:
            self._replace_record(record, whole)
            return
        try:
            stored = await self.store.get(record.id)
        except StoreError as exc:
            self.store_failed("read", exc)
            raise
        self._replace_record(record, stored)

    async def _read_back_many(self, records: list[Dormant]) -> None:
        """As `_read_back` for a slice of records, in one read (`Store.get_many`): a read
        each made closing 100,000 whose TTL ran out together ~5x slower."""
        whole = {r.id: self._hibernating[r.id] for r in records if r.id in self._hibernating}
        reading = [r for r in records if r.id not in whole]
        stored: dict[str, Session] = {}
        try:
            # In runs, as closes are announced: building 500 records at once held the loop.
            for first in range(0, len(reading), ANNOUNCE_RUN):
                run = reading[first : first + ANNOUNCE_RUN]
                stored.update(await self.store.get_many([r.id for r in run]))
        except StoreError as exc:
            self.store_failed("read", exc)
            raise
        for record in reading:
            self._replace_record(record, stored.get(record.id))
        for record in records:
            if record.id in whole:
                self._replace_record(record, whole[record.id])

    def _replace_record(self, record: Dormant, stored: Session | None) -> None:
        if self.dormant.get(record.id) is not record:
            return  # decided meanwhile (read back, closed, woken): the caller looks again
        whole = record.stand_in() if stored is None else stored
        self.dormant.remove(record.id)
        self._deadlines.unschedule(record)
        if whole.dormant:
            self.dormant.add(whole)
            self._schedule(whole)
        else:
            self._take(whole)  # another sidecar closed or woke it (SPEC 2.8)

    def held(self, session_id: str, identity: str) -> Session | None:
        """The live session `resolve()` would answer LIVE for with nothing to do first, or None.

        Synchronous, for the fast path: anything `resolve()` would act on (adopt from a shared
        store, close or hibernate an expired session, forget stale legacy calls) is None here,
        and the request takes the full path instead."""
        session = self.live.get(session_id)
        if session is None or not session.live or session.has_pending_calls:
            return None
        if self._foreign(session.client, identity):  # `resolve`'s binding rule, the one
            return None
        if session.expiry_reason(self.policy, self.clock()) is not None:
            return None
        return session

    async def _adopt(self, session_id: str) -> Session | None:
        """SPEC 2.8: a session another sidecar on the same store created (or resumed) is
        served here too, bound to the same upstream session; read once, then held.

        A store that cannot answer raises (`StoreError`): the id may be a live session of
        another sidecar, so the client must hear "retry later" (503), never "gone" (404).
        """
        try:
            stored = await self.store.get(session_id)
        except StoreError as exc:
            self.store_failed("read", exc)
            raise
        if self.live.get(session_id) or self.dormant.get(session_id):
            return await self._whole(session_id)  # adopted by a concurrent request meanwhile
        if stored is None:
            return None
        if not self._take(stored):
            return None
        if self.restoring and self._died_with_last_run(stored):
            await self.close(stored, CloseReason.RESTART)  # as its restore slice would
            return None
        return stored

    def _take(self, stored: Session) -> bool:
        """Hold a session as the store has it: live or dormant; False when it is closed (a
        tombstone from now on)."""
        if stored.state is State.CLOSED:
            assert stored.close_reason is not None
            assert stored.closed_at is not None
            self.tombstones.remember(
                Tombstone(
                    stored.id, stored.close_reason, stored.closed_at, stored.client, _label(stored)
                )
            )
            return False
        if stored.live:
            self.live[stored.id] = stored
            self.admission.bound(stored.client)
        else:
            self.dormant.add(stored)
        self._schedule(stored)
        return True

    def _died_with_last_run(self, session: Session) -> bool:
        """A legacy session restored live: alone on its store, this process's last run held
        every legacy stream, and they died with it. On a shared store another sidecar may be
        relaying it now: one of a sidecar that died expires like any idle session instead."""
        return session.live and session.transport is Transport.SSE and not self.store.shared

    async def _merge_uses(self, sessions: list[Session]) -> None:
        """Take the later last use the store holds: another sidecar's flushed activity."""
        try:
            stored = await self.store.last_uses([s.id for s in sessions])
        except StoreError as exc:
            self.store_failed("read", exc)  # the claim that follows fails the same way
            return
        for session in sessions:
            last = stored.get(session.id)
            if last is not None and last > session.last_activity_at:
                session.last_activity_at = last

    async def _claimed(self, sessions: list[Session]) -> list[Session]:
        """SPEC 2.8: of the sessions to close or hibernate, those this sidecar won the claim
        for; it alone sends their DELETEs. The others are dropped from memory: another
        sidecar closed or resumed them, and the next request reads what it wrote."""
        if not sessions:
            return sessions
        claims = [(s.id, None if s.binding is None else s.binding.session_id) for s in sessions]
        try:
            won = await self.store.claim(claims)
        except StoreError as exc:
            self.store_failed("claim", exc)
            for session in sessions:
                self._schedule(session)  # tried again by the next sweep
            return []
        # Closed meanwhile (another sidecar's event, a racing request): not again.
        current = [s for s in sessions if s.usable]
        for session in current:
            if session.id not in won:
                self._unlist(session, session.live)
        return [s for s in current if s.id in won]

    async def find(self, session_id: str) -> Session | None:
        """A live or dormant session by id; on a shared store, also one only another
        sidecar has served so far (the admin API acts on every session, SPEC 2.8)."""
        held = await self._whole(session_id)
        if held is None and self._reads_store:
            held = await self._adopt(session_id)
        return held

    @property
    def _reads_store(self) -> bool:
        """Ids not held here may still be sessions: another sidecar's, or not restored yet."""
        return self.store.shared or self.restoring

    # ---- what other sidecars on the same store did (SPEC 2.8, `peers.py`) ----------------
    def closed_elsewhere(self, session_ids: list[str], reason: CloseReason, at: float) -> None:
        """Closed by another sidecar, which owes its DELETE: 404 here at once, streams
        aborted, nothing written or sent."""
        for session_id in session_ids:
            session = self.live.get(session_id) or self.dormant.get(session_id)
            if isinstance(session, Dormant):
                self._forget_record(
                    session, Tombstone(session_id, reason, at, session.client, session.label)
                )
            elif session is not None:
                self._mark_closed(session, reason, at)
            if session is not None:
                log.info("session %s closed by another sidecar", short(session_id))

    def moved_elsewhere(self, session_ids: list[str], bound: list[str | None] | None) -> None:
        """Hibernated or resumed by another sidecar: the copy here is bound to an upstream
        session that is gone; dropped, so the next request reads the session again. A copy
        already bound where the event says (`bound`, from a sidecar that sends it) is kept:
        it took that binding after losing the race to resume it, and may be serving on it."""
        now_bound = bound if bound is not None else [None] * len(session_ids)
        for session_id, upstream_id in zip(session_ids, now_bound, strict=False):
            session = self.live.get(session_id) or self.dormant.get(session_id)
            if isinstance(session, Dormant):
                self._forget_record(session)
                continue
            if session is None:
                continue
            current = session.binding
            if session.live and current is not None and current.session_id == upstream_id:
                continue
            self._unlist(session, session.live)

    def pinned_elsewhere(self, session_ids: list[str], persistent: bool) -> None:
        for session_id in session_ids:
            session = self.live.get(session_id) or self.dormant.get(session_id)
            if isinstance(session, Session):  # a compact record reads it back when it wakes
                session.persistent = persistent
                self._schedule(session)

    def _forget_record(self, record: Dormant, tombstone: Tombstone | None = None) -> None:
        """A compact dormant record another sidecar decided on: dropped (the next request
        reads the store), or closed here too (a tombstone)."""
        self.dormant.remove(record.id)
        self._deadlines.unschedule(record)
        if self.restoring:
            self._dropped.add(record.id)
        if tombstone is not None:
            self.tombstones.remember(tombstone)

    def _hibernates(self, session: Session, reason: CloseReason) -> bool:
        """SPEC 2.7: an idle Streamable HTTP session that can be re-created is hibernated."""
        return (
            reason is CloseReason.IDLE_TIMEOUT
            and self.policy.idle_action == "hibernate"
            and session.live
            and session.transport is Transport.STREAMABLE_HTTP
            and session.resume is not None
        )

    def touch(self, session: Session) -> None:
        """Record client activity (SPEC 2.3); written to the store by the next flush."""
        session.last_activity_at = self.clock()
        self._dirty[session.id] = None

    def count_request(self, session: Session) -> None:
        session.requests += 1
        self._dirty[session.id] = None

    def note_use(self, session: Session, use: Use) -> None:
        """What a client POST meant (`activity.classify`): answers to relayed server pings
        are forgotten (they were not use), and use moves the clock."""
        if use.ping_answers and session.runtime is not None:
            for request_id in use.ping_answers:
                session.runtime.server_pings.pop(request_id, None)
        if use.counts:
            self.touch(session)

    def remember_server_ping(self, session: Session, request_id: RequestId) -> None:
        session.remember_server_ping(request_id)

    def note_credentials(self, session: Session, used: dict[str, str]) -> None:
        """What a later upstream DELETE (or resume) must carry (SPEC 2.4); memory only."""
        if used:
            session.credentials = used

    def note_protocol_version(self, session: Session, version: str, batch: Batch) -> None:
        """The version the upstream accepted `batch` with. What the session was negotiated
        with (a resume must negotiate it again, SPEC 2.7) changes only at the end of the
        initialize handshake, `notifications/initialized`, the first request carrying the
        version the upstream chose; any other request only fills in a missing one (adopted
        sessions): a header the upstream merely accepts made the next resume fail."""
        if version == session.protocol_version:
            return
        if session.protocol_version is None or ends_handshake(batch):
            session.protocol_version = version
            self._dirty[session.id] = None

    def note_client_info(self, session: Session, client_info: str, version: str | None) -> None:
        """The legacy transport's initialize arrives after the session exists: label it then."""
        session.client_info = session.client_info or client_info
        session.protocol_version = version or session.protocol_version
        self._dirty[session.id] = None

    def note_setup(self, session: Session, resume: ResumeState) -> None:
        """The client changed session-scoped setup a resume must replay (written behind)."""
        session.resume = resume
        self._dirty[session.id] = None
        self._resume_dirty[session.id] = None

    def begin_call(self, session: Session) -> None:
        session.in_flight += 1

    def begin_legacy_calls(self, session: Session, call_ids: Iterable[RequestId]) -> None:
        """Legacy transport: each call is in flight until its answer shows on the stream."""
        now = self.clock()
        for call_id in call_ids:
            session.call_started(call_id, now)

    def end_legacy_calls(self, session: Session, call_ids: Iterable[RequestId]) -> bool:
        """Answered (or refused): True if any was in flight. An answer is activity."""
        ended = [call_id for call_id in call_ids if session.call_answered(call_id)]
        return bool(ended)

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
        if not self._limited:
            # No limit to hold (the default): nothing to wait for, count or evict; only the
            # reservation, which a limit set by a reload then counts (issue 10: the checks
            # below were ~5% of an `initialize`'s CPU).
            self.admission.reserve(identity)
            return
        if not self._counted.is_set():
            # Restoring: a limit the sessions not yet in memory fill must hold (SPEC 2.5).
            await self._counted.wait()
        stored = await self._stored_counts(identity) if self.store.shared else None
        now = self.clock()
        victims = self._reserve(identity, now, stored)
        if victims:
            try:
                if self.store.shared:
                    victims = await uncancellable(self._claimed_victims(victims))
                await uncancellable(self._persist_closes(victims, CloseReason.EVICTED, False, now))
            except BaseException:
                self.release(identity)  # the caller only releases what admit() returned from
                raise

    @property
    def _limited(self) -> bool:
        return self.limits.max_sessions > 0 or self.limits.max_sessions_per_client > 0

    async def _claimed_victims(self, victims: list[Session]) -> list[Session]:
        """SPEC 2.8: an eviction is a close like any other, so on a shared store only the
        victims this sidecar wins the claim for are closed (and DELETEd) by it. The others
        were closed, hibernated or resumed by another sidecar meanwhile: their tombstones
        here are forgotten, and the next request reads what that sidecar wrote."""
        claims = [(v.id, None if v.binding is None else v.binding.session_id) for v in victims]
        try:
            won = await self.store.claim(claims)
        except StoreError as exc:
            self.store_failed("claim", exc)
            won = set()
        for victim in victims:
            if victim.id not in won:
                self.tombstones.forget(victim.id)
        return [v for v in victims if v.id in won]

    async def _stored_counts(self, identity: str) -> tuple[int, int]:
        """SPEC 2.8: on a shared store the limits count every sidecar's live sessions, as
        the store holds them (plus this sidecar's initializes not yet answered). Two
        sidecars admitting at the same instant can each see the other's not yet written:
        the limit can be passed by the initializes in flight at that moment, no more."""
        return await self.store.live_counts(identity)

    def _reserve(
        self, identity: str, now: float, stored: tuple[int, int] | None = None
    ) -> list[Session]:
        """Choose every victim first, close them in memory only if all limits can be met."""
        victims: list[Session] = []
        for scope, limit, owner in (
            ("max_sessions", self.limits.max_sessions, None),
            ("max_sessions_per_client", self.limits.max_sessions_per_client, identity),
        ):
            if limit <= 0:
                continue
            freed = sum(1 for v in victims if owner is None or v.client == owner)
            if self._used(owner, stored) - freed < limit:
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
        self.admission.reserve(identity)
        return victims

    def _used(self, owner: str | None, stored: tuple[int, int] | None = None) -> int:
        if stored is not None:
            return self.admission.used_stored(owner, stored[0] if owner is None else stored[1])
        return self.admission.used(owner, len(self.live))

    def release(self, identity: str) -> None:
        """The admitted `initialize` (or resume) of `identity` is over, whatever came of it."""
        self.admission.release(identity)

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
        resume: ResumeState | None = None,
        upstream: str = "",
    ) -> Session:
        """Track a session the upstream just created; committed before this returns.

        Tracked in memory by the store's own answer to the insert (`_inserted`), not after
        this coroutine's await: if the client disconnects mid-way, the session is still
        tracked (and will be expired and closed upstream) rather than left in the store but
        not in memory, without a task and a shield per creation (issue 10).
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
            upstream_endpoint=upstream_endpoint,
            binding=Binding(upstream, session_id),
            resume=resume,
        )
        session.credentials = credentials or {}
        committed: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self.store.insert_then(session, functools.partial(self._inserted, session, committed))
        return await committed

    def _inserted(
        self, session: Session, committed: asyncio.Future[Session], error: BaseException | None
    ) -> None:
        """The store's answer to a new session's insert, whatever became of its caller."""
        if error is None:
            self._register(session)
        if committed.done():
            return  # the caller was cancelled: the session is tracked (or not) all the same
        if error is None:
            committed.set_result(session)
        else:
            committed.set_exception(error)

    def _register(self, session: Session) -> None:
        session_id, identity = session.id, session.client
        self.tombstones.forget(session_id)
        self.live[session_id] = session
        self.admission.bound(identity)
        self._schedule(session)
        self.metrics.sessions_created.inc()
        log.info(
            "created session %s transport=%s client=%s",
            session.short_id,
            session.transport.value,
            _label(session),
        )

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
        closing = [s for s in sessions if s.usable]
        # Nothing to send upstream when it already ended there: no claim to win, either.
        if self.store.shared and not upstream_done:
            closing = await uncancellable(self._claimed(closing))
        await uncancellable(self._close_now(closing, reason, upstream_done, now))

    async def _close_now(
        self, closing: list[Session], reason: CloseReason, upstream_done: bool, now: float
    ) -> None:
        """Flip them closed in memory in runs that yield, then make that durable.

        Flipping a slice of 500 in one go held the event loop ~15 ms at 100,000 sessions. A
        request that reaches one not flipped yet closes it itself (request-time expiry), so
        each run takes only those still open: every session is closed, and owes its DELETE,
        once. Shielded by the caller as one piece: a cancellation between runs must not
        leave sessions closed in memory with no DELETE owed.
        """
        marked: list[Session] = []
        turn = self.pacing.turn()
        for session in closing:
            if turn.spent():
                await turn.pause()
            if session.usable:
                self._mark_closed(session, reason, now)
                marked.append(session)
        if len(closing) >= ANNOUNCE_RUN or turn.spent():
            # The write's rows are built and encoded (~2 ms a slice of 500) in a turn of their
            # own, not after a whole turn of flips.
            await turn.pause()
        await self._persist_closes(marked, reason, upstream_done, now)

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
        # Durable and refused at request time already: only the announcing is left, and
        # requests must not wait for all of it.
        turn = self.pacing.turn()
        for session, pending in closes:
            if turn.spent():
                await turn.pause()
            if pending is not None:
                self.closer.schedule(pending, session.credentials)
            if session.runtime is not None:
                session.runtime.credentials = {}
            self.metrics.sessions_closed.labels(reason.value).inc()
            log.info(
                "closed session %s reason=%s idle=%ds",
                session.short_id,
                reason.value,
                session.idle_seconds(now),
            )
            for listener in self.close_listeners:
                listener(session, reason, now)
        if closes and self.store.shared:
            self.announce(closed(closing, reason, now))

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
        was_live = session.live
        session.state = State.CLOSED
        session.close_reason = reason
        session.closed_at = now
        self._unlist(session, was_live)
        self.tombstones.remember(
            Tombstone(session.id, reason, now, session.client, _label(session))
        )

    def _unlist(self, session: Session, was_live: bool) -> None:
        """Out of the table (or the dormant set), its streams aborted."""
        if was_live:
            self.live.pop(session.id, None)
            self.admission.unbound(session.client)
        else:
            self.dormant.remove(session.id)
        if self.restoring:
            self._dropped.add(session.id)
        self._dirty.pop(session.id, None)
        self._resume_dirty.pop(session.id, None)
        self._deadlines.unschedule(session)
        self._kept.discard(session)
        if session.runtime is not None:
            for relay in list(session.runtime.relays):
                relay.abort()
            session.runtime.relays.clear()

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
        if reason is CloseReason.UPSTREAM_GONE or session.binding is None:
            return None  # gone upstream already, or dormant: nothing is left to close there
        binding = session.binding
        return PendingClose(binding.session_id, session.protocol_version, 0, now, binding.upstream)

    async def set_persistent(self, session: Session, persistent: bool) -> None:
        await self.store.set_persistent(session.id, persistent)
        session.persistent = persistent
        self._schedule(session)
        if self.store.shared:
            self.announce(pinned(session))

    # ---- hibernation and resume (SPEC 2.7) ------------------------------------------------
    async def hibernate_many(
        self, sessions: Iterable[Session], waking: Session | None = None
    ) -> None:
        """Free the upstream as a close does (DELETE owed, streams aborted), keep the id.

        Memory flips first, as for a close; if the store refuses the write, the sessions are
        closed instead (their DELETEs owed as usual), because a dormant id that is live on
        disk would be restored bound to an upstream session that no longer exists.
        """
        now = self.clock()
        going = [s for s in sessions if s.live]
        if self.store.shared:
            going = [s for s in await uncancellable(self._claimed(going)) if s.live]
        await uncancellable(self._hibernate_now(going, now, waking))

    async def _hibernate_now(
        self, going: list[Session], now: float, waking: Session | None
    ) -> None:
        """Flip in runs that yield (as `_close_now`), write, then announce; one shielded
        piece, so a cancellation never leaves a DELETE owed on disk but not scheduled."""
        entries = []
        turn = self.pacing.turn()
        for session in going:
            if turn.spent():
                await turn.pause()
            if not session.live:
                continue  # hibernated (or closed) by a request while this waited its turn
            pending = self._pending_close(session, CloseReason.IDLE_TIMEOUT, False, now)
            entries.append((session, pending))
            self._unlist(session, was_live=True)
            session.state = State.DORMANT
            session.dormant_since = now
            session.binding = None
            self._file_dormant(session, waking)
        if len(going) >= ANNOUNCE_RUN or turn.spent():
            await turn.pause()  # the write in a turn of its own, as for closes
        try:
            await uncancellable(self.store.hibernate_many(entries))
        except StoreError as exc:
            self.store_failed("hibernate", exc)
            for session, _ in entries:
                self._unfile_dormant(session)
                session.state = State.CLOSED
                session.close_reason = CloseReason.IDLE_TIMEOUT
                session.closed_at = now
                self.tombstones.remember(
                    Tombstone(
                        session.id, CloseReason.IDLE_TIMEOUT, now, session.client, _label(session)
                    )
                )
            self._unpersisted_closes.extend(entries)
        turn = self.pacing.turn()  # as for closes: the announcing yields in turns
        for session, pending in entries:
            if turn.spent():
                await turn.pause()
            if pending is not None:
                self.closer.schedule(pending, session.credentials)
            self._hibernating.pop(session.id, None)
            if session.state is State.DORMANT:  # a request may have resumed it meanwhile
                self._shed(session)
            self.metrics.sessions_hibernated.inc()
            if self.store.shared:
                self.announce(moved([session]))
            log.info(
                "hibernated session %s reason=idle_timeout idle=%.1fs took=%.1fms",
                session.short_id,
                session.idle_seconds(now),
                (self.clock() - now) * 1000,
            )

    def _shed(self, session: Session) -> None:
        """What a dormant session no longer holds in memory, once its hibernation is on disk."""
        if session.runtime is not None and not session.runtime.relays:
            session.runtime = None  # a dormant session costs only its record
        if self.dormant.get(session.id) is not session:
            session.resume = None  # not held whole: the record dropped, or compact

    def _file_dormant(self, session: Session, waking: Session | None) -> None:
        """Held compact from now on, unless the request waking it holds it; whole, in
        `_hibernating`, until its resume state is on disk (read back meanwhile from there)."""
        if session is waking:
            self.dormant.add(session)
            self._schedule(session)
            return
        self._hibernating[session.id] = session
        record = Dormant.of(session, _label(session))
        self.dormant.add(record)
        self._schedule(record)

    def _unfile_dormant(self, session: Session) -> None:
        """The store refused the hibernation: out of the dormant set, whatever holds it."""
        entry = self.dormant.remove(session.id)
        if entry is not None:
            self._deadlines.unschedule(entry)

    async def load_resume_state(self, session: Session) -> ResumeState | None:
        """A dormant session's resume state is left in the store (it is needed only to
        wake it, and held in memory it cost most of a dormant session's bytes). It comes
        back with the whole record (`_whole`); read here only if that record had none (its
        row was lost). Raises `StoreError` when the store cannot answer."""
        if session.resume is None and session.dormant:
            try:
                stored = await self.store.get(session.id)
            except StoreError as exc:
                self.store_failed("read", exc)
                raise
            if stored is not None and session.resume is None:
                session.resume = stored.resume
        return session.resume

    async def rebind(self, session: Session, binding: Binding, cause: str) -> bool:
        """A resume succeeded: the session is live again behind a new upstream session.

        Committed before the request that woke it is forwarded, so a crash right after
        cannot restore it dormant while its new upstream session lives on unseen. False
        when another sidecar on a shared store resumed (or closed) it first: nothing
        changed here, and `binding` is this sidecar's to close (SPEC 2.8).
        """
        previous = session.binding
        session.binding = binding
        session.resumes += 1
        try:
            rebound = await uncancellable(self.store.rebind(session, previous))
        except BaseException:
            session.binding = previous
            session.resumes -= 1
            raise
        if not rebound:
            session.binding = previous
            session.resumes -= 1
            return False
        self._go_live(session)
        self.metrics.sessions_resumed.labels(cause).inc()
        if self.store.shared:
            self.announce(moved([session]))
        return True

    def _go_live(self, session: Session) -> None:
        """Live again with the binding it now has; listed and counted as live."""
        session.state = State.LIVE
        session.dormant_since = None
        self.dormant.remove(session.id)
        if session.id not in self.live:
            self.live[session.id] = session
            self.admission.bound(session.client)
        self._schedule(session)  # its live deadline may come before its dormant one

    async def take_winning_binding(self, session: Session) -> bool:
        """Another sidecar resumed this session first (SPEC 2.8): take the binding it
        stored, so the request is served on the upstream session that won. False when the
        store holds no live binding for it (closed meanwhile, or unreadable): the copy
        here is dropped, and a closed one answers 404 from now on."""
        try:
            stored = await self.store.get(session.id)
        except StoreError as exc:
            self.store_failed("read", exc)
            stored = None
        if stored is None or not stored.live or stored.binding is None:
            if not session.usable:
                pass  # closed here already (the other sidecar's event came first)
            elif stored is not None and stored.state is State.CLOSED:
                reason = stored.close_reason or CloseReason.ADMIN
                self._mark_closed(session, reason, stored.closed_at or self.clock())
            else:
                self._unlist(session, session.live)
            return False
        session.binding = stored.binding
        session.protocol_version = stored.protocol_version
        session.resumes = stored.resumes
        session.resume = session.resume or stored.resume  # left on disk while dormant
        self._go_live(session)
        return True

    async def owe_close(
        self, binding: Binding, protocol_version: str | None, credentials: dict[str, str]
    ) -> None:
        """An upstream session no session is bound to any more: replaced by a resume, left
        on a replica that stopped answering (SPEC 2.8), or created by a resume another
        sidecar won. Should the upstream still hold it, the DELETE frees it."""
        pending = PendingClose(
            binding.session_id, protocol_version, 0, self.clock(), binding.upstream
        )
        try:
            await self.store.save_pending(pending)
        except StoreError as exc:
            self.store_failed("pending", exc)  # still attempted: memory holds it until then
        self.closer.schedule(pending, credentials)

    # ---- background work (sweeper, flusher, start-up) ------------------------------------
    async def sweep(self) -> int:
        """End (or hibernate) every expired session; returns how many were ended.

        Only the sessions whose deadline may have come are looked at (`deadlines.py`), in
        slices that each yield to the event loop. A request that arrives for an expired
        session before its slice is reached is refused at request time all the same.
        """
        now = self.clock()
        # Kept alive at the last sweep: looked at again (few). Those also due now are taken
        # with them and skipped in the due run: once each.
        kept: list[Session | Dormant] = list(self._kept)
        self._kept.clear()
        seen = set(kept)
        run = self._deadlines.take_due(now)
        ended = 0
        while True:
            if kept:
                batch, kept = kept[:SWEEP_SLICE], kept[SWEEP_SLICE:]
            else:
                batch = [s for s in _sessions(run.take(SWEEP_SLICE)) if s not in seen]
                if not batch and run.exhausted:
                    break
            try:
                ended += await self._sweep_slice(batch, now)
                self.between_slices()
                await yield_turn()
            except BaseException:
                # Whatever stopped this sweep, the sessions it had not reached yet are filed
                # again, so the next sweep still finds them.
                for session in [*batch, *kept, *_sessions(run.rest())]:
                    if self._still_held(session):
                        self._schedule(session)
                raise
            del batch  # its closed sessions are freed now, a slice at a time
        self.tombstones.forget_older_than(now - self.tombstone_ttl)
        return ended

    def _still_held(self, entry: Session | Dormant) -> bool:
        if isinstance(entry, Dormant):
            return self.dormant.get(entry.id) is entry
        return entry.usable

    async def _expired_records(self, filed: list[Session | Dormant], now: float) -> list[Session]:
        """The sessions of a slice, with each compact dormant record that expired read back
        whole (its close writes the stored counters); one not expired is filed again. When
        the store cannot answer, the rest are filed again for the next sweep."""
        sessions: list[Session] = []
        expired: list[Dormant] = []
        for entry in filed:
            if not isinstance(entry, Dormant):
                sessions.append(entry)
            elif not self._still_held(entry):
                continue  # read back, closed or woken since it was filed
            elif entry.expiry_reason(self._policy, now) is None:
                self._schedule(entry)
            else:
                expired.append(entry)
        if not expired:
            return sessions
        try:
            await self._read_back_many(expired)
        except StoreError:
            for record in expired:
                if self._still_held(record):
                    self._schedule(record)  # the next sweep tries again
        for record in expired:
            whole = self.dormant.get(record.id)
            if isinstance(whole, Session):
                sessions.append(whole)
        return sessions

    async def _sweep_slice(self, filed: list[Session | Dormant], now: float) -> int:
        by_reason: dict[CloseReason, list[Session]] = {}
        hibernating: list[Session] = []
        sessions = await self._expired_records(filed, now)
        if self.store.shared:
            await self._merge_uses([s for s in sessions if s.live])
        for session in sessions:
            if not session.usable:
                continue  # closed since it was filed; a duplicate from _kept
            session.forget_stale_calls(now, self._policy)
            reason = session.expiry_reason(self._policy, now)
            if reason is None:
                self._schedule(session)
            elif self._hibernates(session, reason):
                hibernating.append(session)
            else:
                by_reason.setdefault(reason, []).append(session)
        if hibernating:
            await self.hibernate_many(hibernating)
        for reason, ending in by_reason.items():
            await self.close_many(ending, reason)
        return sum(len(s) for s in by_reason.values()) + len(hibernating)

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
        dirty, self._dirty = self._dirty, {}
        resume_dirty, self._resume_dirty = self._resume_dirty, {}
        start = time.perf_counter()
        try:
            rows = await self._activity_rows(dirty, resume_dirty)
            await self.store.write_activity(rows)
        except StoreError as exc:
            self._dirty |= dirty  # try again next time rather than lose the activity
            self._resume_dirty |= resume_dirty
            self.store_failed("activity", exc)
            return 0
        except BaseException:
            # Cancelled between slices (shutdown) too: the final flush must still see them.
            self._dirty |= dirty
            self._resume_dirty |= resume_dirty
            raise
        self.metrics.store_flush_duration.observe(time.perf_counter() - start)
        written = len(rows)
        await _release(rows)
        return written

    async def _activity_rows(
        self, dirty: dict[str, None], resume_dirty: dict[str, None]
    ) -> list[ActivityRow]:
        """The rows to write, built in slices that yield: after a burst, 100,000 of them.

        A session touched meanwhile is dirty again for the next flush; one closed meanwhile
        is skipped by the store (its row is no longer live).
        """
        rows: list[ActivityRow] = []
        # Read off the set a run at a time: even copying 100,000 ids into a list held the
        # loop ~5 ms. `dirty` is this flush's own map; nothing changes it meanwhile.
        ids = iter(dirty)
        while run := list(itertools.islice(ids, FLUSH_RUN)):
            for session_id in run:
                s = self.live.get(session_id)
                if s is None:
                    continue
                setup = s.resume is not None and session_id in resume_dirty
                rows.append(
                    ActivityRow(
                        s.id,
                        s.last_activity_at,
                        s.requests,
                        s.protocol_version,
                        s.client_info,
                        s.resume.to_json() if setup and s.resume is not None else None,
                    )
                )
            # The rows outlive many young collections: frozen here, they never add up to a
            # full one (~50 ms at 100,000 rows) in the middle of the flush.
            self.between_slices()
            await yield_turn()
        return rows

    async def begin_restore(self) -> None:
        """Before the port opens: take up the owed DELETEs, and from now on answer an id
        not in memory from the store until `restore()` has read every session back.

        The owed DELETEs are read first, before anything can be closed: a close schedules
        its own DELETE, and reading it back afterwards would schedule it a second time.
        """
        for pending in await self.store.pending_closes():
            self.closer.schedule(pending, {})
        self.restoring = True
        self.restored.clear()
        self._counted.clear()

    async def restore(self, *, sweep: bool = True) -> int:
        """Pick up where the last run left off (SPEC 2.6), in slices that yield.

        The service runs this behind an open port (`begin_restore` first): live sessions
        first, so the limits count them as soon as possible, then tombstones and dormant
        ids. A slice takes only the sessions this process does not hold yet: one that a
        request read from the store meanwhile (and maybe closed, hibernated or woke) is
        already decided here. The expired are left in the table for the sweep (with
        `sweep=False`, for `sweep_restored()` in the background): until then each is
        refused at request time like any expired session. Returns how many legacy
        sessions were closed (their streams died with the last run).
        """
        if not self.restoring:
            await self.begin_restore()
        legacy = 0
        try:
            async for page in self.store.load_slices(State.LIVE, RESTORE_SLICE):
                legacy += await self._restore_live(self._not_held(page))
        finally:
            self._counted.set()  # on a failure too: initializes must not hang behind it
        horizon = self.clock() - self.tombstone_ttl
        async for page in self.store.load_slices(State.CLOSED, RESTORE_SLICE, horizon):
            self._restore_tombstones(self._not_held(page))
            self.between_slices()
            await yield_turn()
        async for page in self.store.load_slices(State.DORMANT, RESTORE_SLICE):
            for session in self._not_held(page):
                record = Dormant.of(session, _label(session))  # the rest is read back on use
                self.dormant.add(record)
                self._schedule(record)
            self.between_slices()
            await yield_turn()
        # A failure above leaves `restoring` on: ids not read back yet still come from the
        # store, and the next start reads them all again.
        self.restoring = False
        self._dropped.clear()
        self.restored.set()
        if sweep:
            await self.sweep_restored(legacy)
        return legacy

    def _not_held(self, page: list[Session]) -> list[Session]:
        """Of a slice read from the store, the sessions nothing here has decided on yet."""
        held = self.live, self.tombstones, self._dropped
        return [
            s
            for s in page
            if all(s.id not in ids for ids in held) and self.dormant.get(s.id) is None
        ]

    async def _restore_live(self, sessions: list[Session]) -> int:
        for session in sessions:
            self.live[session.id] = session
            self.admission.bound(session.client)
            self._schedule(session)
        self.between_slices()  # 100,000 records arriving: see `between_slices`
        legacy = [s for s in sessions if self._died_with_last_run(s)]
        if legacy:
            await self.close_many(legacy, CloseReason.RESTART)
        else:
            await yield_turn()
        return len(legacy)

    def _restore_tombstones(self, closed: list[Session]) -> None:
        """Oldest first, as closed (the store's slices come in that order). Closes made by
        requests while restoring are newer, yet land before the older ones read after
        them: an old one behind them is forgotten only once they are (a closed id that
        answers 404 a while longer), never early."""
        for session in closed:
            assert session.close_reason is not None
            assert session.closed_at is not None
            self.tombstones.remember(
                Tombstone(
                    session.id,
                    session.close_reason,
                    session.closed_at,
                    session.client,
                    _label(session),
                )
            )

    async def sweep_restored(self, legacy: int = 0) -> None:
        """End what expired while stopped; then say what the start picked up."""
        try:
            expired = await self.sweep()
        except StoreError as exc:
            # The sweeper's next round retries; the sessions are refused at request time.
            self.store_failed("close", exc)
            expired = 0
        log.info(
            "restored %d live and %d dormant sessions (%d expired while stopped, %d legacy "
            "closed), %d tombstones",
            len(self.live),
            len(self.dormant),
            expired,
            legacy,
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
            "dormant": len(self.dormant),
            "by_client": dict(self.admission.per_client),
        }


def _label(session: Session) -> str:
    return client_label(session.user_agent, session.client_info)


def _sessions(filed: list[Scheduled]) -> list[Session | Dormant]:
    """Only sessions, whole or compact dormant records, are filed in the deadline index."""
    return cast("list[Session | Dormant]", filed)


async def _release(rows: list[ActivityRow]) -> None:
    """Free a large list a run at a time: 100,000 rows freed at once held the loop ~20 ms."""
    while rows:
        del rows[-FLUSH_RUN:]
        await yield_turn()


def _nothing() -> None:
    pass


def _tell_nobody(event: Event) -> None:
    """No other sidecar shares the store."""
