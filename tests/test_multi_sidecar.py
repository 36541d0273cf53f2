"""Several sidecars on one Redis behave as one (SPEC 2.8), with real parts only.

A real `redis-server`, two FastMCP replicas and two sidecar processes sharing one key prefix;
raw clients whose requests alternate between the sidecars. What is proven here: a session
created on one sidecar is served by the other, on the replica that created it; each expired
session is closed upstream exactly once, whichever sidecar sweeps first; a sidecar killed
with SIGKILL loses nothing; an admin close or pin on one sidecar holds on the other at once
(its relayed stream ends, its requests get 404 without reaching the replica); limits count
the sessions of both.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from sidecar.peers import RESTART_CAP
from sidecar.store.redis import RedisStore
from tests.peers.mcp_clients import (
    RawSession,
    eventually,
    open_stream,
    raw_client,
    sdk_session,
    sleep_until,
    text_of,
)
from tests.peers.processes import SidecarHandle, UpstreamHandle
from tests.peers.redis_server import RedisServer
from tests.test_replicas import Replicas, created_on, metric, seen_by

SWEEP = 0.2
FLUSH = 0.1
PREFIX = "multi:"


class Cluster(Replicas):
    """Replicas and sidecars as in the replicas' tests, the sidecars on one Redis."""

    def __init__(self, tmp_path: Path, redis: RedisServer) -> None:
        super().__init__(tmp_path)
        self.redis = redis

    def shared_sidecar(
        self, replicas: list[UpstreamHandle], idle_timeout: float = 60, **sessions: object
    ) -> SidecarHandle:
        return self.sidecar(
            replicas,
            sessions={"idle_timeout": idle_timeout, "sweep_interval": SWEEP, **sessions},
            store={
                "backend": "redis",
                "url": self.redis.url,
                "key_prefix": PREFIX,
                "flush_interval": FLUSH,
            },
        )


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[Cluster]:
    started = Cluster(tmp_path, redis_server)
    yield started
    started.stop()


def deletes_per_session(replicas: list[UpstreamHandle]) -> dict[str, int]:
    """How many DELETEs each upstream session got, over every replica's request log."""
    counts: dict[str, int] = {}
    for replica in replicas:
        for session_id in replica.deletes():
            counts[session_id] = counts.get(session_id, 0) + 1
    return counts


async def test_a_session_made_on_one_sidecar_is_served_by_the_other_on_its_replica(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    upstreams = [cluster.replica() for _ in range(2)]
    sidecars = [cluster.shared_sidecar(upstreams) for _ in range(2)]
    async with raw_client() as http:
        raws = []
        for i in range(4):
            raw = RawSession(http, sidecars[i % 2].url)
            assert (await raw.initialize(f"raw-{i}")).status_code == 200
            raws.append(raw)
        for round_ in range(4):
            for i, raw in enumerate(raws):
                raw.url = sidecars[(i + round_) % 2].url  # alternate, starting on the other
                assert await raw.call_text("echo", {"text": f"r{round_}"}) == f"r{round_}"
        # An SDK client on sidecar 0; its session is then used raw through sidecar 1.
        async with sdk_session(sidecars[0].url) as (sdk, get_id):
            assert text_of(await sdk.call_tool("add", {"a": 1, "b": 2})) == "3"
            other = RawSession(http, sidecars[1].url, session_id=get_id())
            assert await other.call_text("echo", {"text": "via 1"}) == "via 1"
            assert text_of(await sdk.call_tool("add", {"a": 2, "b": 2})) == "4"
    created = [created_on(u) for u in upstreams]
    for upstream, own in zip(upstreams, created, strict=True):
        assert seen_by(upstream) <= own  # every request reached the replica that issued it
    ids = {raw.session_id for raw in raws}
    assert ids <= set().union(*created)

    # Both sidecars' activity merged: 1 initialize + 1 notification + 4 calls each.
    store = RedisStore(redis_server.url, PREFIX)
    await store.open()
    try:

        async def counted() -> bool:
            stored = [await store.get(i) for i in ids if i is not None]
            return all(s is not None and s.requests >= 6 for s in stored)

        await eventually(counted, what="request counts from both sidecars added up")
    finally:
        await store.close()


async def test_expiry_closes_each_session_upstream_exactly_once_across_sidecars(
    cluster: Cluster,
) -> None:
    idle = 1.0
    upstreams = [cluster.replica() for _ in range(2)]
    sidecars = [cluster.shared_sidecar(upstreams, idle_timeout=idle) for _ in range(2)]
    closed: list[str] = []
    async with raw_client() as http:
        for round_ in range(3):
            raws = []
            for i in range(6):
                raw = RawSession(http, sidecars[i % 2].url)
                assert (await raw.initialize(f"round{round_}-{i}")).status_code == 200
                raw.url = sidecars[(i + 1) % 2].url  # both sidecars now hold it
                assert await raw.call_text("echo", {"text": "x"}) == "x"
                raws.append(raw)
            ids = [raw.session_id for raw in raws]
            closed += [i for i in ids if i is not None]
            want = set(closed)
            await eventually(
                lambda want=want: want <= set(deletes_per_session(upstreams)),
                within=idle + 10,
                what="every expired session closed upstream",
            )
            for raw in raws:
                response = await raw.call("echo", {"text": "late"})
                assert response.status_code == 404
        # More sweeps on both sidecars: nobody closes any of them a second time.
        await sleep_until(time.monotonic() + 5 * SWEEP)
    counts = deletes_per_session(upstreams)
    print("DELETEs per session:", sorted(counts.values()))
    assert {i: counts.get(i) for i in closed} == dict.fromkeys(closed, 1)


async def test_a_sidecar_killed_loses_nothing(cluster: Cluster) -> None:
    idle = 2.0
    upstreams = [cluster.replica() for _ in range(2)]
    first, second = (cluster.shared_sidecar(upstreams, idle_timeout=idle) for _ in range(2))
    async with raw_client() as http:
        raws = []
        for i in range(3):
            raw = RawSession(http, first.url)
            assert (await raw.initialize(f"doomed-{i}")).status_code == 200
            raws.append(raw)
        assert await asyncio.to_thread(first.kill) == -signal.SIGKILL
        for raw in raws:
            raw.url = second.url
            assert await raw.call_text("echo", {"text": "still"}) == "still"
        ids = [raw.session_id for raw in raws]
        await eventually(
            lambda: set(ids) <= set(deletes_per_session(upstreams)),
            within=idle + 10,
            what="the dead sidecar's sessions closed by the other on expiry",
        )
    counts = deletes_per_session(upstreams)
    assert [counts[i] for i in ids if i is not None] == [1, 1, 1]


async def test_admin_close_on_one_sidecar_is_a_404_on_the_other_and_ends_its_stream(
    cluster: Cluster,
) -> None:
    upstreams = [cluster.replica()]
    first, second = (cluster.shared_sidecar(upstreams) for _ in range(2))
    async with raw_client() as http:
        raw = RawSession(http, second.url)
        assert (await raw.initialize("streaming")).status_code == 200
        assert await raw.call_text("echo", {"text": "on 2"}) == "on 2"
        async with open_stream(raw) as stream:
            assert stream.status == 200
            # Sidecar 1 never saw this session: its admin API finds it in Redis all the same.
            closed = await http.delete(f"{first.admin_url}/sessions/{raw.session_id}")
            assert closed.status_code == 200, closed.text
            await stream.wait_ended(within=5)

            async def refused_on_2() -> bool:
                response = await raw.call("echo", {"text": "after"})
                return response.status_code == 404

            await eventually(refused_on_2, within=2, what="404 on sidecar 2")
            raw.url = first.url
            assert (await raw.call("echo", {"text": "after"})).status_code == 404
    # Closed upstream once, by the sidecar that closed it; sidecar 2 heard of the close and
    # refused the later calls itself: none of them reached the replica. The admin close
    # answers once the close is committed; its DELETE is the closer's, sent behind it.
    await eventually(
        lambda: deletes_per_session(upstreams) == {raw.session_id: 1}, what="the DELETE"
    )
    methods = [r["method"] for r in upstreams[0].requests_for(str(raw.session_id))]
    assert methods[-1] == "DELETE", methods
    assert "closed by another sidecar" in second.output()


async def test_limits_count_the_sessions_of_every_sidecar(cluster: Cluster) -> None:
    upstreams = [cluster.replica()]
    first, second = (
        cluster.shared_sidecar(upstreams, max_sessions=3, max_sessions_per_client=2)
        for _ in range(2)
    )
    async with raw_client() as http:
        alice = [RawSession(http, s.url, authorization="Bearer alice") for s in (first, second)]
        for raw in alice:
            assert (await raw.initialize("alice")).status_code == 200
        # Alice has two sessions, one on each sidecar: a third is refused on either.
        for sidecar in (first, second):
            third = RawSession(http, sidecar.url, authorization="Bearer alice")
            assert (await third.initialize("alice")).status_code == 503
        bob = RawSession(http, second.url, authorization="Bearer bob")
        assert (await bob.initialize("bob")).status_code == 200
        # Three live in all, made on two sidecars: the fourth is refused by the first.
        carol = RawSession(http, first.url, authorization="Bearer carol")
        response = await carol.initialize("carol")
        assert response.status_code == 503, response.text
        # One closed (by its client, through the other sidecar): room again on both.
        bob.url = first.url
        assert (await http.delete(first.url, headers=bob.headers())).status_code == 200
        assert (await carol.initialize("carol")).status_code == 200


async def test_a_pin_on_one_sidecar_holds_on_the_other(cluster: Cluster) -> None:
    upstreams = [cluster.replica()]
    first, second = (cluster.shared_sidecar(upstreams) for _ in range(2))
    async with raw_client() as http:
        raw = RawSession(http, second.url)
        assert (await raw.initialize("pinned")).status_code == 200
        assert await raw.call_text("echo", {"text": "held by 2"}) == "held by 2"
        pinned = await http.put(
            f"{first.admin_url}/sessions/{raw.session_id}/persistent", json={"persistent": True}
        )
        assert pinned.status_code == 200, pinned.text

        async def pinned_on_2() -> bool:
            view = (await http.get(f"{second.admin_url}/sessions/{raw.session_id}")).json()
            return view["persistent"] is True

        await eventually(pinned_on_2, within=2, what="the pin seen by sidecar 2")


async def test_two_sidecars_waking_one_dormant_session_leave_no_ghost_upstream_session(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    # SPEC 2.8: both sidecars resume the same dormant id at the same instant, each creating
    # an upstream session; only one binding wins, and the other upstream session is DELETEd.
    idle = 1.0
    upstreams = [cluster.replica()]
    sidecars = [
        cluster.shared_sidecar(upstreams, idle_timeout=idle, idle_action="hibernate")
        for _ in range(2)
    ]
    store = RedisStore(redis_server.url, PREFIX)
    await store.open()
    try:
        async with raw_client() as http:
            raw = RawSession(http, sidecars[0].url)
            assert (await raw.initialize("woken-twice")).status_code == 200
            assert raw.session_id is not None
            # One session, two clients at once: their JSON-RPC ids must not collide.
            both = [
                RawSession(http, s.url, session_id=raw.session_id, next_id=1000 * (i + 1))
                for i, s in enumerate(sidecars)
            ]
            for round_ in range(3):

                async def dormant() -> bool:
                    stored = await store.get(str(raw.session_id))
                    return stored is not None and stored.dormant

                await eventually(dormant, within=idle + 10, what="the session hibernated")
                answers = await asyncio.gather(
                    *(c.call_text("echo", {"text": f"r{round_}"}) for c in both)
                )
                assert answers == [f"r{round_}"] * 2
            stored = await store.get(raw.session_id)
            assert stored is not None
            assert stored.binding is not None
            bound = stored.binding.session_id
            created = created_on(upstreams[0])

            def ghosts() -> set[str]:
                return created - {bound} - set(deletes_per_session(upstreams))

            await eventually(lambda: not ghosts(), within=10, what="no ghost upstream session")
            print("upstream sessions created:", len(created), "bound:", bound)
            assert bound in created
    finally:
        await store.close()


async def test_with_redis_down_a_session_only_the_other_sidecar_holds_is_a_503_not_a_404(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    # The id may be live on another sidecar: "gone" would make the client drop it for good.
    upstream = cluster.replica()
    holder, other = (cluster.shared_sidecar([upstream]) for _ in range(2))
    async with raw_client() as http:
        raw = RawSession(http, holder.url)
        assert (await raw.initialize()).status_code == 200
        await asyncio.to_thread(redis_server.stop, keep_data=True)
        try:
            raw.url = other.url
            refused = await raw.post({"jsonrpc": "2.0", "id": 7, "method": "ping"})
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"]
            assert refused.json()["id"] == 7
            admin = await http.get(f"{other.admin_url}/sessions/{raw.session_id}")
            assert admin.status_code == 503, admin.text
            raw.url = holder.url  # the sidecar that holds it serves it meanwhile
            assert await raw.call_text("echo", {"text": "held"}) == "held"
        finally:
            await asyncio.to_thread(redis_server.start)  # with its data, on the same port
        raw.url = other.url

        async def served() -> bool:
            answer = await raw.post({"jsonrpc": "2.0", "id": 8, "method": "ping"})
            return answer.status_code == 200

        await eventually(served, what="the other sidecar serving the session once Redis is back")
    assert "Traceback" not in other.output()


async def subscribers(redis: aioredis.Redis) -> int:
    """How many connections listen on the sidecars' events channel."""
    counts = dict(await redis.pubsub_numsub(PREFIX + "events"))
    return int(counts.get((PREFIX + "events").encode(), 0))


async def test_malformed_events_are_skipped_and_a_close_on_one_sidecar_still_holds_on_the_other(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    # Another version's or a script's messages on the channel ended the listener's task, and
    # with it every later event: a session closed on sidecar 1 went on reaching the replica.
    upstreams = [cluster.replica()]
    first, second = (cluster.shared_sidecar(upstreams) for _ in range(2))
    bus = aioredis.Redis.from_url(redis_server.url)
    try:
        await eventually(lambda: _equals(subscribers(bus), 2), what="both sidecars subscribed")
        async with raw_client() as http:
            raw = RawSession(http, second.url)
            assert (await raw.initialize("malformed")).status_code == 200
            assert await raw.call_text("echo", {"text": "on 2"}) == "on 2"
            session_id = str(raw.session_id)
            unknown = {"kind": "closed", "ids": [session_id], "reason": "no_such_reason", "at": 1}
            for message in (b"notjson", json.dumps(unknown).encode(), b"\xff\xfe"):
                await bus.publish(PREFIX + "events", message)
            closed = await http.delete(f"{first.admin_url}/sessions/{session_id}")
            assert closed.status_code == 200, closed.text

            async def closed_on_2() -> bool:
                view = (await http.get(f"{second.admin_url}/sessions/{session_id}")).json()
                return view["state"] == "closed"

            await eventually(closed_on_2, within=5, what="sidecar 2 heard of the close")
            posts = [r for r in upstreams[0].requests_for(session_id) if r["method"] == "POST"]
            refused = await raw.call("echo", {"text": "after"})
            assert refused.status_code == 404
            await eventually(
                lambda: deletes_per_session(upstreams) == {session_id: 1}, what="the DELETE"
            )
            rejected = 'mcp_sidecar_peer_events_rejected_total{reason="%s"}'
            assert await metric(http, second, rejected % "not_json") == 2
            assert await metric(http, second, rejected % "bad_field") == 1
            assert await metric(http, second, "mcp_sidecar_peer_events_restarts_total") == 0
    finally:
        await bus.aclose()
    # Refused by sidecar 2 itself: the replica saw no request after the close.
    after = [r for r in upstreams[0].requests_for(session_id) if r["method"] == "POST"]
    assert after == posts
    output = second.output()
    assert "ignored a message on the events channel (not_json)" in output
    assert "no_such_reason" in output
    assert "Traceback" not in output


async def _equals(count: Awaitable[int], wanted: int) -> bool:
    return await count == wanted


async def peers_state(http: httpx.AsyncClient, sidecar: SidecarHandle) -> list[dict[str, Any]]:
    """What /healthz and /readyz say of the other sidecars' events (both stay 200)."""
    health = await http.get(f"{sidecar.admin_url}/healthz")
    ready = await http.get(f"{sidecar.admin_url}/readyz")
    assert (health.status_code, ready.status_code) == (200, 200)
    return [health.json()["peers"], ready.json()["peers"]]


async def test_a_listener_whose_connection_is_killed_listens_again_and_says_so_meanwhile(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    upstreams = [cluster.replica()]
    first, second = (cluster.shared_sidecar(upstreams) for _ in range(2))
    listening = "mcp_sidecar_peer_events_listening"
    bus = aioredis.Redis.from_url(redis_server.url)
    try:
        async with raw_client() as http:

            async def heard(wanted: bool) -> bool:
                said = [state["listening"] for state in await peers_state(http, second)]
                return said == [wanted, wanted]

            await eventually(lambda: heard(True), what="sidecar 2 listening")
            assert await metric(http, second, listening) == 1
            # The connection killed, and (redis-py reconnects and subscribes again at once)
            # subscribing refused until the channel is allowed again: down for a while.
            await bus.execute_command("ACL", "SETUSER", "default", "resetchannels")
            await bus.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await eventually(lambda: heard(False), what="sidecar 2 not listening")
            assert await metric(http, second, listening) == 0
            down, _ = await peers_state(http, second)
            assert down["restarts"] >= 1
            assert down["since"].endswith("Z")
            await bus.execute_command("ACL", "SETUSER", "default", "allchannels")
            await eventually(lambda: heard(True), within=RESTART_CAP + 5, what="listening again")
            assert await metric(http, second, listening) == 1
            assert (await metric(http, second, "mcp_sidecar_peer_events_restarts_total") or 0) >= 1
            await eventually(lambda: _equals(subscribers(bus), 2), what="both subscribed again")

            # Heard again: a close made on sidecar 1 holds on sidecar 2.
            raw = RawSession(http, second.url)
            assert (await raw.initialize("after the outage")).status_code == 200
            closed = await http.delete(f"{first.admin_url}/sessions/{raw.session_id}")
            assert closed.status_code == 200, closed.text

            async def closed_on_2() -> bool:
                view = (await http.get(f"{second.admin_url}/sessions/{raw.session_id}")).json()
                return view["state"] == "closed"

            await eventually(closed_on_2, within=5, what="sidecar 2 heard of the close")
    finally:
        await bus.aclose()
    output = second.output()
    assert "not hearing the other sidecars' events" in output
    assert "hearing the other sidecars' events again" in output
