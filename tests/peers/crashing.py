"""Crash rounds: clients create, use and close sessions while the sidecar is SIGKILLed.

Shared by ``tests/test_crash.py`` (3 rounds) and ``bench/crash.py`` (as many as you like).
A round: `CLIENTS` concurrent raw clients loop `initialize` -> `notifications/initialized`
-> `tools/call echo` -> (every other session) DELETE, recording what the sidecar *answered*;
once a few sessions exist, the sidecar process this code started is killed by PID
(``SIGKILL``) after a seeded random delay; it is started again on the same database. The
verdict reads the database: every session whose initialize was answered has a row (live or
closed), every session whose DELETE was answered is closed, ``PRAGMA integrity_check`` is ok.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.peers.mcp_clients import RawSession, session_rows
from tests.peers.processes import SidecarHandle

CLIENTS = 4
READY_SESSIONS = 4  # answered initializes before the kill timer starts
KILL_DELAY = (0.0, 0.6)  # seconds after that, drawn from the round's seed
MAX_LOOPS = 2_000  # per client and round; the kill ends a round long before
ROUND_TIMEOUT = 20.0
HTTP_TIMEOUT = httpx.Timeout(5.0)


@dataclass
class CrashRound:
    number: int
    seed: int
    answered: set[str] = field(default_factory=set)  # initialize answered with an id
    deleted: set[str] = field(default_factory=set)  # DELETE answered 2xx
    kill_delay: float = 0.0
    lost: set[str] = field(default_factory=set)  # answered, no row after restart
    reopened: set[str] = field(default_factory=set)  # DELETE answered, row not closed
    integrity: str = ""

    @property
    def ok(self) -> bool:
        return not self.lost and not self.reopened and self.integrity == "ok"

    def summary(self) -> str:
        return (
            f"round {self.number} (seed {self.seed}, kill +{self.kill_delay:.3f}s): "
            f"{len(self.answered)} sessions answered, {len(self.deleted)} deletes answered, "
            f"lost {len(self.lost)}, reopened {len(self.reopened)}, integrity {self.integrity}"
        )


async def _client(url: str, result: CrashRound, ready: asyncio.Event, rng: random.Random) -> None:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        for _ in range(MAX_LOOPS):
            raw = RawSession(http, url)
            try:
                answer = await raw.initialize("crash-test", notify=False)
                if answer.status_code != 200 or raw.session_id is None:
                    continue
                result.answered.add(raw.session_id)
                if len(result.answered) >= READY_SESSIONS:
                    ready.set()
                await raw.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
                await raw.call("echo", {"text": "before the crash"})
                if rng.random() < 0.5:
                    closed = await http.delete(url, headers=raw.headers())
                    if 200 <= closed.status_code < 300:
                        result.deleted.add(raw.session_id)
            except httpx.HTTPError:
                return  # the sidecar is gone: this client's round is over


def integrity_check(db_path: Path) -> str:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        return ",".join(str(row[0]) for row in db.execute("PRAGMA integrity_check"))


async def crash_round(sidecar: SidecarHandle, number: int, seed: int) -> CrashRound:
    """One round against a running sidecar; leaves it running again (same DB) afterwards."""
    rng = random.Random(seed)
    result = CrashRound(number, seed, kill_delay=rng.uniform(*KILL_DELAY))
    ready = asyncio.Event()
    clients = [
        asyncio.create_task(_client(sidecar.url, result, ready, random.Random(rng.random())))
        for _ in range(CLIENTS)
    ]
    try:
        async with asyncio.timeout(ROUND_TIMEOUT):
            await ready.wait()
            await asyncio.sleep(result.kill_delay)  # the seeded moment of the crash
            pid = sidecar.proc.pid
            code = await asyncio.to_thread(sidecar.kill)
            assert code == -9, f"sidecar pid {pid} exited {code}, not by SIGKILL"
            await asyncio.gather(*clients)
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    started = time.monotonic()
    await asyncio.to_thread(sidecar.start)
    assert time.monotonic() - started < ROUND_TIMEOUT
    rows = session_rows(sidecar.db_path)
    result.lost = result.answered - rows.keys()
    result.reopened = {s for s in result.deleted if rows.get(s, {}).get("state") != "closed"}
    result.integrity = integrity_check(sidecar.db_path)
    return result


async def crash_rounds(sidecar: SidecarHandle, rounds: int, seed: int) -> list[CrashRound]:
    seeds = random.Random(seed)
    return [await crash_round(sidecar, n + 1, seeds.randrange(2**32)) for n in range(rounds)]
