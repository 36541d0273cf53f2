"""The gate's backstop and adoption accounting, before the fake upstream of test_proxy_unit.

A clock and exact counts are needed here: what the upstream created for a request the parser
did not read as `initialize`, and how many sessions adoption creates, limits included.
"""

from __future__ import annotations

import asyncio
import json

from tests import test_proxy_unit
from tests.test_proxy_unit import JSON_HEADERS, SID, Make, _rpc

make = test_proxy_unit.make  # the same real app before the same fake upstream

# JSON-RPC allows no fractional id; the sidecar's parser refuses it, an upstream might not.
ODD_INITIALIZE = json.dumps(
    {"jsonrpc": "2.0", "id": 1.5, "method": "initialize", "params": {"capabilities": {}}}
).encode()


async def test_session_from_an_unrecognised_initialize_is_tracked(make: Make) -> None:
    p = await make()
    for path in ("/mcp", "/other"):
        async with p.client.post(path, data=ODD_INITIALIZE, headers=JSON_HEADERS) as response:
            assert response.status == 200
            assert response.headers[SID] in p.service.manager.live
    assert p.sample("mcp_sidecar_untracked_sessions_total", {"result": "tracked"}) == 2


async def test_session_from_an_unrecognised_initialize_beyond_limits_is_closed(
    make: Make,
) -> None:
    p = await make(sessions={"max_sessions": 1})
    await p.initialize()
    async with p.client.post("/mcp", data=ODD_INITIALIZE, headers=JSON_HEADERS) as response:
        assert response.status == 503
        assert json.loads(await response.read())["error"]["code"]
    assert list(p.service.manager.live) == ["upstream-session-0001"]
    deletes = p.fake.forwarded("DELETE")
    assert [d.headers[SID] for d in deletes] == ["upstream-session-0002"]
    assert p.sample("mcp_sidecar_untracked_sessions_total", {"result": "closed"}) == 1


async def test_adoption_respects_the_session_limit(make: Make) -> None:
    p = await make(sessions={"unknown": "forward", "max_sessions": 1})
    await p.initialize()
    status, _, headers = await p.post("adopt-me", _rpc("tools/list"))
    assert status == 503
    assert "Retry-After" in headers
    assert "adopt-me" not in p.service.manager.live


async def test_concurrent_adoptions_of_one_id_create_one_session(make: Make) -> None:
    p = await make(sessions={"unknown": "forward"})
    results = await asyncio.gather(*(p.post("adopt-me", _rpc("tools/list")) for _ in range(4)))
    assert [status for status, _, _ in results] == [200] * 4
    assert list(p.service.manager.live) == ["adopt-me"]
    assert p.sample("mcp_sidecar_sessions_created_total") == 1
    assert p.rows("SELECT id FROM sessions") == [("adopt-me",)]


async def test_delete_of_an_unknown_id_is_never_adopted(make: Make) -> None:
    p = await make(sessions={"unknown": "forward"})
    async with p.client.delete("/mcp", headers={**JSON_HEADERS, SID: "adopt-me"}) as response:
        assert response.status == 200
    assert [s.method for s in p.fake.seen] == ["DELETE"]
    assert p.service.manager.live == {}
    assert p.rows("SELECT * FROM sessions") == []
