"""Node.js peers for interop tests: the TypeScript SDK's client and its reference server.

Plain helpers, not fixtures. What is here:

* ``node_available()`` -> ``None``, or why the Node peers cannot run (use it as a skip reason);
* ``start_server_everything(tmp_path, mode)`` -> ``NodeServer``:
  ``@modelcontextprotocol/server-everything`` on 127.0.0.1 and a free port, in
  ``"streamable-http"`` mode (endpoint ``/mcp``) or legacy ``"sse"`` mode (stream ``/sse``,
  messages ``POST /message?sessionId=…``);
* ``run_client(script, timeout)`` -> the JSON lines of ``tests/node/client.mjs``, a driver
  around the TypeScript SDK's ``Client`` (script format and output documented there);
  ``await run_client_async(...)`` from an async test whose event loop serves the sidecar.

server-everything (2026.8.31, SDK 1.32.2) behaviours the sidecar meets:

* Streamable HTTP: a POST/GET/DELETE with an unknown or already deleted session id gets
  ``400 {"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID
  provided"}}`` (no ``id`` member), never 404; a POST without a session id that is not an
  ``initialize`` gets ``400 … "Bad Request: Server not initialized"`` with ``"id":null``.
  DELETE of a live session: 200, empty body, and the session is gone.
  Every SSE stream (GET and POST responses) carries a ``: keepalive`` comment every 15 s, and
  for protocol 2025-11-25 a POST's SSE response starts with a priming event
  (``id: <uuid>`` + empty ``data:``).
* Legacy SSE: a POST to ``/message`` with an unknown session id is never answered (the
  request hangs until the client gives up); the stream sends no keepalives; closing the
  stream frees the session.
* It binds all interfaces by default (``app.listen(PORT)``); ``start_server_everything``
  preloads a tiny ``--import`` module that pins such listens to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

from tests.peers.processes import (
    HOST,
    START_TIMEOUT,
    STOP_TIMEOUT,
    ManagedProcess,
    ProcessError,
    free_port,
)

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
CLIENT_SCRIPT = NODE_DIR / "client.mjs"
NODE_MODULES = NODE_DIR / "node_modules"
SDK_PACKAGE = NODE_MODULES / "@modelcontextprotocol" / "sdk" / "package.json"
SERVER_EVERYTHING_DIR = NODE_MODULES / "@modelcontextprotocol" / "server-everything"
SERVER_EVERYTHING_ENTRY = SERVER_EVERYTHING_DIR / "dist" / "index.js"
MIN_NODE_MAJOR = 20

Mode = Literal["streamable-http", "sse"]

# server-everything's launcher argument, endpoint path and message path per mode.
_MODES: dict[str, tuple[str, str, str]] = {
    "streamable-http": ("streamableHttp", "/mcp", "/mcp"),
    "sse": ("sse", "/sse", "/message"),
}

# Preloaded with `node --import`: a listen(port[, cb]) without a host binds 127.0.0.1
# instead of every interface.
_LOOPBACK_PRELOAD = f"""
import net from "node:net";
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {{
  const port = args[0];
  const portOnly = typeof port === "number" || (typeof port === "string" && /^\\d+$/.test(port));
  if (portOnly && (args.length === 1 || typeof args[1] === "function")) {{
    args.splice(1, 0, "{HOST}");
  }}
  return listen.apply(this, args);
}};
"""
LOOPBACK_IMPORT = "data:text/javascript," + quote(_LOOPBACK_PRELOAD)


class NodeClientError(RuntimeError):
    """client.mjs timed out, failed, or printed something that is not a JSON line."""

    def __init__(self, message: str, *, lines: list[dict[str, Any]], stderr: str) -> None:
        super().__init__(f"{message}\nlines so far: {lines}\nstderr:\n{stderr}")
        self.lines = lines
        self.stderr = stderr


@cache
def _node_version(node: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        return tuple(int(part) for part in out.strip().lstrip("v").split("."))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def node_executable() -> str | None:
    return shutil.which("node")


def node_available() -> str | None:
    """None when the Node peers can run, else the reason (meant as a pytest skip reason)."""
    node = node_executable()
    if node is None:
        return f"node is not installed (Node.js >= {MIN_NODE_MAJOR} is needed)"
    version = _node_version(node)
    if version is None or version[0] < MIN_NODE_MAJOR:
        shown = "unknown" if version is None else ".".join(map(str, version))
        return f"node {shown} is too old or broken (Node.js >= {MIN_NODE_MAJOR} is needed)"
    if not (SDK_PACKAGE.is_file() and SERVER_EVERYTHING_ENTRY.is_file()):
        return "tests/node/node_modules is missing: run npm ci --prefix tests/node"
    return None


def _require_node() -> str:
    reason = node_available()
    node = node_executable()
    if reason is not None or node is None:
        raise ProcessError(reason or "node is not installed")
    return node


class NodeServer:
    """A running server-everything; ``url`` is the endpoint a client is given."""

    def __init__(self, process: ManagedProcess, *, mode: Mode, port: int) -> None:
        self.process = process
        self.mode = mode
        self.port = port
        _, self.path, self.message_path = _MODES[mode]

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:P/mcp`` (streamable-http) or ``http://127.0.0.1:P/sse`` (sse)."""
        return self.base + self.path

    @property
    def running(self) -> bool:
        return self.process.running

    def output(self) -> str:
        return self.process.output()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after `timeout`; never raises (server-everything has no
        SIGTERM handler, so it simply dies)."""
        self.process.stop(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server_everything(
    tmp_path: Path,
    mode: Mode = "streamable-http",
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> NodeServer:
    """Start ``server-everything`` (``node dist/index.js streamableHttp|sse`` with ``PORT``)
    on 127.0.0.1 and wait until its port accepts connections. Output goes to
    ``tmp_path/server-everything-<mode>-<port>.log``."""
    node = _require_node()
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, not {mode!r}")
    launcher_arg = _MODES[mode][0]
    attempts = 1 if port is not None else 3  # a picked free port can be taken meanwhile
    for attempt in range(attempts):
        chosen = port or free_port()
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env["PORT"] = str(chosen)
        process = ManagedProcess(
            [node, f"--import={LOOPBACK_IMPORT}", str(SERVER_EVERYTHING_ENTRY), launcher_arg],
            log_path=tmp_path / f"server-everything-{mode}-{chosen}.log",
            env=child_env,
            cwd=tmp_path,
            name=f"server-everything:{mode}:{chosen}",
        )
        process.start()
        try:
            process.wait_port(HOST, chosen, timeout)
        except ProcessError:
            process.stop()
            if attempt + 1 < attempts and "EADDRINUSE" in process.output():
                continue
            raise
        except BaseException:
            process.stop()
            raise
        return NodeServer(process, mode=mode, port=chosen)
    raise AssertionError("unreachable")


def _parse_lines(stdout: str, stderr: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for raw in stdout.splitlines():
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise NodeClientError(
                f"client.mjs printed a non-JSON line: {raw!r}", lines=lines, stderr=stderr
            ) from None
        if not isinstance(value, dict):
            raise NodeClientError(f"not a JSON object: {raw!r}", lines=lines, stderr=stderr)
        lines.append(value)
    return lines


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def run_client(script: Mapping[str, Any], timeout: float = 30.0) -> list[dict[str, Any]]:
    """Run ``client.mjs`` with `script` (on stdin) and return its JSON lines.

    Failed steps are lines with ``"ok": false`` (the driver carries on); this raises
    ``NodeClientError`` only if the driver itself times out, fails or prints garbage.
    Blocking: from an async test use ``run_client_async``.
    """
    node = _require_node()
    try:
        done = subprocess.run(
            [node, str(CLIENT_SCRIPT)],
            input=json.dumps(script),
            capture_output=True,
            text=True,
            cwd=NODE_DIR,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it already
        stderr = _text(exc.stderr)
        try:
            partial = _parse_lines(_text(exc.stdout), stderr)
        except NodeClientError:
            partial = []
        raise NodeClientError(
            f"client.mjs did not finish within {timeout}s", lines=partial, stderr=stderr
        ) from None
    lines = _parse_lines(done.stdout, done.stderr)
    if done.returncode != 0:
        raise NodeClientError(
            f"client.mjs exited with {done.returncode}", lines=lines, stderr=done.stderr
        )
    return lines


async def run_client_async(
    script: Mapping[str, Any],
    timeout: float = 30.0,  # noqa: ASYNC109 - enforced on the node process, which it kills
) -> list[dict[str, Any]]:
    """``run_client`` in a worker thread, so the test's event loop keeps serving meanwhile.

    `timeout` is enforced on the node process (it is killed), which cancelling the awaiting
    task could not do."""
    return await asyncio.to_thread(run_client, script, timeout)


# --- reading the driver's output ------------------------------------------------------------


def step_results(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step lines (``{"step": i, "op": …, "ok": …}``), in step order."""
    return [line for line in lines if "op" in line and "event" not in line]


def events(lines: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The ``{"event": kind, …}`` lines, e.g. ``events(lines, "progress")``."""
    return [line for line in lines if line.get("event") == kind]


def make_script(
    url: str, transport: Mode, *steps: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """A client.mjs script, e.g.
    ``make_script(server.url, "sse", {"op": "connect"}, {"op": "listTools"}, timeoutMs=5000)``.
    """
    return {"url": url, "transport": transport, "steps": [dict(s) for s in steps], **extra}


REQUEST_LOG_SCRIPT = NODE_DIR / "request_log.mjs"


class LoggedEverything(NodeServer):
    """server-everything (Streamable HTTP) behind ``tests/node/request_log.mjs``: its
    ``request_log`` has one JSON line per request in ``tests.peers.upstream_server``'s format,
    so a verdict written for FastMCP's log reads it unchanged."""

    def __init__(self, process: ManagedProcess, *, port: int, request_log: Path) -> None:
        super().__init__(process, mode="streamable-http", port=port)
        self.request_log = request_log


def start_logged_everything(tmp_path: Path, *, timeout: float = START_TIMEOUT) -> LoggedEverything:
    """Start server-everything's Streamable HTTP app with a request log, on 127.0.0.1 and a
    free port (``url`` is its ``/mcp``; the log: ``tmp_path/everything-requests-<port>.jsonl``)."""
    node = _require_node()
    chosen = free_port()
    request_log = tmp_path / f"everything-requests-{chosen}.jsonl"
    process = ManagedProcess(
        [node, f"--import={LOOPBACK_IMPORT}", str(REQUEST_LOG_SCRIPT), str(request_log)],
        log_path=tmp_path / f"server-everything-logged-{chosen}.log",
        env={**os.environ, "PORT": str(chosen)},
        cwd=NODE_DIR,
        name=f"server-everything:logged:{chosen}",
    )
    process.start()
    try:
        process.wait_port(HOST, chosen, timeout)
    except BaseException:
        process.stop()
        raise
    return LoggedEverything(process, port=chosen, request_log=request_log)
