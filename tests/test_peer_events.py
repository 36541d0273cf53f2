"""The events sidecars tell each other (`peer_events.py`) and how `peers.Peers` keeps hearing
them (`Hearing`, the supervised listener): focused rules, with a clock and a store's listener
the test controls. Two real sidecars on a real Redis: `test_multi_sidecar.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import pytest

from sidecar.errors import StoreError
from sidecar.manager import Limits, SessionManager
from sidecar.metrics import Metrics
from sidecar.peer_events import (
    BadEvent,
    Closed,
    Event,
    LimitsChanged,
    Moved,
    Pinned,
    decode,
    encode,
)
from sidecar.peers import RESTART_CAP, RESTART_FIRST, Hearing, Peers
from sidecar.sessions import CloseReason, Policy
from sidecar.store.memory import MemoryStore
from tests.fakes import T0, Clock, FakeCloser

EVENTS: list[Event] = [
    Closed(("a", "b"), CloseReason.ADMIN, T0),
    Moved(("a",), ("upstream-1",)),
    Moved(("a", "b"), (None, "upstream-2")),
    Moved(("a",), None),
    Pinned(("a",), True),
    LimitsChanged(10, 2),
]


@pytest.mark.parametrize("event", EVENTS, ids=repr)
def test_every_event_reads_back_as_it_was_sent_with_its_sender(event: Event) -> None:
    assert decode(encode(event, "node-1")) == ("node-1", event)


def test_the_wire_format_older_sidecars_send_is_read() -> None:
    # What a sidecar before the typed events published: field for field the same format.
    old = {"kind": "closed", "ids": ["a"], "reason": "idle_timeout", "at": 5, "from": "n"}
    assert decode(json.dumps(old).encode()) == ("n", Closed(("a",), CloseReason.IDLE_TIMEOUT, 5))
    moved = {"kind": "moved", "ids": ["a"], "from": "n"}  # before `bound` was sent
    assert decode(json.dumps(moved).encode()) == ("n", Moved(("a",), None))


def test_fields_an_event_does_not_need_are_ignored_and_a_script_without_from_is_heard() -> None:
    message = {"kind": "persistent", "ids": ["a"], "persistent": False, "added_later": [1]}
    assert decode(json.dumps(message).encode()) == ("", Pinned(("a",), False))


CLOSED = {"kind": "closed", "ids": ["a"], "reason": "admin", "at": 1.0}
REFUSED = [
    (b"notjson", "not_json"),
    (b"\xff\xfe", "not_json"),
    (b"[" * 100_000, "not_json"),
    (b"[1, 2]", "not_an_object"),
    (b'"closed"', "not_an_object"),
    (b"{}", "unknown_kind"),
    (b'{"kind": "exploded", "ids": []}', "unknown_kind"),
    (b'{"kind": 3}', "unknown_kind"),
    ({**CLOSED, "reason": "no_such_reason"}, "bad_field"),
    ({**CLOSED, "reason": None}, "bad_field"),
    ({**CLOSED, "at": "yesterday"}, "bad_field"),
    ({**CLOSED, "at": True}, "bad_field"),
    (json.dumps({**CLOSED, "at": "NaN"}).replace('"NaN"', "NaN").encode(), "bad_field"),
    ({**CLOSED, "ids": "a"}, "bad_field"),
    ({**CLOSED, "ids": [1]}, "bad_field"),
    ({key: value for key, value in CLOSED.items() if key != "ids"}, "bad_field"),
    ({**CLOSED, "from": 7}, "bad_field"),
    ({"kind": "moved", "ids": ["a", "b"], "bound": ["x"]}, "bad_field"),
    ({"kind": "moved", "ids": ["a"], "bound": [1]}, "bad_field"),
    ({"kind": "persistent", "ids": ["a"], "persistent": "yes"}, "bad_field"),
    ({"kind": "limits", "max_sessions": -1, "max_sessions_per_client": 0}, "bad_field"),
    ({"kind": "limits", "max_sessions": 1.5, "max_sessions_per_client": 0}, "bad_field"),
    ({"kind": "limits", "max_sessions": 1}, "bad_field"),
]


@pytest.mark.parametrize(("message", "reason"), REFUSED, ids=[r for _, r in REFUSED])
def test_a_message_that_is_no_event_this_version_knows_is_refused_with_its_reason(
    message: bytes | dict[str, object], reason: str
) -> None:
    raw = message if isinstance(message, bytes) else json.dumps(message).encode()
    with pytest.raises(BadEvent) as refused:
        decode(raw)
    assert refused.value.reason == reason


def test_hearing_waits_longer_after_each_failure_up_to_the_cap_and_afresh_once_subscribed() -> None:
    hearing = Hearing(T0)
    assert (hearing.listening, hearing.since) == (False, T0)
    assert hearing.subscribed(T0 + 1)
    assert not hearing.subscribed(T0 + 2)  # redis-py subscribing again on its own: no news
    assert (hearing.listening, hearing.since) == (True, T0 + 1)
    delays = [hearing.lost(T0 + 3 + i) for i in range(7)]
    assert delays == [RESTART_FIRST, 1.0, 2.0, 4.0, 8.0, RESTART_CAP, RESTART_CAP]
    assert (hearing.listening, hearing.since, hearing.restarts) == (False, T0 + 3, 7)
    assert hearing.subscribed(T0 + 20)
    assert hearing.lost(T0 + 21) == RESTART_FIRST


# ---- the listener kept up: a store whose listener the test scripts ---------------------
Deliver = Callable[[bytes], Awaitable[None]]
Step = Callable[[Deliver, Callable[[], None]], Awaitable[None]]


class ScriptedListener(MemoryStore):
    """A memory store whose `listen` plays one step per call; once they are played it
    subscribes, delivers `last` and listens for good, and sets `done`."""

    def __init__(self, steps: list[Step], last: tuple[bytes, ...]) -> None:
        super().__init__()
        self.shared = True
        self.steps = steps
        self.last = last
        self.done = asyncio.Event()

    async def listen(self, deliver: Deliver, subscribed: Callable[[], None]) -> None:
        if self.steps:
            return await self.steps.pop(0)(deliver, subscribed)
        subscribed()
        for message in self.last:
            await deliver(message)
        self.done.set()
        await asyncio.Event().wait()


async def fails(deliver: Deliver, subscribed: Callable[[], None]) -> None:
    raise StoreError("Connection closed by server.")


def hears(*messages: bytes) -> Step:
    """Subscribes, delivers `messages`, then the connection drops."""

    async def step(deliver: Deliver, subscribed: Callable[[], None]) -> None:
        subscribed()
        for message in messages:
            await deliver(message)
        raise StoreError("Connection reset by peer")

    return step


class Harness:
    def __init__(self, steps: list[Step], last: tuple[bytes, ...] = ()) -> None:
        self.clock = Clock()
        self.store = ScriptedListener(steps, last)
        self.metrics = Metrics()
        self.manager = SessionManager(
            self.store,
            FakeCloser(),  # type: ignore[arg-type]
            self.metrics,
            policy=Policy(idle_timeout=60),
            limits=Limits(),
            tombstone_ttl=3600,
            clock=self.clock,
        )
        self.slept: list[float] = []
        self.peers = Peers(self.manager, self.metrics, sleep=self._sleep)

    async def _sleep(self, delay: float) -> None:
        self.slept.append(delay)
        self.clock.now += delay

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.metrics.registry.get_sample_value("mcp_sidecar_" + name, labels)

    async def run_script(self) -> None:
        task = asyncio.create_task(self.peers.run())
        try:
            await asyncio.wait_for(self.store.done.wait(), 5)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


@pytest.fixture
def limits_event() -> bytes:
    return encode(LimitsChanged(7, 3), "another-node")


async def test_bad_messages_are_counted_and_logged_and_the_next_event_still_applies(
    limits_event: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    bad = b'{"kind": "closed", "ids": ["x"], "reason": "no_such_reason", "at": 1}'
    h = Harness([], (b"notjson", bad, b"notjson", limits_event))
    await h.run_script()
    assert h.manager.limits.max_sessions == 7  # heard after the bad ones, on one subscription
    assert h.slept == []
    assert h.sample("peer_events_rejected_total", {"reason": "not_json"}) == 2
    assert h.sample("peer_events_rejected_total", {"reason": "bad_field"}) == 1
    assert h.sample("peer_events_rejected_total", {"reason": "unknown_kind"}) == 0
    ignored = [r.getMessage() for r in caplog.records if "ignored a message" in r.getMessage()]
    # Throttled: one line per reason within a second, the second not_json held back.
    assert len(ignored) == 2, ignored
    assert "no_such_reason" in ignored[1]


async def test_own_events_are_skipped(limits_event: bytes) -> None:
    h = Harness([])
    await h.peers.hear(encode(LimitsChanged(7, 3), h.peers.node))
    assert h.manager.limits.max_sessions == 0
    await h.peers.hear(limits_event)
    assert h.manager.limits.max_sessions == 7


async def test_a_listener_that_fails_is_started_again_with_backoff_and_the_state_shows_it(
    limits_event: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.peers")
    h = Harness([hears(), fails, fails, fails, hears(limits_event)])
    assert h.sample("peer_events_listening") == 0
    await h.run_script()
    # Down after the first subscription: 0.5, 1, 2, 4 s; back; down again: 0.5 s afresh.
    assert h.slept == [RESTART_FIRST, 1.0, 2.0, 4.0, RESTART_FIRST]
    assert h.manager.limits.max_sessions == 7
    assert h.peers.hearing.listening
    assert h.sample("peer_events_listening") == 1
    assert h.sample("peer_events_restarts_total") == 5
    lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.peers"]
    assert sum("not hearing the other sidecars' events" in line for line in lines) == 5
    assert "Connection reset by peer" in lines[0]
    assert "Connection closed by server." in lines[1]
    assert sum("hearing the other sidecars' events again" in line for line in lines) == 2


async def test_an_error_applying_an_event_costs_a_restart_not_the_listener() -> None:
    async def explodes(deliver: Deliver, subscribed: Callable[[], None]) -> None:
        subscribed()
        raise RuntimeError("a bug of ours")

    h = Harness([explodes])
    await h.run_script()
    assert h.slept == [RESTART_FIRST]
    assert h.peers.hearing.listening
