"""A real Redis for a test: Debian's `redis-server`, on a free 127.0.0.1 port, in its own dir.

Nothing is persisted (`--save ''`, no append-only file), so a stop and a start on the same
port is a Redis that lost nothing only in the sense the tests need: it came back empty, as a
failover to a fresh replica would, unless the test keeps it running. `stop()` and `start()`
again on the same port is how a test takes Redis away mid-run and brings it back.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.peers.processes import HOST, START_TIMEOUT, ManagedProcess, ProcessError, _new_dir
from tests.peers.processes import free_port as _free_port


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def require_redis_server() -> str:
    """The `redis-server` binary, or skip: `.ci/run` installs it, a laptop may not have it."""
    path = redis_server_path()
    if path is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    return path


def ping(port: int, host: str = HOST) -> bool:
    """True when a Redis answers PING on `host:port` (inline command, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process; `url` is what `store.url` takes."""

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        self.binary = require_redis_server()
        self.port = port or _free_port()
        self.workdir = _new_dir(tmp_path, "redis-")
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.process = ManagedProcess(
            args, log_path=self.workdir / "output.log", name=f"redis:{self.port}"
        )
        self.process.start()
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if not self.process.running or time.monotonic() > deadline:
                description = self.process.describe()
                self.process.stop()
                raise ProcessError(f"redis-server did not answer PING: {description}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop it by its PID (SIGTERM, then SIGKILL if it hangs)."""
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None and self.process.running:
            self.process.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
