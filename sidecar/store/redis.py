"""The Redis store (`store.backend = "redis"`): the only module that knows Redis.

Same contract as the SQLite store (SPEC 2.6): creating, closing, hibernating and resuming are
applied before they are acknowledged, and every write is all or none. Each write is one Lua
script run (`_APPLY`), which Redis executes atomically: it either ran whole or, when the call
fails, the caller gets a `StoreError`. Activity is still written behind: one flush is one
script call carrying every dirty session, so one round trip, whatever the request rate.

Layout under `key_prefix` (default "mcp-sidecar:"):

    schema          the layout's version (SCHEMA_VERSION); a newer one stops the start
    s:<id>          a hash per session: its fields as strings, a None field absent
    live, dormant   sets of session ids by state
    clients         a hash: live sessions per client identity (limits across sidecars)
    closed          a sorted set of closed ids scored by closed_at (for `since` and purging)
    pending         a hash of owed DELETEs: "<upstream>\\n<upstream session id>" -> JSON
    events          a pub/sub channel: closes, pins and limit changes told to the other
                    sidecars, so they take effect on every one at once (SPEC 2.8)
    owed:<upstream>\\n<upstream session id>:<attempt>
                    the same for one attempt at an owed DELETE
    claim:<id>:<upstream session id>
                    a short-lived claim (SET NX with a TTL): the sidecar that set it closes or
                    hibernates that session's upstream session; the others drop their copy

Several sidecars may share one prefix (SPEC 2.8): activity merges (the last use is the latest
any of them saw, request counts add), and a close or hibernation is preceded by a claim, so
each upstream session is closed by exactly one of them.

Values are written as Python prints them (`repr` of a float reads back exactly) and the
scripts never convert them, so no precision is lost in Lua's numbers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from ..aio import Outcome, run_then
from ..config_render import mask_url_password
from ..errors import StoreError, StoreTooNewError
from ..pacing import yield_turn
from ..sessions import Binding, CloseReason, ResumeState, Session, State, Transport
from .records import ActivityRow, PendingClose

log = logging.getLogger("sidecar.store")

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "mcp-sidecar:"

# How long one command may take before it fails: an `initialize` waits on the insert, so a
# Redis that hangs must end in a 503 within a bounded time, not hold the client (SPEC 2.5).
COMMAND_TIMEOUT = 2.0
# One quick retry on a broken connection (a failover, a restarted Redis): enough to ride over
# a reconnect, while a Redis that is really gone still fails the call within ~2 x the timeout.
# The sidecar retries its owed writes itself; every write here is idempotent, so a retried
# call that had in fact run does no harm.
RETRIES = 1

# ARGV[1] = prefix, ARGV[2] = a JSON list of operations, applied in order:
#   {"op": "put", "id": ID, "fields": [name, value, ...]}     replace the session's record
#   {"op": "update", "id": ID, "fields": [...], "when": S}    change an existing session
#                                                             (only in state S when given)
#   {"op": "update", ..., "bound": U}   only if the session is still live on upstream session
#                       U, or dormant when U is "": a rebind another sidecar may have beaten
#   {"op": "touch", "id": ID, "last": T, "added": N, "fields": [...]}
#                       activity of a live session: last use the later of T and the stored
#                       one, N requests added (several sidecars' counts merge), fields set
#   {"op": "pend", "field": F, "value": V} / {"op": "unpend", "field": F}
# A JSON null value removes the field. The state indexes follow each session's new state.
# Returns how many conditional updates were refused ("when" or "bound" not met).
_APPLY = """
local prefix = ARGV[1]
local ops = cjson.decode(ARGV[2])
-- One HSET and at most one HDEL per session; true when the state (or closed_at) changed,
-- so the activity flush, which never changes either, skips the index work.
local function set_fields(key, fields)
  local set, unset, moved = {}, {}, false
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    if name == 'state' or name == 'closed_at' then moved = true end
    if value == cjson.null then
      unset[#unset + 1] = name
    else
      set[#set + 1] = name
      set[#set + 1] = value
    end
  end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  if #unset > 0 then redis.call('HDEL', key, unpack(unset)) end
  return moved
end
-- Live sessions per client: what max_sessions_per_client counts across sidecars.
local function count_live(key, delta)
  local client = redis.call('HGET', key, 'client') or ''
  if redis.call('HINCRBY', prefix .. 'clients', client, delta) <= 0 then
    redis.call('HDEL', prefix .. 'clients', client)
  end
end
-- Still as the caller last saw it: live on upstream session `bound`, or dormant ("").
local function still_bound(key, state, bound)
  if bound == '' then return state == 'dormant' end
  return state == 'live' and redis.call('HGET', key, 'upstream_session_id') == bound
end
local function reindex(id, key)
  local was_live = redis.call('SREM', prefix .. 'live', id) == 1
  redis.call('SREM', prefix .. 'dormant', id)
  redis.call('ZREM', prefix .. 'closed', id)
  local state = redis.call('HGET', key, 'state')
  if (state == 'live') ~= was_live then count_live(key, was_live and -1 or 1) end
  if state == 'closed' then
    redis.call('ZADD', prefix .. 'closed', redis.call('HGET', key, 'closed_at') or '0', id)
  elseif state then
    redis.call('SADD', prefix .. state, id)
  end
end
local refused = 0
for _, op in ipairs(ops) do
  if op.op == 'put' then
    local key = prefix .. 's:' .. op.id
    if redis.call('SREM', prefix .. 'live', op.id) == 1 then count_live(key, -1) end
    redis.call('DEL', key)
    set_fields(key, op.fields)
    reindex(op.id, key)
  elseif op.op == 'update' then
    local key = prefix .. 's:' .. op.id
    local state = redis.call('HGET', key, 'state')
    if state and (op.when == nil or op.when == state)
        and (op.bound == nil or still_bound(key, state, op.bound)) then
      if set_fields(key, op.fields) then reindex(op.id, key) end
    else
      refused = refused + 1
    end
  elseif op.op == 'touch' then
    -- Activity from several sidecars merges: the latest use wins, request counts add.
    local key = prefix .. 's:' .. op.id
    if redis.call('HGET', key, 'state') == 'live' then
      local last = tonumber(redis.call('HGET', key, 'last_activity_at') or '0')
      if tonumber(op.last) > last then redis.call('HSET', key, 'last_activity_at', op.last) end
      if op.added ~= 0 then redis.call('HINCRBY', key, 'requests', op.added) end
      set_fields(key, op.fields)
    end
  elseif op.op == 'pend' then
    redis.call('HSET', prefix .. 'pending', op.field, op.value)
  elseif op.op == 'unpend' then
    redis.call('HDEL', prefix .. 'pending', op.field)
  end
end
return refused
"""

# ARGV[1] = prefix, ARGV[2] = older_than: delete closed sessions closed before it, except those
# whose upstream session still owes a DELETE (as the SQLite store's purge); returns how many.
_PURGE = """
local prefix = ARGV[1]
local doomed = redis.call('ZRANGEBYSCORE', prefix .. 'closed', '-inf', '(' .. ARGV[2])
if #doomed == 0 then return 0 end
local owed = {}
for _, field in ipairs(redis.call('HKEYS', prefix .. 'pending')) do
  owed[string.match(field, '\\n(.*)$')] = true
end
local purged = 0
for _, id in ipairs(doomed) do
  local key = prefix .. 's:' .. id
  local upstream_id = redis.call('HGET', key, 'upstream_session_id') or id
  if not owed[upstream_id] then
    redis.call('DEL', key)
    redis.call('ZREM', prefix .. 'closed', id)
    purged = purged + 1
  end
end
return purged
"""


# ARGV[1] = prefix, ARGV[2] = the claim's TTL in ms, ARGV[3] = a JSON list of [id, upstream
# session id] pairs ("" for a dormant session). A claim is won only if the session is still in
# the state the caller saw (live on that upstream session, or dormant) and nobody holds it:
# a sidecar that closed it, resumed it elsewhere or is closing it now makes the others lose.
# The TTL only has to outlive the store write that follows; should the winner die before it,
# the claim lapses and another sidecar closes the session.
_CLAIM = """
local prefix = ARGV[1]
local won = {}
for _, pair in ipairs(cjson.decode(ARGV[3])) do
  local id, upstream_id = pair[1], pair[2]
  local key = prefix .. 's:' .. id
  local state = redis.call('HGET', key, 'state')
  local current = (upstream_id == '' and state == 'dormant')
    or (state == 'live' and redis.call('HGET', key, 'upstream_session_id') == upstream_id)
  if current and redis.call(
      'SET', prefix .. 'claim:' .. id .. ':' .. upstream_id, '1', 'NX', 'PX', ARGV[2]) then
    won[#won + 1] = id
  end
end
return won
"""

# Rebuilds the per-client counts of live sessions where a store written before they were kept
# has none. ARGV[1] = prefix.
_COUNT_CLIENTS = """
local prefix = ARGV[1]
if redis.call('EXISTS', prefix .. 'clients') == 1 then return 0 end
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'live')) do
  local client = redis.call('HGET', prefix .. 's:' .. id, 'client') or ''
  redis.call('HINCRBY', prefix .. 'clients', client, 1)
end
return 1
"""

# How long a claim holds when its winner never writes the close (it died in between).
CLAIM_TTL = 30.0
# Activity rows encoded between two turns of the event loop by the flush.
FLUSH_SLICE = 500
# How long the event listener waits for a message before it looks again (and notices a
# broken connection); `peers.Peers` subscribes again after a fault.
LISTEN_POLL = 1.0


class RedisStore:
    """Sessions in one Redis (or a Redis-compatible server), through redis-py's asyncio client."""

    def __init__(self, url: str, key_prefix: str = DEFAULT_PREFIX) -> None:
        self.url = url
        self.prefix = key_prefix
        self.transactions = 0  # write round trips applied: for metrics and benchmarks
        self.shared = True  # other sidecars may use the same prefix (SPEC 2.8)
        # Each live session's request count as last read or written: the flush adds only what
        # this sidecar counted since, so counts from several sidecars add up.
        self._requests_seen: dict[str, int] = {}
        self._redis: aioredis.Redis | None = None
        self._apply: Any = None
        self._purge: Any = None
        self._claim: Any = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        try:
            client = self._client(decode=True)
        except ValueError as exc:
            raise StoreError(f"store.url is not a usable Redis URL ({exc})") from exc
        self._redis = client
        self._apply = client.register_script(_APPLY)
        self._purge = client.register_script(_PURGE)
        self._claim = client.register_script(_CLAIM)
        try:
            await self._check_schema()
        except RedisError as exc:
            await self.close()
            raise StoreError(
                f"cannot use the Redis store at {self.where} ({exc}); check that it is running "
                "and reachable, and the password in store.url"
            ) from exc
        except StoreError:
            await self.close()
            raise

    def _client(self, *, decode: bool) -> aioredis.Redis:
        """A client for `url`; ValueError if it is not a usable Redis URL."""
        return aioredis.Redis.from_url(
            self.url,
            decode_responses=decode,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), RETRIES),
        )

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose()

    async def _check_schema(self) -> None:
        key = self.prefix + "schema"
        await self.db.set(key, str(SCHEMA_VERSION), nx=True)
        version = int(await self.db.get(key) or 0)
        if version <= SCHEMA_VERSION:
            await self.db.eval(_COUNT_CLIENTS, 0, self.prefix)
        if version > SCHEMA_VERSION:
            raise StoreTooNewError(
                f"the Redis store at {self.where} has schema version {version}, written by a "
                f"newer mcp-sidecar; this version understands up to {SCHEMA_VERSION}. Upgrade "
                "mcp-sidecar, or set another store.key_prefix. Nothing was changed."
            )

    @property
    def where(self) -> str:
        """The URL without its password, and the prefix: what messages may name."""
        return f"{mask_url_password(self.url)} (prefix {self.prefix!r})"

    @property
    def db(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreError("the session store is not open")
        return self._redis

    # ---- writes ------------------------------------------------------------------------
    async def _write(self, ops: list[dict[str, Any]]) -> int:
        """Apply operations in one atomic script call; a failure is a StoreError. Returns
        how many conditional updates were refused.

        A call that fails after Redis ran it (the reply was lost) is reported as failed too;
        every operation is idempotent, so the caller's retry does no harm.
        """
        return await self._write_json(json.dumps(ops))

    async def _write_json(self, ops: str) -> int:
        """`_write` with the operations already a JSON array (built in slices by the flush)."""
        if self._apply is None or self._redis is None:
            raise StoreError("the session store is not open")
        try:
            refused = await self._apply(args=[self.prefix, ops])
        except RedisError as exc:
            raise StoreError(
                f"writing to the Redis store at {self.where} failed ({exc}); check that Redis "
                "is running, reachable and not out of memory"
            ) from exc
        self.transactions += 1
        return int(refused)

    async def insert(self, session: Session) -> None:
        await self._write([{"op": "put", "id": session.id, "fields": _fields(session)}])
        self._requests_seen[session.id] = session.requests

    def insert_then(self, session: Session, done: Outcome) -> None:
        run_then(self.insert(session), done)

    def _merge_use(self, session: Session) -> dict[str, Any]:
        """The session's activity as a merging write (SPEC 2.8), forgetting its count."""
        seen = self._requests_seen.pop(session.id, session.requests)
        return _touch(session.id, session.last_activity_at, session.requests - seen, {})

    async def mark_closed_many(self, closes: Sequence[tuple[Session, PendingClose | None]]) -> None:
        ops: list[dict[str, Any]] = []
        for session, pending in closes:
            fields = {
                "state": State.CLOSED.value,
                "close_reason": session.close_reason,
                "closed_at": session.closed_at,
            }
            ops.append(self._merge_use(session))
            ops.append(_update(session.id, fields))
            if pending is not None:
                ops.append(_pend(pending))
        if ops:
            await self._write(ops)

    async def hibernate_many(self, sessions: Sequence[tuple[Session, PendingClose | None]]) -> None:
        ops: list[dict[str, Any]] = []
        for session, pending in sessions:
            fields = {
                "state": State.DORMANT.value,
                "dormant_since": session.dormant_since,
                "upstream": None,
                "upstream_session_id": None,
                "resume": _resume_json(session),
            }
            ops.append(self._merge_use(session))
            ops.append(_update(session.id, fields))
            if pending is not None:
                ops.append(_pend(pending))
        if ops:
            await self._write(ops)

    async def rebind(self, session: Session, previous: Binding | None = None) -> bool:
        """Conditional (SPEC 2.8): two sidecars waking the same session at once each create
        an upstream session, and only the first rebind wins; the other is told so."""
        binding = session.binding
        assert binding is not None
        fields = {
            "state": State.LIVE.value,
            "dormant_since": None,
            "upstream": binding.upstream,
            "upstream_session_id": binding.session_id,
            "protocol_version": session.protocol_version,
            "resumes": session.resumes,
        }
        update = _update(session.id, fields)
        update["bound"] = "" if previous is None else previous.session_id
        return await self._write([update]) == 0

    async def set_persistent(self, session_id: str, persistent: bool) -> None:
        await self._write([_update(session_id, {"persistent": persistent})])

    async def write_activity(self, rows: Sequence[ActivityRow]) -> None:
        """The write-behind flush: every dirty session in one script call, one round trip."""
        if not rows:
            return
        # Encoded a slice at a time, yielding between: 100,000 operations turned into JSON
        # at once held the event loop for ~100 ms. Still one script call, applied atomically.
        parts: list[str] = []
        for first in range(0, len(rows), FLUSH_SLICE):
            ops = [
                _activity(row, row.requests - self._requests_seen.get(row.session_id, row.requests))
                for row in rows[first : first + FLUSH_SLICE]
            ]
            parts.append(json.dumps(ops)[1:-1])
            await yield_turn()
        await self._write_json(f"[{','.join(parts)}]")
        for first in range(0, len(rows), FLUSH_SLICE):
            for row in rows[first : first + FLUSH_SLICE]:
                self._requests_seen[row.session_id] = row.requests
            await yield_turn()

    async def claim(self, claims: Sequence[tuple[str, str | None]]) -> set[str]:
        """Claim sessions for closing or hibernating (SPEC 2.8): the ids this sidecar won.

        Each pair is a session id and the upstream session id this sidecar holds it bound to
        (None: dormant). Not a lock held across the upstream call: the claim is won once, the
        close is written after it, and the DELETE it owes goes out like any other.
        """
        if not claims:
            return set()
        if self._claim is None or self._redis is None:
            raise StoreError("the session store is not open")
        pairs = [[session_id, upstream_id or ""] for session_id, upstream_id in claims]
        try:
            won = await self._claim(args=[self.prefix, int(CLAIM_TTL * 1000), json.dumps(pairs)])
        except RedisError as exc:
            raise StoreError(
                f"claiming sessions in the Redis store at {self.where} failed ({exc})"
            ) from exc
        return set(cast(list[str], won))

    async def claim_owed(self, pending: PendingClose) -> bool:
        """Claim one attempt at an owed DELETE (SET NX with a TTL), keyed by its attempt
        number: sidecars holding the same owed DELETE send each attempt once."""
        key = f"{self.prefix}owed:{_pending_field(pending)}:{pending.attempts}"
        try:
            won = await self.db.set(key, "1", nx=True, px=int(CLAIM_TTL * 1000))
        except RedisError as exc:
            raise _read_error(self, exc) from exc
        return bool(won)

    async def live_counts(self, client: str) -> tuple[int, int]:
        """Live sessions across every sidecar on this prefix: in all, and of `client`."""
        try:
            async with self.db.pipeline(transaction=False) as pipe:
                pipe.scard(self.prefix + "live")
                pipe.hget(self.prefix + "clients", client)
                total, mine = await pipe.execute()
        except RedisError as exc:
            raise _read_error(self, exc) from exc
        return int(total), int(mine or 0)

    async def last_uses(self, session_ids: Sequence[str]) -> dict[str, float]:
        """When each session was last used, as every sidecar's flushed activity says."""
        if not session_ids:
            return {}
        try:
            async with self.db.pipeline(transaction=False) as pipe:
                for session_id in session_ids:
                    pipe.hget(self._key(session_id), "last_activity_at")
                found = await pipe.execute()
        except RedisError as exc:
            raise _read_error(self, exc) from exc
        return {i: float(v) for i, v in zip(session_ids, found, strict=True) if v is not None}

    async def save_pending(self, pending: PendingClose, error: str | None = None) -> None:
        await self._write([_pend(pending, error)])

    async def drop_pending(self, pending: PendingClose) -> None:
        await self._write([{"op": "unpend", "field": _pending_field(pending)}])

    async def purge_tombstones(self, older_than: float) -> int:
        if self._purge is None or self._redis is None:
            raise StoreError("the session store is not open")
        try:
            purged = int(await self._purge(args=[self.prefix, repr(float(older_than))]))
        except RedisError as exc:
            raise StoreError(
                f"purging tombstones in the Redis store at {self.where} failed ({exc})"
            ) from exc
        if purged:
            self.transactions += 1
        return purged

    # ---- events between sidecars (SPEC 2.8) ----------------------------------------------
    async def publish(self, message: bytes) -> None:
        """Tell the other sidecars on this prefix; a failure is a StoreError."""
        try:
            await self.db.publish(self.prefix + "events", message)
        except RedisError as exc:
            raise StoreError(
                f"publishing to the Redis store at {self.where} failed ({exc})"
            ) from exc

    async def listen(
        self, deliver: Callable[[bytes], Awaitable[None]], subscribed: Callable[[], None]
    ) -> None:
        """Hand every message on the events channel to `deliver`, as it came; `subscribed`
        once Redis confirms the subscription (again after redis-py made it again on a new
        connection). Until cancelled, or a Redis fault, raised as a StoreError: the caller
        listens again. Events published meanwhile are missed: the claims and the store still
        decide every close, and an id closed elsewhere gets its 404 once it is read again.

        A client of its own that does not decode: the store's decodes every reply as UTF-8,
        and a message that is not (anything may be published) raised inside redis-py and
        cost the subscription. What a message means is `peer_events`' to judge.
        """
        try:
            async with self._client(decode=False) as client, client.pubsub() as pubsub:
                await pubsub.subscribe(self.prefix + "events")
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_POLL)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        subscribed()
                    elif message["type"] == "message":
                        await deliver(message["data"])
        except (RedisError, OSError) as exc:
            raise StoreError(
                f"listening to the events channel of the Redis store at {self.where} failed ({exc})"
            ) from exc

    # ---- reads -------------------------------------------------------------------------
    async def load(self, state: State, since: float | None = None) -> list[Session]:
        try:
            return await self._read_many(await self._ids(state, since))
        except RedisError as exc:
            raise _read_error(self, exc) from exc

    async def _ids(self, state: State, since: float | None) -> list[str]:
        """The ids in a state (closed ones by closing time, from `since`)."""
        if state is State.CLOSED:
            low = "-inf" if since is None else repr(float(since))
            found = await self.db.zrangebyscore(self.prefix + "closed", low, "+inf")
        else:
            found = list(await self.db.smembers(self.prefix + state.value))
        # decode_responses=True: redis-py's types cannot say so, the values are str.
        return cast(list[str], found)

    async def load_slices(
        self, state: State, size: int, since: float | None = None
    ) -> AsyncIterator[list[Session]]:
        """The ids at once (closed ones by closing time), the records a pipeline a slice."""
        try:
            ids = await self._ids(state, since)
            for first in range(0, len(ids), size):
                yield await self._read_many(ids[first : first + size])
        except RedisError as exc:
            raise _read_error(self, exc) from exc

    async def _read_many(self, ids: Sequence[str]) -> list[Session]:
        """Every named session in one round trip (a pipeline of HGETALLs)."""
        if not ids:
            return []
        async with self.db.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.hgetall(self._key(session_id))
            hashes = await pipe.execute()
        sessions = [_session(h) for h in hashes if h]
        self._note_counts(sessions)
        return sessions

    def _note_counts(self, sessions: Sequence[Session]) -> None:
        for session in sessions:
            if session.state is State.LIVE:
                self._requests_seen[session.id] = session.requests

    async def get(self, session_id: str) -> Session | None:
        try:
            found = await self.db.hgetall(self._key(session_id))
        except RedisError as exc:
            raise _read_error(self, exc) from exc
        if not found:
            return None
        session = _session(cast(dict[str, str], found))
        self._note_counts([session])
        return session

    async def get_many(self, session_ids: Sequence[str]) -> dict[str, Session]:
        if not session_ids:
            return {}
        try:
            async with self.db.pipeline(transaction=False) as pipe:
                for session_id in session_ids:
                    pipe.hgetall(self._key(session_id))
                found = await pipe.execute()
        except RedisError as exc:
            raise _read_error(self, exc) from exc
        sessions = [_session(cast(dict[str, str], f)) for f in found if f]
        self._note_counts(sessions)
        return {s.id: s for s in sessions}

    async def pending_closes(self) -> list[PendingClose]:
        try:
            values = await self.db.hvals(self.prefix + "pending")
        except RedisError as exc:
            raise _read_error(self, exc) from exc
        return [_pending(json.loads(v)) for v in values]

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"


def _read_error(store: RedisStore, exc: RedisError) -> StoreError:
    return StoreError(f"reading the Redis store at {store.where} failed ({exc})")


# ---- records <-> hash fields -------------------------------------------------------------


def _text(value: object) -> str | None:
    """A field's stored form: None stays None (the field is removed), floats read back exact."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _flat(fields: Mapping[str, object]) -> list[str | None]:
    return [item for name, value in fields.items() for item in (name, _text(value))]


def _update(session_id: str, fields: Mapping[str, object]) -> dict[str, Any]:
    return {"op": "update", "id": session_id, "fields": _flat(fields)}


def _touch(
    session_id: str, last: float, added: int, fields: Mapping[str, object]
) -> dict[str, Any]:
    return {
        "op": "touch",
        "id": session_id,
        "last": repr(float(last)),
        "added": added,
        "fields": _flat(fields),
    }


def _activity(row: ActivityRow, added: int) -> dict[str, Any]:
    # Empty or None values keep what the session has, as in the SQLite flush.
    fields: dict[str, object] = {}
    if row.protocol_version is not None:
        fields["protocol_version"] = row.protocol_version
    if row.client_info:
        fields["client_info"] = row.client_info
    if row.resume is not None:
        fields["resume"] = row.resume
    return _touch(row.session_id, row.last_activity_at, added, fields)


def _pending_field(pending: PendingClose) -> str:
    return f"{pending.upstream}\n{pending.session_id}"


def _pend(pending: PendingClose, error: str | None = None) -> dict[str, Any]:
    value = {
        "upstream": pending.upstream,
        "session_id": pending.session_id,
        "protocol_version": pending.protocol_version,
        "attempts": pending.attempts,
        "next_attempt_at": pending.next_attempt_at,
        "last_error": error,
    }
    return {"op": "pend", "field": _pending_field(pending), "value": json.dumps(value)}


def _pending(value: dict[str, Any]) -> PendingClose:
    return PendingClose(
        value["session_id"],
        value["protocol_version"],
        int(value["attempts"]),
        float(value["next_attempt_at"]),
        value["upstream"] or "",
    )


def _resume_json(s: Session) -> str | None:
    return None if s.resume is None else s.resume.to_json()


def _fields(s: Session) -> list[str | None]:
    return _flat(
        {
            "id": s.id,
            "transport": s.transport.value,
            "client": s.client,
            "user_agent": s.user_agent,
            "client_info": s.client_info,
            "protocol_version": s.protocol_version,
            "created_at": s.created_at,
            "last_activity_at": s.last_activity_at,
            "requests": s.requests,
            "persistent": s.persistent,
            "state": s.state.value,
            "close_reason": s.close_reason,
            "closed_at": s.closed_at,
            "upstream_endpoint": s.upstream_endpoint,
            "upstream": None if s.binding is None else s.binding.upstream,
            "upstream_session_id": None if s.binding is None else s.binding.session_id,
            "resume": _resume_json(s),
            "dormant_since": s.dormant_since,
            "resumes": s.resumes,
        }
    )


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _session(h: dict[str, str]) -> Session:
    upstream_id = h.get("upstream_session_id")
    return Session(
        id=h["id"],
        transport=Transport(h["transport"]),
        client=h["client"],
        user_agent=h.get("user_agent", ""),
        client_info=h.get("client_info", ""),
        protocol_version=h.get("protocol_version"),
        created_at=float(h["created_at"]),
        last_activity_at=float(h["last_activity_at"]),
        requests=int(h.get("requests", "0")),
        persistent=h.get("persistent") == "1",
        state=State(h["state"]),
        close_reason=CloseReason(h["close_reason"]) if h.get("close_reason") else None,
        closed_at=_float(h.get("closed_at")),
        upstream_endpoint=h.get("upstream_endpoint"),
        binding=None if upstream_id is None else Binding(h.get("upstream", ""), upstream_id),
        resume=ResumeState.from_json(h.get("resume")),
        dormant_since=_float(h.get("dormant_since")),
        resumes=int(h.get("resumes", "0")),
    )
