"""A real Redis for a test: Debian's `redis-server`, on a free 127.0.0.1 port, in its own dir.

Nothing is persisted on its own (`--save ''`, no append-only file): `stop()` and `start()`
again on the same port bring back an empty Redis, as a failover to a fresh replica would;
`stop(keep_data=True)` writes a snapshot first (SAVE) that the next start loads from its dir,
as a Redis restarted with its data would. That is how a test takes Redis away mid-run and
brings it back.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
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


def _inline(port: int, command: bytes, expect: bytes, tls: ssl.SSLContext | None = None) -> bool:
    """Send one inline command (no client library); True when the reply starts with `expect`."""
    try:
        with socket.create_connection((HOST, port), timeout=5.0) as raw:
            if tls is None:
                raw.sendall(command + b"\r\n")
                return raw.recv(64).startswith(expect)
            with tls.wrap_socket(raw, server_hostname=HOST) as sock:
                sock.sendall(command + b"\r\n")
                return sock.recv(64).startswith(expect)
    except OSError:
        return False


def ping(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """True when a Redis answers PING on `port` (one with a password answers NOAUTH)."""
    return _inline(port, b"PING", b"+PONG", tls) or _inline(port, b"PING", b"-NOAUTH", tls)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the `openssl` command (or skip)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    args = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    args += ["-keyout", str(key), "-out", str(cert), "-subj", f"/CN={HOST}"]
    args += ["-addext", f"subjectAltName=IP:{HOST}"]
    subprocess.run(args, check=True, capture_output=True)
    return cert, key


class RedisServer:
    """One `redis-server` process; `url` is what `store.url` takes."""

    def __init__(self, tmp_path: Path, port: int | None = None, *, tls: bool = False) -> None:
        self.binary = require_redis_server()
        self.port = port or _free_port()
        self.workdir = _new_dir(tmp_path, "redis-")
        self.process: ManagedProcess | None = None
        self.extra_args: list[str] = []  # e.g. ["--requirepass", "..."]
        self.cert: Path | None = None
        self.tls: ssl.SSLContext | None = None
        if tls:
            self.cert, key = self_signed_certificate(self.workdir)
            self.tls = ssl.create_default_context(cafile=str(self.cert))
            # TLS only: no plain port at all, so a client that skips TLS cannot connect.
            self.extra_args += ["--tls-port", str(self.port), "--tls-cert-file", str(self.cert)]
            self.extra_args += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(self.cert)]
            self.extra_args += ["--tls-auth-clients", "no"]

    @property
    def url(self) -> str:
        if self.cert is not None:
            return f"rediss://{HOST}:{self.port}/0?ssl_ca_certs={self.cert}"
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        args = [
            self.binary,
            "--port",
            "0" if self.tls is not None else str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            *self.extra_args,
        ]
        self.process = ManagedProcess(
            args, log_path=self.workdir / "output.log", name=f"redis:{self.port}"
        )
        self.process.start()
        deadline = time.monotonic() + timeout
        while not ping(self.port, self.tls):
            if not self.process.running or time.monotonic() > deadline:
                description = self.process.describe()
                self.process.stop()
                raise ProcessError(f"redis-server did not answer PING: {description}")
            time.sleep(0.05)
        return self

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop it by its PID (SIGTERM, then SIGKILL if it hangs); with `keep_data`, after a
        snapshot the next `start()` loads."""
        if self.process is None or not self.process.running:
            return
        if keep_data and not _inline(self.port, b"SAVE", b"+OK", self.tls):
            raise ProcessError(f"redis-server refused SAVE: {self.process.describe()}")
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
