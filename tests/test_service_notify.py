"""`python -m sidecar serve` under a stand-in for systemd's notify socket (SPEC 3.4).

The test owns an AF_UNIX datagram socket, hands it to the sidecar as `$NOTIFY_SOCKET` with a
watchdog armed (`$WATCHDOG_USEC`), and records every datagram together with whether the
sidecar's ports accepted connections at the moment it arrived: READY=1 must never come
before the listeners do.
"""

from __future__ import annotations

import itertools
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.peers.processes import (
    HOST,
    SidecarHandle,
    UpstreamHandle,
    free_ports,
    port_open,
    start_sidecar,
)

WATCHDOG_USEC = 200_000  # a ping every 0.1 s (half the timeout, as sd_watchdog_enabled says)


@dataclass
class Datagram:
    fields: dict[str, str]
    at: float
    listening: bool  # both of the sidecar's ports accepted a connection when it arrived


@dataclass
class NotifyRecorder:
    """Receives sd_notify datagrams on a thread, as systemd would, and keeps them in order."""

    sock: socket.socket
    path: str
    ports: list[int] = field(default_factory=list)
    received: list[Datagram] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            listening = bool(self.ports) and all(port_open(HOST, p) for p in self.ports)
            with self._lock:
                self.received.append(Datagram(fields, time.monotonic(), listening))

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> list[Datagram]:
        with self._lock:
            return list(self.received)

    def wait_for(self, key: str, after: int = 0, timeout: float = 10.0) -> int:
        """Index of the first datagram with `key` at or after index `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, datagram in enumerate(self.snapshot()[after:], start=after):
                if key in datagram.fields:
                    return index
            time.sleep(0.02)
        raise AssertionError(f"no {key} datagram after #{after}: {self.snapshot()}")


@pytest.fixture
def recorder() -> Iterator[NotifyRecorder]:
    # Not tmp_path: AF_UNIX paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="sd-") as tmp:
        path = str(Path(tmp) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            recorder = NotifyRecorder(sock, path)
            thread = threading.Thread(target=recorder.run, name="notify-recorder", daemon=True)
            thread.start()
            yield recorder
            recorder.stop()
            thread.join(5)


def keys(datagrams: list[Datagram]) -> list[str]:
    return [next(k for k in d.fields if k != "STATUS") for d in datagrams if d.fields]


def start_notified(
    tmp_path: Path, upstream: UpstreamHandle, recorder: NotifyRecorder
) -> SidecarHandle:
    """`python -m sidecar serve` with the recorder's socket and a watchdog armed.

    The ports are chosen first and given to the recorder, so it can check them the moment
    each datagram arrives, including the ones sent while the sidecar is still starting.
    """
    listen, admin = free_ports(2)
    recorder.ports = [listen, admin]
    return start_sidecar(
        tmp_path,
        upstream.url,
        env={"NOTIFY_SOCKET": recorder.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
        server={"listen": f"{HOST}:{listen}"},
        admin={"listen": f"{HOST}:{admin}"},
    )


@pytest.fixture
def notified(
    tmp_path: Path, upstream: UpstreamHandle, recorder: NotifyRecorder
) -> Iterator[SidecarHandle]:
    sidecar = start_notified(tmp_path, upstream, recorder)
    yield sidecar
    sidecar.stop()


def test_ready_is_sent_once_the_ports_accept_connections(
    notified: SidecarHandle, upstream: UpstreamHandle, recorder: NotifyRecorder
) -> None:
    ready = recorder.wait_for("READY")
    datagrams = recorder.snapshot()
    assert datagrams[ready].fields["READY"] == "1"
    assert datagrams[ready].listening, "READY=1 arrived before both ports accepted"
    assert upstream.url in datagrams[ready].fields.get("STATUS", "")
    # Before READY, only watchdog pings: nothing that claims readiness or stopping.
    assert set(keys(datagrams[:ready])) <= {"WATCHDOG"}
    assert notified.returncode is None


def test_watchdog_pings_arrive_well_within_the_watchdog_timeout(
    notified: SidecarHandle, recorder: NotifyRecorder
) -> None:
    recorder.wait_for("READY")
    time.sleep(1.0)
    pings = [d for d in recorder.snapshot() if d.fields == {"WATCHDOG": "1"}]
    assert len(pings) >= 5, recorder.snapshot()
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    assert notified.returncode is None


def test_reload_reports_reloading_then_ready_and_sigterm_reports_stopping(
    notified: SidecarHandle, recorder: NotifyRecorder
) -> None:
    recorder.wait_for("READY")
    before_reload = len(recorder.snapshot())
    notified.reload(sessions={"idle_timeout": 60})
    reloading = recorder.wait_for("RELOADING", after=before_reload)
    ready_again = recorder.wait_for("READY", after=reloading)
    fields = recorder.snapshot()[reloading].fields
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) > 0
    assert recorder.snapshot()[ready_again].fields["READY"] == "1"
    assert "reloaded configuration" in notified.output()

    before_stop = len(recorder.snapshot())
    notified.send_signal(signal.SIGTERM)
    stopping = recorder.wait_for("STOPPING", after=before_stop)
    assert recorder.snapshot()[stopping].fields["STOPPING"] == "1"
    assert notified.proc.popen.wait(10) == 0
    assert "Traceback" not in notified.output()
    # Nothing claims readiness once stopping has begun.
    assert "READY" not in keys(recorder.snapshot()[stopping:])
