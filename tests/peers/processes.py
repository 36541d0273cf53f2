"""Start, watch and stop the real processes of an integration test: upstream and sidecar.

Plain helpers, not fixtures (``tests/conftest.py`` wraps them), so a test can also start a
second sidecar, restart one with the same ports and database, or kill one with SIGKILL.
Every process writes stdout and stderr to a log file in the test's tmp dir; ``output()``
returns it for assertion messages. Everything binds 127.0.0.1 on a free port.

The calls block (subprocess start, TCP polling, waiting for exit). From an async test
that still has a client talking through the process, run them in a thread
(``await asyncio.to_thread(sidecar.terminate)``), or a graceful shutdown waits for
requests the blocked event loop cannot finish.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

TomlValue = str | int | float | bool | list[Any] | dict[str, Any]

# `server.fast_path` for every sidecar started without one in its config; the `fast_path`
# fixture (tests/conftest.py) sets it, so a behaviour test runs once each way.
fast_path_default: bool | None = None


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the kernel's pick; tiny race until it is bound)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct free ports: all held open while picking, so none comes back twice."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class ProcessError(RuntimeError):
    """A managed process died, never listened, or would not stop; the message has its output."""


class ManagedProcess:
    """One subprocess with its output in a log file; stopped for sure on context exit."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO_ROOT,
        name: str | None = None,
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.name = name or Path(self.args[0]).name
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        if self.running:
            raise ProcessError(f"{self.name} is already running (pid {self.pid})")
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"  # so output() shows what happened up to now
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.args, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise ProcessError(f"{self.name} was never started")
        return self._popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running (or never started), else the exit code (-N: killed by signal N)."""
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid}, exit {self.returncode}); output:\n{self.output()}"

    def wait_port(self, host: str, port: int, timeout: float = START_TIMEOUT) -> None:
        """Return once `host:port` accepts TCP connections; raise if the process dies first."""
        deadline = time.monotonic() + timeout
        while not port_open(host, port):
            if not self.running:
                raise ProcessError(f"exited before listening on {host}:{port}: {self.describe()}")
            if time.monotonic() > deadline:
                raise ProcessError(
                    f"not listening on {host}:{port} after {timeout}s: {self.describe()}"
                )
            time.sleep(0.05)

    def send_signal(self, signum: int) -> None:
        if self.running:
            self.popen.send_signal(signum)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait, return the exit code; a process that hangs is killed and reported."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ProcessError(f"ignored SIGTERM for {timeout}s: {self.describe()}") from None

    def kill(self) -> int:
        """SIGKILL (a crash, for the store's durability tests) and reap; return the exit code."""
        self.send_signal(signal.SIGKILL)
        return self.popen.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Teardown: end it however it takes, never raise."""
        if not self.running:
            return
        self.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> Self:
        return self if self._popen is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _new_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory per process, so several in one test never share files."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def _clean_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    # A developer's MCP_SIDECAR_* variables would silently override the test's config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_SIDECAR_")}
    env.update(extra or {})
    return env


# --- the upstream MCP server --------------------------------------------------------------


class UpstreamHandle:
    """A running ``tests.peers.upstream_server`` and its JSONL request log."""

    def __init__(
        self, process: ManagedProcess, *, port: int, transport: str, request_log: Path
    ) -> None:
        self.process = process
        self.port = port
        self.transport = transport
        self.request_log = request_log

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The MCP endpoint (``…/mcp``); for the legacy transport alone, the base URL."""
        return self.base if self.transport == "sse" else f"{self.base}/mcp"

    @property
    def sse_url(self) -> str:
        """The legacy transport's SSE endpoint (``…/sse``)."""
        return f"{self.base}/sse"

    def requests(self) -> list[dict[str, Any]]:
        """Every request that got a response so far: method, path, session_id, status,
        response_session_id (the ``Mcp-Session-Id`` the server answered with), authorization,
        header_session_id (``session_id`` from the header alone, not a query parameter)."""
        try:
            text = self.request_log.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def deletes(self) -> list[str]:
        """Session ids of the DELETE requests the server answered, in order."""
        return [r["session_id"] for r in self.requests() if r["method"] == "DELETE"]

    def requests_for(self, session_id: str) -> list[dict[str, Any]]:
        return [r for r in self.requests() if r["session_id"] == session_id]

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> None:
        self.process.stop()


def start_upstream(
    tmp_path: Path,
    transport: str = "streamable-http",
    *,
    stateless: bool = False,
    json_response: bool = False,
    sse_ping: float | None = None,
    port: int | None = None,
    timeout: float = START_TIMEOUT,
) -> UpstreamHandle:
    """Start the real FastMCP server on a free port and wait until it listens.

    `transport` is "streamable-http", "sse" or "both"; `sse_ping` sets the interval of the
    ``: ping`` comments on its SSE streams (default 15 s)."""
    workdir = _new_dir(tmp_path, "upstream-")
    port = port or free_port()
    request_log = workdir / "requests.jsonl"
    args = [
        sys.executable,
        "-m",
        "tests.peers.upstream_server",
        "--port",
        str(port),
        "--transport",
        transport,
        "--log",
        str(request_log),
    ]
    if stateless:
        args.append("--stateless")
    if json_response:
        args.append("--json-response")
    if sse_ping is not None:
        args += ["--sse-ping", str(sse_ping)]
    process = ManagedProcess(args, log_path=workdir / "output.log", name=f"upstream:{port}")
    process.start()
    try:
        process.wait_port(HOST, port, timeout)
    except BaseException:
        process.stop()
        raise
    return UpstreamHandle(process, port=port, transport=transport, request_log=request_log)


# --- the sidecar ---------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "-_" for c in key) and key.isascii()
    return key if bare else json.dumps(key)


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON strings are TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """Sections of scalars, arrays and inline tables: all the sidecar's config needs."""
    lines: list[str] = []
    for section, table in config.items():
        lines.append(f"[{_toml_key(section)}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)


def merge_config(
    base: Mapping[str, Mapping[str, TomlValue]], overrides: Mapping[str, Mapping[str, TomlValue]]
) -> dict[str, dict[str, TomlValue]]:
    merged = {section: dict(table) for section, table in base.items()}
    for section, table in overrides.items():
        merged.setdefault(section, {}).update(table)
    return merged


class SidecarHandle:
    """A ``python -m sidecar serve`` process with its config file, ports and database.

    The ports and the database survive ``restart()``; the output of every run is appended
    to the same log, so ``output()`` tells the whole story.
    """

    def __init__(
        self,
        workdir: Path,
        config: dict[str, dict[str, TomlValue]],
        *,
        path: str,
        env: Mapping[str, str] | None = None,
        wait_admin: bool = True,
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.path = path
        self.env = _clean_env(env)
        self.wait_admin = wait_admin
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "output.log"
        self.listen_port = int(str(config["server"]["listen"]).rpartition(":")[2])
        self.admin_port = int(str(config["admin"]["listen"]).rpartition(":")[2])
        self.db_path = Path(str(config["store"]["path"]))
        self.runs = 0
        self.process: ManagedProcess | None = None
        self.write_config()

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.listen_port}"

    @property
    def url(self) -> str:
        """The sidecar's URL for the upstream's endpoint (same path, e.g. ``…/mcp``)."""
        return self.base + self.path

    @property
    def sse_url(self) -> str:
        return self.base + str(self.config["upstream"].get("sse_path", "/sse"))

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config), encoding="utf-8")

    def update_config(self, **overrides: Mapping[str, TomlValue]) -> None:
        """Merge section overrides into the config file (takes effect on reload or restart)."""
        self.config = merge_config(self.config, overrides)
        self.write_config()

    def reload(self, **overrides: Mapping[str, TomlValue]) -> None:
        """Rewrite the config file with the overrides and send SIGHUP."""
        self.update_config(**overrides)
        self.send_signal(signal.SIGHUP)

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        self.runs += 1
        if self.runs > 1:
            with self.log_path.open("a", encoding="utf-8") as log:
                log.write(f"\n----- sidecar run {self.runs} -----\n")
        args = [sys.executable, "-m", "sidecar", "serve", "--config", str(self.config_path)]
        self.process = ManagedProcess(
            args, log_path=self.log_path, env=self.env, name=f"sidecar:{self.listen_port}"
        )
        self.process.start()
        try:
            self.process.wait_port(HOST, self.listen_port, timeout)
            if self.wait_admin:
                self.process.wait_port(HOST, self.admin_port, timeout)
                self.wait_restored(timeout)
        except BaseException:
            self.process.stop()
            raise
        return self

    def wait_restored(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the start's restore has read every session back (`/readyz` no longer
        says ``"restoring"``). The proxy port opens before that (ids not read yet are looked up
        in the store), so a test that reads the database right after a start waits here, as
        an operator's readiness probe would."""
        deadline = time.monotonic() + timeout
        while _readyz(self.admin_url).get("restoring"):
            if not self.proc.running:
                raise ProcessError(f"exited while restoring: {self.proc.describe()}")
            if time.monotonic() > deadline:
                raise ProcessError(f"still restoring after {timeout}s: {self.proc.describe()}")
            time.sleep(0.02)

    @property
    def proc(self) -> ManagedProcess:
        if self.process is None:
            raise ProcessError("the sidecar was never started")
        return self.process

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (graceful shutdown) and return the exit code."""
        return self.proc.terminate(timeout)

    def kill(self) -> int:
        """SIGKILL: a crash, nothing flushed."""
        return self.proc.kill()

    def restart(self, timeout: float = START_TIMEOUT) -> Self:
        """Start again with the same config, ports and database (SIGTERM first if running)."""
        if self.process is not None and self.process.running:
            self.terminate()
        return self.start(timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


def _readyz(admin_url: str) -> dict[str, Any]:
    """The admin `/readyz` body; {} when it cannot be read (TLS admin, not up): no wait."""
    try:
        with urllib.request.urlopen(f"{admin_url}/readyz", timeout=2) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:  # 503 while not ready: the body still says why
        raw = exc.read()
    except OSError:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def start_sidecar(
    tmp_path: Path,
    upstream_url: str,
    *,
    env: Mapping[str, str] | None = None,
    wait_admin: bool = True,
    timeout: float = START_TIMEOUT,
    **config_overrides: Mapping[str, TomlValue],
) -> SidecarHandle:
    """Write a config for `upstream_url`, start the sidecar and wait until it listens.

    `config_overrides` are sections of SPEC 3.1, merged over the defaults here, e.g.
    ``start_sidecar(tmp_path, upstream.url, sessions={"idle_timeout": 2})``.
    """
    workdir = _new_dir(tmp_path, "sidecar-")
    listen_port, admin_port = free_ports(2)
    defaults: dict[str, dict[str, TomlValue]] = {
        "server": {"listen": f"{HOST}:{listen_port}"},
        "upstream": {"url": upstream_url},
        "sessions": {},
        "store": {"path": str(workdir / "sessions.db")},
        "admin": {"listen": f"{HOST}:{admin_port}"},
        "log": {"level": "debug"},
    }
    if fast_path_default is not None:
        defaults["server"]["fast_path"] = fast_path_default
    config = merge_config(defaults, config_overrides)
    handle = SidecarHandle(
        workdir, config, path=urlsplit(upstream_url).path, env=env, wait_admin=wait_admin
    )
    return handle.start(timeout)


class SidecarFactory:
    """Starts sidecars in one test's tmp dir and stops every one of them at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[SidecarHandle] = []

    def __call__(
        self,
        upstream_url: str,
        *,
        env: Mapping[str, str] | None = None,
        wait_admin: bool = True,
        timeout: float = START_TIMEOUT,
        **config_overrides: Mapping[str, TomlValue],
    ) -> SidecarHandle:
        handle = start_sidecar(
            self.tmp_path,
            upstream_url,
            env=env,
            wait_admin=wait_admin,
            timeout=timeout,
            **config_overrides,
        )
        self.started.append(handle)
        return handle

    def stop_all(self) -> None:
        for handle in self.started:
            handle.stop()
