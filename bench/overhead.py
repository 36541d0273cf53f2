"""What the sidecar costs per request, next to nginx doing plain reverse proxying.

Three paths to the same upstream, measured with `wrk` (Debian's package) in alternating rounds
so that drift hits all of them alike, and the medians of the rounds reported:

* **direct**: wrk -> upstream;
* **nginx**: wrk -> nginx `proxy_pass` (HTTP/1.1, upstream keepalive, no buffering) -> upstream;
* **sidecar**: wrk -> `mcp-sidecar serve` (production defaults, log level info) -> upstream.

Upstreams:

* **canned**: nginx answering every request with a fixed JSON-RPC result and an
  `Mcp-Session-Id` (a fresh one when the request named none, else the one it named): the
  fastest server there can be, so what is left is the proxy's own cost;
* **fastmcp**: the test suite's real FastMCP server (MCP SDK 1.30, SSE answers).

A second part sends a steady `--rate` (500) req/s to the canned upstream, open loop (each
latency counted from when its request was due), on one session directly and through the
sidecar: the latency the sidecar adds when it is not saturated, p50 and p99.

Each request is a JSON-RPC `ping` with its own id (a wrk Lua script), on one session shared by
all connections or round-robin over many. The sidecar's CPU per request comes from
`/proc/PID/stat` (user + system) over the wrk run; nginx's from its worker process.

    python bench/overhead.py                    # ~2 min: every variant, 3 rounds of 5 s
    python bench/overhead.py --variants canned-1 --rounds 5 --seconds 10

On this 2-core machine wrk, the proxy and the upstream share the CPUs: the ratios compare
proxies under the same squeeze, they are not what a larger machine would show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from benchlib import (
    ACCEPT,
    HOST,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    SESSION_HEADER,
    BenchError,
    fmt,
    initialize,
    machine_busy,
    print_table,
    process_cpu_seconds,
    sidecar_revision,
    start_upstream,
)

from tests.peers.processes import ManagedProcess, SidecarHandle, free_ports, start_sidecar

PATHS = ("direct", "nginx", "sidecar")
CANNED_ANSWER = (
    '{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-06-18",'
    '"capabilities":{},"serverInfo":{"name":"canned","version":"1"}}}'
)

# Each request its own id; the session round-robin over the ids given after `--`.
WRK_SCRIPT = textwrap.dedent(
    """\
    local sessions = {}
    local counter = 0
    local path = "/mcp"
    function init(args)
      for id in string.gmatch(args[1], "[^,]+") do table.insert(sessions, id) end
      path = args[2]
    end
    function request()
      counter = counter + 1
      local body = '{"jsonrpc":"2.0","id":' .. counter .. ',"method":"ping"}'
      local headers = {}
      headers["Content-Type"] = "application/json"
      headers["Accept"] = "%(accept)s"
      headers["%(protocol_header)s"] = "%(protocol_version)s"
      headers["%(session_header)s"] = sessions[(counter %% #sessions) + 1]
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
) % {
    "accept": ACCEPT,
    "protocol_header": PROTOCOL_HEADER,
    "protocol_version": PROTOCOL_VERSION,
    "session_header": SESSION_HEADER,
}


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    upstream: str  # "canned" or "fastmcp"
    sessions: int
    what: str


VARIANTS = {
    v.name: v
    for v in (
        Variant("canned-1", "canned", 1, "canned JSON upstream, one session"),
        Variant("canned-many", "canned", 200, "canned JSON upstream, 200 sessions"),
        Variant("fastmcp-1", "fastmcp", 1, "FastMCP (SSE answers), one session"),
    )
}


@dataclass(slots=True)
class Run:
    """One wrk run on one path."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(slots=True)
class Series:
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        values = [float(getattr(run, attribute)) for run in self.runs]
        return statistics.median(values) if values else float("nan")


# ---- nginx -----------------------------------------------------------------------------------


class Nginx:
    """One nginx master with one worker, its files in its own directory."""

    def __init__(self, workdir: Path, name: str, servers: str) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.dir = workdir / name
        self.dir.mkdir()
        conf = self.dir / "nginx.conf"
        conf.write_text(
            textwrap.dedent(
                f"""\
                daemon off;
                master_process on;
                worker_processes 1;
                pid {self.dir}/nginx.pid;
                error_log {self.dir}/error.log warn;
                events {{ worker_connections 4096; }}
                http {{
                  access_log off;
                  client_body_temp_path {self.dir}/body;
                  proxy_temp_path {self.dir}/proxy;
                  keepalive_requests 1000000;
                  keepalive_timeout 75s;
                """
            )
            + textwrap.indent(servers, "  ")
            + "}\n"
        )
        self.process = ManagedProcess(
            [binary, "-p", str(self.dir), "-c", str(conf)],
            log_path=self.dir / "stdout.log",
            name=f"nginx-{name}",
        )

    def start(self, ports: Sequence[int]) -> None:
        self.process.start()
        for port in ports:
            self.process.wait_port(HOST, port)

    @property
    def worker_pid(self) -> int | None:
        """The one worker (the master only forks it); None before it exists."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def stop(self) -> None:
        self.process.stop()


def canned_server(port: int) -> str:
    return textwrap.dedent(
        f"""\
        map $http_mcp_session_id $mcp_sid {{ "" $request_id; default $http_mcp_session_id; }}
        server {{
          listen {HOST}:{port};
          location / {{
            default_type application/json;
            add_header Mcp-Session-Id $mcp_sid always;
            return 200 '{CANNED_ANSWER}';
          }}
        }}
        """
    )


def proxy_server(port: int, upstream_port: int, name: str) -> str:
    # The FastMCP server refuses a foreign Host (DNS-rebinding guard): send its own.
    return textwrap.dedent(
        f"""\
        upstream {name} {{ server {HOST}:{upstream_port}; keepalive 64; }}
        server {{
          listen {HOST}:{port};
          location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {HOST}:{upstream_port};
            proxy_buffering off;
          }}
        }}
        """
    )


# ---- the load --------------------------------------------------------------------------------


async def open_sessions(base: str, count: int) -> list[str]:
    """`initialize` + `notifications/initialized` per session, through the path measured."""
    async with aiohttp.ClientSession() as client:
        return [(await initialize(client, base)).session_id for _ in range(count)]


def run_wrk(
    script: Path, base: str, sessions: Sequence[str], args: argparse.Namespace, pid: int | None
) -> Run:
    origin, _, path = base.partition("//")[2].partition("/")
    command = [
        shutil.which("wrk") or "wrk",
        "-t1",
        f"-c{args.connections}",
        f"-d{args.seconds}s",
        "-s",
        str(script),
        f"http://{origin}",
        "--",
        ",".join(sessions),
        "/" + path,
    ]
    cpu_before = process_cpu_seconds(pid) if pid else float("nan")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    cpu = (process_cpu_seconds(pid) - cpu_before) if pid else float("nan")
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr}")
    report = json.loads(line[4:])
    requests = int(report["requests"])
    return Run(
        requests=requests,
        seconds=report["duration_us"] / 1e6,
        p50_ms=report["p50_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        errors=int(report["errors"]) + int(report["non2xx"]),
        cpu_us_per_request=cpu / max(1, requests) * 1e6,
    )


# ---- the run ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Stack:
    bases: dict[str, dict[str, str]]  # upstream kind -> path -> base URL
    pids: dict[str, int | None]  # path -> the proxy process whose CPU is counted
    stop: list[ManagedProcess | Nginx | SidecarHandle]


def start_stack(workdir: Path, kinds: set[str]) -> Stack:
    stack = Stack({}, {}, [])
    try:
        canned_port, proxy_canned, proxy_fastmcp = free_ports(3)
        proxies = ""
        if "canned" in kinds:
            canned = Nginx(workdir, "canned", canned_server(canned_port))
            stack.stop.append(canned)
            canned.start([canned_port])
            proxies += proxy_server(proxy_canned, canned_port, "canned")
            stack.bases["canned"] = {"direct": f"http://{HOST}:{canned_port}/mcp"}
        if "fastmcp" in kinds:
            process, url = start_upstream("fastmcp", workdir)
            stack.stop.append(process)
            fast_port = int(url.split(":")[2].split("/")[0])
            proxies += proxy_server(proxy_fastmcp, fast_port, "fastmcp")
            stack.bases["fastmcp"] = {"direct": url}
        proxy = Nginx(workdir, "proxy", proxies)
        stack.stop.append(proxy)
        ports = []
        for kind, port in (("canned", proxy_canned), ("fastmcp", proxy_fastmcp)):
            if kind in stack.bases:
                stack.bases[kind]["nginx"] = f"http://{HOST}:{port}/mcp"
                ports.append(port)
        proxy.start(ports)
        stack.pids["nginx"] = proxy.worker_pid
        stack.pids["direct"] = None
        for kind, bases in stack.bases.items():
            sidecar = start_sidecar(
                workdir / f"sidecar-{kind}", bases["direct"], log={"level": "info"}
            )
            stack.stop.append(sidecar)
            bases["sidecar"] = sidecar.url
            stack.pids[f"sidecar-{kind}"] = sidecar.proc.pid
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: Stack) -> None:
    for thing in reversed(stack.stop):
        thing.stop()


def measure(
    variant: Variant, stack: Stack, script: Path, args: argparse.Namespace
) -> dict[str, Series]:
    bases = stack.bases[variant.upstream]
    sessions = {path: asyncio.run(open_sessions(bases[path], variant.sessions)) for path in PATHS}
    pids = {
        "direct": None,
        "nginx": stack.pids["nginx"],
        "sidecar": stack.pids[f"sidecar-{variant.upstream}"],
    }
    warm = argparse.Namespace(**{**vars(args), "seconds": 1})
    for path in PATHS:
        run_wrk(script, bases[path], sessions[path], warm, None)
    series = {path: Series() for path in PATHS}
    for number in range(args.rounds):
        order = PATHS if number % 2 == 0 else tuple(reversed(PATHS))
        for path in order:
            series[path].runs.append(run_wrk(script, bases[path], sessions[path], args, pids[path]))
    return series


async def paced_latencies(base: str, session_id: str, rate: int, seconds: float) -> list[float]:
    """Open-loop load: a request every 1/rate s whether or not earlier ones were answered;
    each latency counts from when its request was due (no coordinated omission)."""
    headers = {
        "Accept": ACCEPT,
        "Content-Type": "application/json",
        SESSION_HEADER: session_id,
        PROTOCOL_HEADER: PROTOCOL_VERSION,
    }
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def one(number: int, due: float) -> None:
            body = b'{"jsonrpc":"2.0","id":%d,"method":"ping"}' % number
            try:
                async with client.post(base, data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        latencies.append(loop.time() - due)
                        return
            except aiohttp.ClientError:
                pass
            latencies.append(math.inf)  # an error counts as the worst latency

        start = loop.time() + 0.05
        tasks = []
        for number in range(int(rate * seconds)):
            due = start + number / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            tasks.append(asyncio.create_task(one(number + 1, due)))
        await asyncio.gather(*tasks)
    return latencies


def measure_paced(
    variant: Variant, stack: Stack, args: argparse.Namespace
) -> dict[str, list[float]]:
    bases = stack.bases[variant.upstream]
    results: dict[str, list[float]] = {"direct": [], "sidecar": []}
    sessions = {path: asyncio.run(open_sessions(bases[path], 1))[0] for path in results}
    for number in range(args.rounds):
        for path in ("direct", "sidecar") if number % 2 == 0 else ("sidecar", "direct"):
            results[path] += asyncio.run(
                paced_latencies(bases[path], sessions[path], args.rate, args.seconds)
            )
    return results


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def report_paced(paced: dict[str, dict[str, list[float]]], rate: int) -> None:
    rows = []
    for name, results in paced.items():
        direct, sidecar = results["direct"], results["sidecar"]
        rows.append(
            [
                name,
                f"{len(sidecar)} ({sum(math.isinf(x) for x in direct + sidecar)} failed)",
                fmt(percentile(direct, 0.5) * 1000, 2),
                fmt(percentile(sidecar, 0.5) * 1000, 2),
                fmt(percentile(direct, 0.99) * 1000, 2),
                fmt(percentile(sidecar, 0.99) * 1000, 2),
                fmt((percentile(sidecar, 0.99) - percentile(direct, 0.99)) * 1000, 2),
            ]
        )
    print(f"\n## Added latency at a steady {rate} req/s (open loop, one session)\n")
    print_table(
        [
            "variant",
            "requests",
            "p50 direct ms",
            "p50 sidecar ms",
            "p99 direct ms",
            "p99 sidecar ms",
            "p99 added ms",
        ],
        rows,
    )


def report(results: dict[str, dict[str, Series]]) -> None:
    rows = []
    for name, series in results.items():
        for path in PATHS:
            s = series[path]
            rows.append(
                [
                    name,
                    path,
                    fmt(s.median("rate"), 0),
                    fmt(s.median("p50_ms"), 2),
                    fmt(s.median("p99_ms"), 2),
                    str(sum(run.errors for run in s.runs)),
                    fmt(s.median("cpu_us_per_request"), 0),
                ]
            )
    print("## Runs (medians of the rounds)\n")
    print_table(
        ["variant", "path", "req/s", "p50 ms", "p99 ms", "errors", "proxy CPU µs/req"], rows
    )
    ratios = []
    for name, series in results.items():
        rate = {path: series[path].median("rate") for path in PATHS}
        p50 = {path: series[path].median("p50_ms") for path in PATHS}
        ratios.append(
            [
                name,
                VARIANTS[name].what,
                fmt(rate["sidecar"] / rate["nginx"], 2),
                fmt(rate["sidecar"] / rate["direct"], 2),
                fmt(rate["nginx"] / rate["direct"], 2),
                fmt(p50["sidecar"] - p50["direct"], 2),
            ]
        )
    print("\n## Ratios\n")
    print_table(
        [
            "variant",
            "what",
            "sidecar/nginx req/s",
            "sidecar/direct req/s",
            "nginx/direct req/s",
            "p50 added ms (sidecar)",
        ],
        ratios,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--rate", type=int, default=500, help="steady req/s for the added-latency run (0: skip)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [VARIANTS[name] for name in args.variants.split(",")]
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench/overhead.py needs `{tool}` (Debian package {tool})", file=sys.stderr)
            return 2
    busy = machine_busy()
    print(f"sidecar: git {sidecar_revision()}")
    print(f"command: python bench/overhead.py {' '.join(argv or sys.argv[1:])}")
    print(f"CPU busy before start: {busy:.0%}\n")
    with tempfile.TemporaryDirectory(prefix="mcp-sidecar-overhead-") as tmp:
        workdir = Path(tmp)
        script = workdir / "ping.lua"
        script.write_text(WRK_SCRIPT)
        stack = start_stack(workdir, {v.upstream for v in variants})
        try:
            results = {}
            paced = {}
            for variant in variants:
                print(f"  running {variant.name} ...", file=sys.stderr)
                results[variant.name] = measure(variant, stack, script, args)
                if args.rate and variant.sessions == 1 and variant.upstream == "canned":
                    paced[variant.name] = measure_paced(variant, stack, args)
        finally:
            stop_stack(stack)
    report(results)
    if paced:
        report_paced(paced, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
