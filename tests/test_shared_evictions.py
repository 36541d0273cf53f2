"""Evictions on a store several sidecars share (SPEC 2.8): claimed like any other close.

Two session managers on one real `redis-server` and key prefix stand for two sidecars; both
are at `max_sessions` with `on_limit = "evict_idle"` and admit a client at the same instant,
each choosing the same idle victim. Only the one that wins the victim's claim closes it and
owes its upstream DELETE.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sidecar.manager import Limits, Outcome, SessionManager
from sidecar.metrics import Metrics
from sidecar.sessions import Policy, Transport
from sidecar.store.redis import RedisStore
from tests.peers.redis_server import RedisServer
from tests.test_manager import ALICE, IDLE, Clock, FakeCloser

Sidecar = tuple[SessionManager, FakeCloser]


@pytest.fixture
async def sidecar(redis_server: RedisServer) -> AsyncIterator[Callable[[], Awaitable[Sidecar]]]:
    stores: list[RedisStore] = []

    async def build() -> Sidecar:
        store = RedisStore(redis_server.url, "evict:")
        await store.open()
        stores.append(store)
        closer = FakeCloser()
        manager = SessionManager(
            store,
            closer,  # type: ignore[arg-type]
            Metrics(),
            policy=Policy(idle_timeout=IDLE),
            limits=Limits(max_sessions=1, on_limit="evict_idle"),
            tombstone_ttl=86400,
            clock=Clock(),
        )
        return manager, closer

    yield build
    for store in stores:
        await store.close()


async def test_two_sidecars_evicting_one_victim_at_once_close_it_upstream_once(
    sidecar: Callable[[], Awaitable[Sidecar]],
) -> None:
    (first, first_closer), (second, second_closer) = [await sidecar() for _ in range(2)]
    await first.create("victim", Transport.STREAMABLE_HTTP, ALICE, protocol_version="2025-06-18")
    assert await second.find("victim") is not None  # both sidecars now hold it

    await asyncio.gather(first.admit("bob"), second.admit("carol"))

    owed = [p.session_id for p, _ in first_closer.scheduled + second_closer.scheduled]
    assert owed == ["victim"]  # exactly one DELETE, from the sidecar that won the claim
    for manager in (first, second):
        assert (await manager.resolve("victim", ALICE)).outcome is Outcome.EXPIRED
