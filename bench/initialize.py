"""How many sessions per second the sidecar can create, each durable before its answer.

Two parts:

* **wrk**: `initialize` requests (each its own JSON-RPC id, no session header, so the canned
  upstream of `overhead.py` answers each with a fresh `Mcp-Session-Id`) from C connections,
  directly, through nginx `proxy_pass` and through `mcp-sidecar serve` (default SQLite store in
  a temp dir, log level info), alternating rounds, medians reported: initialize/s, p50/p99,
  proxy CPU per initialize (from /proc), and the sidecar's SQLite write transactions per
  initialize (`mcp_sidecar_store_transactions` on /metrics). Every answered `initialize` there
  is a session the sidecar committed before answering (SPEC 2.6).
* **in process**: the creation path without HTTP: `SessionManager.admit` + `create` (with the
  resume state an `initialize` carries) + `release`, on the SQLite store in a temp dir, from K
  concurrent tasks, and one at a time: the store's own ceiling, and what the group commit
  (concurrent creations sharing one transaction) is worth.

    python bench/initialize.py                         # ~1 min
    python bench/initialize.py --connections 64 --rounds 5 --seconds 10
    python bench/initialize.py --skip-wrk --creations 50000

On this 2-core machine wrk, nginx and the sidecar share the CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import uvloop
from benchlib import (
    ACCEPT,
    HOST,
    PROTOCOL_VERSION,
    fmt,
    machine_busy,
    print_table,
    sidecar_revision,
)
from overhead import PATHS, Series, run_wrk, start_stack, stop_stack

from sidecar.manager import Limits, SessionManager
from sidecar.metrics import Metrics
from sidecar.sessions import Policy, Transport
from sidecar.store.sqlite import SqliteStore
from sidecar.transports.resume import initial_resume_state

# Each request its own id and its own client name; no Mcp-Session-Id: a new session each.
WRK_SCRIPT = textwrap.dedent(
    """\
    local counter = 0
    local path = "/mcp"
    function init(args)
      path = args[2]
    end
    function request()
      counter = counter + 1
      local body = '{"jsonrpc":"2.0","id":' .. counter .. ',"method":"initialize",' ..
        '"params":{"protocolVersion":"%(protocol_version)s","capabilities":{},' ..
        '"clientInfo":{"name":"wrk-' .. counter .. '","version":"1"}}}'
      local headers = {}
      headers["Content-Type"] = "application/json"
      headers["Accept"] = "%(accept)s"
      return wrk.format("POST", path, headers, body)
    end
    function done(summary, latency, requests)
      local e = summary.errors
      io.write(string.format(
        'WRK {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
        '"errors":%%d,"non2xx":%%d}\\n',
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        e.connect + e.read + e.write + e.timeout, e.status))
    end
    """
) % {"accept": ACCEPT, "protocol_version": PROTOCOL_VERSION}

INITIALIZE_PARAMS = {
    "protocolVersion": PROTOCOL_VERSION,
    "capabilities": {"roots": {"listChanged": True}},
    "clientInfo": {"name": "bench-initialize", "version": "1.0"},
}


# ---- wrk against the three paths --------------------------------------------------------------


async def store_transactions(admin_url: str) -> float:
    async with (
        aiohttp.ClientSession() as client,
        client.get(admin_url + "/metrics") as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("mcp_sidecar_store_transactions "):
            return float(line.split()[1])
    return float("nan")


def measure_wrk(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Series], list[float]]:
    """Rounds of wrk on each path; the sidecar's transactions per initialize per round."""
    script = workdir / "initialize.lua"
    script.write_text(WRK_SCRIPT)
    stack = start_stack(workdir, {"canned"})
    try:
        bases = stack.bases["canned"]
        sidecar = next(s for s in stack.stop if hasattr(s, "admin_port"))
        admin = f"http://{HOST}:{sidecar.admin_port}"  # type: ignore[union-attr]
        pids = {
            "direct": None,
            "nginx": stack.pids["nginx"],
            "sidecar": stack.pids["sidecar-canned"],
        }
        warm = argparse.Namespace(**{**vars(args), "seconds": 1})
        for path in PATHS:
            run_wrk(script, bases[path], ["-"], warm, None)
        series = {path: Series() for path in PATHS}
        per_initialize: list[float] = []
        for number in range(args.rounds):
            for path in PATHS if number % 2 == 0 else tuple(reversed(PATHS)):
                before = asyncio.run(store_transactions(admin)) if path == "sidecar" else 0.0
                spy = start_py_spy(args, pids[path]) if path == "sidecar" and not number else None
                run = run_wrk(script, bases[path], ["-"], args, pids[path])
                if spy is not None:
                    spy.wait()
                series[path].runs.append(run)
                if path == "sidecar":
                    after = asyncio.run(store_transactions(admin))
                    per_initialize.append((after - before) / max(1, run.requests))
    finally:
        stop_stack(stack)
    return series, per_initialize


def start_py_spy(args: argparse.Namespace, pid: int | None) -> subprocess.Popen[bytes] | None:
    """`--py-spy FILE`: sample the sidecar during its first wrk round (raw folded stacks)."""
    if not args.py_spy or pid is None:
        return None
    return subprocess.Popen(
        [
            os.environ.get("PY_SPY", "py-spy"),
            "record",
            "-p",
            str(pid),
            "-d",
            str(max(1, args.seconds - 1)),
            "-r",
            "200",
            "-f",
            "flamegraph" if args.py_spy.suffix == ".svg" else "raw",
            "-o",
            str(args.py_spy),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def report_wrk(series: dict[str, Series], per_initialize: list[float], connections: int) -> None:
    rows = []
    for path in PATHS:
        s = series[path]
        rows.append(
            [
                path,
                fmt(s.median("rate"), 0),
                fmt(s.median("p50_ms"), 2),
                fmt(s.median("p99_ms"), 2),
                str(sum(run.errors for run in s.runs)),
                fmt(s.median("cpu_us_per_request"), 0),
            ]
        )
    print(f"## initialize through wrk, {connections} connections (medians of the rounds)\n")
    print_table(
        ["path", "initialize/s", "p50 ms", "p99 ms", "errors", "proxy CPU µs/initialize"], rows
    )
    rate = {path: series[path].median("rate") for path in PATHS}
    print()
    print_table(
        [
            "sidecar/nginx",
            "sidecar/direct",
            "SQLite transactions per initialize (per round)",
        ],
        [
            [
                fmt(rate["sidecar"] / rate["nginx"], 2),
                fmt(rate["sidecar"] / rate["direct"], 2),
                ", ".join(fmt(x, 3) for x in per_initialize),
            ]
        ],
    )


# ---- in process: the creation path alone ------------------------------------------------------


class _NoCloses:
    """Nothing is closed in this benchmark: the closer is never asked."""

    def schedule(self, *_: object) -> None:
        raise AssertionError("no close expected")


async def creations(path: Path, count: int, concurrency: int) -> tuple[float, float, int]:
    """Seconds, CPU seconds of this process, and store transactions for `count` creations."""
    store = SqliteStore(str(path))
    await store.open()
    manager = SessionManager(
        store,
        _NoCloses(),  # type: ignore[arg-type]
        Metrics(),
        policy=Policy(idle_timeout=3600),
        limits=Limits(),
        tombstone_ttl=86400,
    )
    numbers = iter(range(count))

    async def worker() -> None:
        for number in numbers:
            identity = f"ip:10.0.{number % 256}.1"
            await manager.admit(identity)
            try:
                await manager.create(
                    f"{os.getpid():x}{number:028x}",
                    Transport.STREAMABLE_HTTP,
                    identity,
                    protocol_version=PROTOCOL_VERSION,
                    user_agent="bench",
                    client_info="bench-initialize 1.0",
                    credentials={},
                    resume=initial_resume_state(INITIALIZE_PARAMS),
                )
            finally:
                manager.release(identity)

    try:
        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert len(manager.live) == count
        return seconds, cpu, store.transactions
    finally:
        await store.close()


def measure_in_process(args: argparse.Namespace, workdir: Path) -> None:
    rows = []
    for concurrency, count in ((args.concurrency, args.creations), (1, args.creations // 10)):
        for number in range(args.rounds):
            db = workdir / f"inproc-{concurrency}-{number}.db"
            seconds, cpu, transactions = uvloop.run(creations(db, count, concurrency))
            rows.append(
                [
                    str(concurrency),
                    str(count),
                    fmt(count / seconds, 0),
                    fmt(cpu / count * 1e6, 0),
                    str(transactions),
                    fmt(count / max(1, transactions), 1),
                ]
            )
    print("\n## The creation path in process (admit + create + release, SQLite, no HTTP)\n")
    print_table(
        [
            "concurrency",
            "creations",
            "creations/s",
            "CPU µs/creation (both threads)",
            "transactions",
            "creations per transaction",
        ],
        rows,
    )


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (16-64)")
    parser.add_argument("--creations", type=int, default=20000, help="in-process, concurrent")
    parser.add_argument("--concurrency", type=int, default=64, help="in-process tasks")
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="write py-spy's samples of the sidecar's first round here (a flame graph if "
        "FILE ends in .svg, else folded stacks) "
        "(py-spy from $PY_SPY or PATH; needs ptrace)",
    )
    parser.add_argument("--skip-wrk", action="store_true")
    parser.add_argument("--skip-in-process", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.skip_wrk:
        for tool in ("wrk", "nginx"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                print(
                    f"bench/initialize.py needs `{tool}` (Debian package {tool})", file=sys.stderr
                )
                return 2
    busy = machine_busy()
    print(f"sidecar: git {sidecar_revision()}")
    print(f"command: python bench/initialize.py {' '.join(argv or sys.argv[1:])}")
    print(f"CPU busy before start: {busy:.0%}; load average {os.getloadavg()[0]:.2f}\n")
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-initialize-") as tmp:
        workdir = Path(tmp)
        if not args.skip_wrk:
            print("  running wrk ...", file=sys.stderr)
            series, per_initialize = measure_wrk(args, workdir)
            report_wrk(series, per_initialize, args.connections)
        if not args.skip_in_process:
            print("  running in process ...", file=sys.stderr)
            measure_in_process(args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
