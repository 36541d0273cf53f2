"""SSE relay: events per second through the sidecar, and what a reader that stops costs.

Against `fast_upstream.py` (GET streams of fixed-size `notifications/message` events written
as fast as the connection takes them), directly and through one sidecar (production defaults,
log level info), in alternating rounds:

* **one stream**: one GET stream of `--events` events; events/s as the client receives them;
* **many streams**: `--streams` sessions each reading a stream of `--events-each` events at the
  same time; total events/s;
* **stalled reader**: one stream the client opens and then never reads, for `--stall-seconds`:
  how much the upstream managed to write, and how much the sidecar's RSS grew. With
  back-pressure the upstream's writes stop once the socket buffers are full; without it the
  sidecar would hold whatever the upstream wrote.

    python bench/sse_relay.py                     # ~1 min
    python bench/sse_relay.py --streams 200 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from benchlib import (
    ACCEPT,
    HOST,
    SESSION_HEADER,
    fmt,
    initialize,
    machine_busy,
    print_table,
    run_in_workdir,
    sidecar_revision,
    start_upstream,
)

from tests.peers.processes import start_sidecar

EVENTS_HEADER = "X-Bench-Events"
EVENT_BYTES_HEADER = "X-Bench-Event-Bytes"
EVENT_BYTES = 200
PATHS = ("direct", "sidecar")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def read_stream(client: aiohttp.ClientSession, url: str, session_id: str, events: int) -> int:
    """Open one GET stream of `events` events and read it to the end; returns bytes read."""
    headers = {
        "Accept": ACCEPT,
        SESSION_HEADER: session_id,
        EVENTS_HEADER: str(events),
        EVENT_BYTES_HEADER: str(EVENT_BYTES),
    }
    received = 0
    async with client.get(url, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"GET stream at {url} answered {response.status}")
        async for chunk in response.content.iter_any():
            received += len(chunk)
    return received


async def one_stream(client: aiohttp.ClientSession, url: str, events: int) -> float:
    session = await initialize(client, url)
    started = time.perf_counter()
    received = await read_stream(client, url, session.session_id, events)
    elapsed = time.perf_counter() - started
    if received < events * EVENT_BYTES * 0.9:
        raise RuntimeError(f"stream ended early: {received} bytes")
    return events / elapsed


async def many_streams(
    client: aiohttp.ClientSession, url: str, streams: int, events_each: int
) -> float:
    sessions = [await initialize(client, url) for _ in range(streams)]
    started = time.perf_counter()
    await asyncio.gather(*(read_stream(client, url, s.session_id, events_each) for s in sessions))
    return streams * events_each / (time.perf_counter() - started)


async def stalled_reader(
    url: str, upstream_base: str, sidecar_pid: int, seconds: float
) -> tuple[int, int]:
    """(bytes the upstream wrote, sidecar RSS growth) while a client holds a stream unread."""
    async with aiohttp.ClientSession() as client:
        session = await initialize(client, url)
        async with client.get(upstream_base + "/stats") as response:
            before = (await response.json())["bytes_written"]
        rss_before = rss_bytes(sidecar_pid)
        headers = {"Accept": ACCEPT, SESSION_HEADER: session.session_id, EVENTS_HEADER: "0"}
        # A raw socket that sends the request and then never reads: the stalled reader.
        reader, writer = await asyncio.open_connection(
            *url.split("//")[1].split("/", maxsplit=1)[0].split(":")
        )
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        path = "/" + url.split("//")[1].split("/", 1)[1]
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: {HOST}\r\n{head}\r\n".encode())
        await writer.drain()
        await asyncio.sleep(seconds)
        async with client.get(upstream_base + "/stats") as response:
            written = (await response.json())["bytes_written"] - before
        growth = rss_bytes(sidecar_pid) - rss_before
        writer.close()
        del reader
    return written, growth


async def run(args: argparse.Namespace, workdir: Path) -> None:
    upstream, upstream_url = start_upstream("fast", workdir)
    upstream_base = upstream_url.rsplit("/", 1)[0]
    sidecar = start_sidecar(workdir, upstream_url, log={"level": "info"})
    urls = {"direct": upstream_url, "sidecar": sidecar.url}
    one: dict[str, list[float]] = {p: [] for p in PATHS}
    many: dict[str, list[float]] = {p: [] for p in PATHS}
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)
        ) as client:
            for number in range(args.rounds):
                for path in PATHS if number % 2 == 0 else tuple(reversed(PATHS)):
                    one[path].append(await one_stream(client, urls[path], args.events))
                    many[path].append(
                        await many_streams(client, urls[path], args.streams, args.events_each)
                    )
        written, growth = await stalled_reader(
            sidecar.url, upstream_base, sidecar.proc.pid, args.stall_seconds
        )
    finally:
        sidecar.stop()
        upstream.stop()
    rows = []
    for path in PATHS:
        rows.append(
            [
                path,
                fmt(statistics.median(one[path]), 0),
                fmt(statistics.median(many[path]), 0),
            ]
        )
    print_table(["path", "events/s, one stream", f"events/s, {args.streams} streams"], rows)
    ratio_one = statistics.median(one["sidecar"]) / statistics.median(one["direct"])
    ratio_many = statistics.median(many["sidecar"]) / statistics.median(many["direct"])
    print(f"\nsidecar/direct: one stream {ratio_one:.2f}, {args.streams} streams {ratio_many:.2f}")
    print(
        f"stalled reader ({args.stall_seconds:g} s, {EVENT_BYTES}-byte events): the upstream "
        f"wrote {written / 2**20:.2f} MiB in all (socket buffers on both sides included); "
        f"sidecar RSS grew {growth / 2**20:.2f} MiB"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="one-stream events")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events-each", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stall-seconds", type=float, default=5.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    busy = machine_busy()
    print(f"sidecar: git {sidecar_revision()}")
    print(f"command: python bench/sse_relay.py {' '.join(argv or sys.argv[1:])}")
    print(f"CPU busy before start: {busy:.0%}\n")
    return run_in_workdir(lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
