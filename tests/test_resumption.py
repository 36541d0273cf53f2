"""Resuming a Streamable HTTP stream through the sidecar (SPEC 2.1, 2.3).

`Last-Event-ID` passes through untouched, so the upstream's event store replays what the
client missed; the reconnecting GET is a stream, not client activity, so it does not move
the session's last activity. The FastMCP test upstream keeps every event in memory.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from tests.peers.mcp_clients import RawSession, eventually, parse_sse, raw_client, session_row
from tests.peers.processes import SidecarFactory, UpstreamHandle

FLUSH = 0.2
SLOW_SECONDS = 1.5


async def read_events(
    response: httpx.Response, until: Any, within: float = 10.0
) -> list[dict[str, str]]:
    """SSE events of `response` up to and including the first one `until(event)` accepts."""
    events: list[dict[str, str]] = []
    buffer = ""
    async with asyncio.timeout(within):
        async for text in response.aiter_text():
            buffer += text.replace("\r\n", "\n")
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                for event in parse_sse(block):
                    events.append(event)
                    if until(event):
                        return events
    raise AssertionError(f"stream ended before the awaited event; got {events}")


async def test_resumed_get_stream_replays_missed_events_and_is_not_activity(
    upstream: UpstreamHandle, sidecar_factory: SidecarFactory
) -> None:
    sidecar = sidecar_factory(
        upstream.url,
        sessions={"idle_timeout": 30, "sweep_interval": 1},
        store={"flush_interval": FLUSH},
    )
    async with raw_client() as http:
        raw = RawSession(http, sidecar.url)
        assert (await raw.initialize()).status_code == 200
        session_id = raw.session_id
        assert session_id is not None
        call = raw.call_message("slow", {"seconds": SLOW_SECONDS})
        call["params"]["_meta"] = {"progressToken": "resume-me"}

        # Read the call's stream up to its first event (the priming id), then drop it.
        async with http.stream(
            "POST", sidecar.url, content=json.dumps(call), headers=raw.headers()
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            (priming,) = await read_events(response, until=lambda e: "id" in e)
        assert priming["data"] == ""

        # The sidecar sees the client gone at once (whichever path); that ends the call,
        # and the end of a call is activity. Wait until stored.
        async def call_ended() -> bool:
            async with httpx.AsyncClient(timeout=5) as admin:
                shown = await admin.get(f"{sidecar.admin_url}/sessions/{session_id}")
            return bool(shown.json()["in_flight"] == 0)

        await eventually(call_ended, what="the dropped call ended at the sidecar")
        await asyncio.sleep(3 * FLUSH)
        before = session_row(sidecar.db_path, session_id)
        assert before is not None

        headers = raw.headers(accept="text/event-stream", **{"Last-Event-ID": priming["id"]})
        del headers["Content-Type"]
        async with http.stream("GET", sidecar.url, headers=headers) as resumed:
            assert resumed.status_code == 200
            replayed = await read_events(
                resumed, until=lambda e: '"result"' in e.get("data", ""), within=SLOW_SECONDS + 8
            )

        messages = [json.loads(e["data"]) for e in replayed if e.get("data")]
        progress = [m["params"] for m in messages if m.get("method") == "notifications/progress"]
        assert progress, replayed
        assert {p["progressToken"] for p in progress} == {"resume-me"}
        assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)
        assert progress[0]["progress"] < 0.5  # from the start of the call: nothing was lost
        assert messages[-1]["id"] == call["id"]
        assert messages[-1]["result"]["content"][0]["text"] == "done"
        event_ids = [int(e["id"]) for e in replayed if e.get("data")]
        assert event_ids == sorted(event_ids)
        assert event_ids[0] > int(priming["id"])

        # The reconnecting GET moved nothing: last activity is still the dropped call's end.
        await asyncio.sleep(3 * FLUSH)
        after = session_row(sidecar.db_path, session_id)
        assert after is not None
        assert after["state"] == "live"
        assert after["last_activity_at"] == before["last_activity_at"]
        async with httpx.AsyncClient(timeout=5) as admin:
            shown = (await admin.get(f"{sidecar.admin_url}/sessions/{session_id}")).json()
        # ...in memory too: the idle clock runs from the stored moment, not from the GET.
        in_memory = time.time() - shown["idle_seconds"]
        assert abs(in_memory - before["last_activity_at"]) < 0.25

    gets = [r for r in upstream.requests_for(session_id) if r["method"] == "GET"]
    assert [r["status"] for r in gets] == [200]
