"""The systemd notify protocol (sd_notify), in the few lines the sidecar needs.

Under `Type=notify` systemd hands the service a datagram socket in `$NOTIFY_SOCKET` and
waits for `READY=1` before it counts the unit as started; `STOPPING=1`, `RELOADING=1`
and `STATUS=` keep `systemctl status` truthful, and `WATCHDOG=1` proves the event loop
still turns (a wedged loop stops pinging and systemd restarts the unit). Outside systemd
(a terminal, a container, the tests) `$NOTIFY_SOCKET` is unset and every call is a no-op,
so the caller never branches on where it runs.

Notifications are best effort: a failed send is logged at debug and reported as `False`,
never raised, because losing a status line must not take the proxy down. Stdlib only, so
this module cannot be the reason the service fails to start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

logger = logging.getLogger("sidecar.notify")

# systemd reads the notify socket promptly; a send only blocks when PID 1 is wedged with
# its queue full. Bound that rare stall instead of holding the event loop indefinitely.
_SEND_TIMEOUT = 1.0


class Notifier:
    """Sends sd_notify datagrams to `$NOTIFY_SOCKET`, or does nothing when it is unset."""

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (default: `os.environ`)."""
        env = os.environ if environ is None else environ
        address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        if address is None:
            return cls()
        return cls(
            address,
            watchdog_usec=_positive_int(env, "WATCHDOG_USEC"),
            watchdog_pid=_positive_int(env, "WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send `fields` as one datagram (`KEY=value` lines); True if it went out."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(_SEND_TIMEOUT)
                sock.sendto(payload, self._address)
        except OSError as exc:
            logger.debug("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str = "") -> None:
        """The listeners are up: systemd may consider the start (or a reload) finished."""
        self.send("READY=1", *_status_field(status))

    def reloading(self) -> None:
        """A reload (SIGHUP) has begun; call `ready()` once it is applied.

        systemd keeps the unit in the "reloading" state until the next `READY=1`, so
        `systemctl reload` returns only when the new configuration is live. The
        timestamp lets systemd (253+) tell this reload from an earlier one.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> None:
        """Shutdown has begun (draining); systemd shows the unit as deactivating."""
        self.send("STOPPING=1", *_status_field(status))

    def status(self, text: str) -> None:
        """Free-form one-line status shown by `systemctl status`."""
        self.send(*_status_field(text))

    def watchdog_interval(self) -> float | None:
        """Seconds between `WATCHDOG=1` pings, or None when no watchdog is armed for us.

        Half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises, so one late ping is
        not fatal. `WATCHDOG_PID` names the process the watchdog is meant for; when it is
        another one (we are a child that inherited the environment) we must stay quiet.
        """
        if self._address is None or self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    async def run_watchdog(self) -> None:
        """Ping the watchdog until cancelled; return at once when there is none.

        Runs on the event loop on purpose: if the loop stalls, the pings stop and
        systemd restarts the service, which is the failure the watchdog exists to catch.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        logger.debug("systemd watchdog armed: pinging every %.3fs", interval)
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)


def _socket_address(value: str) -> str | None:
    """Map `$NOTIFY_SOCKET` to a `sendto` address; None when unset or unsupported."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace socket: systemd writes the leading NUL byte as "@".
        return "\0" + value[1:]
    if value:
        # e.g. "vsock:CID:PORT" (systemd 254+ for VMs): not needed for this service.
        logger.warning("NOTIFY_SOCKET=%r is not a path or abstract socket; ignoring it", value)
    return None


def _positive_int(env: Mapping[str, str], key: str) -> int | None:
    raw = env.get(key, "")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        logger.warning("ignoring %s=%r: not an integer", key, raw)
        return None
    return value if value > 0 else None


def _status_field(text: str) -> tuple[str, ...]:
    # The protocol is newline-separated: a newline in the text would end the STATUS
    # field and could smuggle in another assignment (READY=1, MAINPID=...).
    if not text:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)
