"""sd_notify datagrams, received on a real AF_UNIX socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.notify import Notifier

TIMEOUT = 2.0


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket like systemd's and the NOTIFY_SOCKET value that names it."""
    # Not tmp_path: AF_UNIX paths are limited to 108 bytes and pytest's per-test
    # directories (named after the test) can exceed that.
    with tempfile.TemporaryDirectory(prefix="sd-") as tmp:
        path = str(Path(tmp) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            yield sock, path


async def receive(sock: socket.socket, within: float = TIMEOUT) -> dict[str, str]:
    """The next datagram as a dict of its KEY=value lines."""
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), within)
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


async def assert_nothing_received(sock: socket.socket, wait: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await receive(sock, within=wait)


def notifier_for(path: str, **extra: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": path, **extra})


async def test_ready_sends_ready_with_status(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = notifier_for(path)

    assert notifier.enabled
    notifier.ready("proxying :8080 -> http://127.0.0.1:8000/mcp")

    assert await receive(sock) == {
        "READY": "1",
        "STATUS": "proxying :8080 -> http://127.0.0.1:8000/mcp",
    }


async def test_ready_without_status_sends_only_ready(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier_for(path).ready()

    assert await receive(sock) == {"READY": "1"}


async def test_stopping_sends_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier_for(path).stopping("draining 3 requests")

    assert await receive(sock) == {"STOPPING": "1", "STATUS": "draining 3 requests"}


async def test_reloading_sends_current_monotonic_usec(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier_for(path).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    fields = await receive(sock)
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


async def test_status_with_newlines_cannot_inject_fields(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier_for(path).status("line one\nREADY=1")

    assert await receive(sock) == {"STATUS": "line one READY=1"}


async def test_send_joins_fields_into_one_datagram(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    assert notifier_for(path).send("A=1", "B=2") is True

    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), TIMEOUT)
    assert data == b"A=1\nB=2"


async def test_watchdog_pings_repeatedly_at_half_watchdog_usec(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = notifier_for(path, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid()))
    assert notifier.watchdog_interval() == pytest.approx(0.1)

    task = asyncio.create_task(notifier.run_watchdog())
    try:
        started = time.monotonic()
        for _ in range(3):
            assert await receive(sock) == {"WATCHDOG": "1"}
        # The first ping goes out at once, the next two one interval apart each.
        assert time.monotonic() - started >= 0.15
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)


async def test_watchdog_without_watchdog_pid_is_ours(
    notify_socket: tuple[socket.socket, str],
) -> None:
    _, path = notify_socket
    assert notifier_for(path, WATCHDOG_USEC="30000000").watchdog_interval() == 15.0


async def test_watchdog_for_another_pid_is_disabled(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = notifier_for(path, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid() + 1))

    assert notifier.watchdog_interval() is None
    await asyncio.wait_for(notifier.run_watchdog(), TIMEOUT)
    await assert_nothing_received(sock)


@pytest.mark.parametrize("value", ["", "0", "-5", "soon"])
async def test_watchdog_with_unusable_watchdog_usec_is_disabled(
    notify_socket: tuple[socket.socket, str], value: str
) -> None:
    _, path = notify_socket
    notifier = notifier_for(path, WATCHDOG_USEC=value)

    assert notifier.watchdog_interval() is None
    await asyncio.wait_for(notifier.run_watchdog(), TIMEOUT)


async def test_notifier_without_notify_socket_is_inert() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "200000"})

    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    notifier.ready("up")
    notifier.reloading()
    notifier.stopping("bye")
    notifier.status("idle")
    assert notifier.watchdog_interval() is None
    await asyncio.wait_for(notifier.run_watchdog(), TIMEOUT)


def test_from_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_env().enabled

    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert Notifier.from_env().enabled


def test_unsupported_notify_socket_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.notify"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})

    assert not notifier.enabled
    assert "NOTIFY_SOCKET" in caplog.text


def test_send_failure_returns_false_and_logs_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with tempfile.TemporaryDirectory(prefix="sd-") as tmp:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": str(Path(tmp) / "nobody-listens")})

        with caplog.at_level(logging.DEBUG, logger="sidecar.notify"):
            assert notifier.send("READY=1") is False
            notifier.ready("no exception either")

    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
async def test_abstract_notify_socket_gets_leading_nul() -> None:
    name = f"mcp-sidecar-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)

        Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready("abstract")

        assert await receive(sock) == {"READY": "1", "STATUS": "abstract"}
