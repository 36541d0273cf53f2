"""The events sidecars sharing one store tell each other (SPEC 2.8), and their wire format.

No I/O: an event is built here, encoded to the bytes the store publishes, and every message
heard on the channel is decoded and checked here, in this one place, before anything acts
on it. The channel is trusted (it is the store's) but not every publisher is this version:
a sidecar of another version, or a script with a typo, can put anything on it. A message
that is not an event this version understands raises `BadEvent`, whose `reason` comes from
a fixed vocabulary (a metric label): the listener skips it and keeps listening.

Fields an event does not need are ignored rather than refused, so a newer version may add
one without its events being lost on older sidecars during a rolling upgrade; a field an
event needs that is missing or of the wrong type refuses the event whole.

On the wire an event is a JSON object: `{"kind": ..., <its fields>, "from": <node>}`, `from`
naming the sidecar that published it, so it can skip its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .sessions import CloseReason, Session

if TYPE_CHECKING:
    from .admission import Limits

# Why a message was refused: the `reason` label of `peer_events_rejected_total`.
REJECT_REASONS = ("not_json", "not_an_object", "unknown_kind", "bad_field")


@dataclass(frozen=True, slots=True)
class Closed:
    """Closed by the sender, which owes the upstream DELETE."""

    ids: tuple[str, ...]
    reason: CloseReason
    at: float


@dataclass(frozen=True, slots=True)
class Moved:
    """Hibernated or resumed by the sender. `bound` names each session's upstream session
    now (None: dormant), so a sidecar that already took that binding (it lost the race to
    resume it) keeps its copy; None when the sender did not say (an older version)."""

    ids: tuple[str, ...]
    bound: tuple[str | None, ...] | None


@dataclass(frozen=True, slots=True)
class Pinned:
    ids: tuple[str, ...]
    persistent: bool


@dataclass(frozen=True, slots=True)
class LimitsChanged:
    max_sessions: int
    max_sessions_per_client: int


Event = Closed | Moved | Pinned | LimitsChanged


class BadEvent(ValueError):
    """A message on the channel that is not an event this version understands."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # one of REJECT_REASONS


def closed(sessions: Iterable[Session], reason: CloseReason, at: float) -> Closed:
    return Closed(tuple(s.id for s in sessions), reason, at)


def moved(sessions: Iterable[Session]) -> Moved:
    listed = list(sessions)
    return Moved(
        tuple(s.id for s in listed),
        tuple(None if s.binding is None else s.binding.session_id for s in listed),
    )


def pinned(session: Session) -> Pinned:
    return Pinned((session.id,), session.persistent)


def limits_changed(limits: Limits) -> LimitsChanged:
    return LimitsChanged(limits.max_sessions, limits.max_sessions_per_client)


# ---- encoding ----------------------------------------------------------------------------
def encode(event: Event, node: str) -> bytes:
    """The message published for `event`, signed with the publisher's `node`."""
    return json.dumps({**_fields(event), "from": node}).encode()


def _fields(event: Event) -> dict[str, Any]:
    # The field names are the wire format older and newer sidecars read: never rename one.
    match event:
        case Closed(ids, reason, at):
            return {"kind": "closed", "ids": list(ids), "reason": reason.value, "at": at}
        case Moved(ids, bound):
            body: dict[str, Any] = {"kind": "moved", "ids": list(ids)}
            if bound is not None:
                body["bound"] = list(bound)
            return body
        case Pinned(ids, persistent):
            return {"kind": "persistent", "ids": list(ids), "persistent": persistent}
        case LimitsChanged(max_sessions, per_client):
            return {
                "kind": "limits",
                "max_sessions": max_sessions,
                "max_sessions_per_client": per_client,
            }


# ---- decoding ----------------------------------------------------------------------------
def decode(message: bytes) -> tuple[str, Event]:
    """The sender's node and the event a message carries; `BadEvent` if it carries none.
    A message without `from` (a script's) is nobody's: applied like another sidecar's."""
    try:
        data = json.loads(message)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadEvent("not_json", f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadEvent("not_an_object", f"a JSON {type(data).__name__}, not an object")
    sender = data.get("from", "")
    if not isinstance(sender, str):
        raise BadEvent("bad_field", "'from' is not a string")
    kind = data.get("kind")
    reader = _READERS.get(kind) if isinstance(kind, str) else None
    if reader is None:
        raise BadEvent("unknown_kind", f"kind {kind!r} is not one this version knows")
    return sender, reader(data)


def _read_closed(data: dict[str, Any]) -> Closed:
    reason = data.get("reason")
    known = _CLOSE_REASONS.get(reason) if isinstance(reason, str) else None
    if known is None:
        raise BadEvent("bad_field", f"close reason {reason!r} is not one this version knows")
    return Closed(_ids(data), known, _number(data, "at"))


def _read_moved(data: dict[str, Any]) -> Moved:
    ids = _ids(data)
    bound = data.get("bound")
    if bound is None:
        return Moved(ids, None)
    if (
        not isinstance(bound, list)
        or len(bound) != len(ids)
        or not all(b is None or isinstance(b, str) for b in bound)
    ):
        raise BadEvent("bad_field", "'bound' is not one string or null per id")
    return Moved(ids, tuple(bound))


def _read_pinned(data: dict[str, Any]) -> Pinned:
    persistent = data.get("persistent")
    if not isinstance(persistent, bool):
        raise BadEvent("bad_field", "'persistent' is not true or false")
    return Pinned(_ids(data), persistent)


def _read_limits(data: dict[str, Any]) -> LimitsChanged:
    return LimitsChanged(_count(data, "max_sessions"), _count(data, "max_sessions_per_client"))


_CLOSE_REASONS = {reason.value: reason for reason in CloseReason}
_READERS: dict[str, Callable[[dict[str, Any]], Event]] = {
    "closed": _read_closed,
    "moved": _read_moved,
    "persistent": _read_pinned,
    "limits": _read_limits,
}


def _ids(data: dict[str, Any]) -> tuple[str, ...]:
    ids = data.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BadEvent("bad_field", "'ids' is not a list of strings")
    return tuple(ids)


def _number(data: dict[str, Any], name: str) -> float:
    value = data.get(name)
    # bool is an int to Python, and NaN or infinity would poison every comparison with it.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadEvent("bad_field", f"{name!r} is not a number")
    return float(value)


def _count(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadEvent("bad_field", f"{name!r} is not a whole number >= 0")
    return value
