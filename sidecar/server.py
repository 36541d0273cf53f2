"""Running the service: listeners, signals, readiness, reload and graceful stop (SPEC 3.4).

SIGTERM/SIGINT: report STOPPING to systemd, stop accepting, end relayed GET streams, let
in-flight calls finish within `server.drain_timeout`, flush the store, exit 0. Sessions stay
live across the restart. SIGHUP: re-read the config file and apply what can change live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import uvloop
from aiohttp import web

from . import heap
from . import log as sidecar_log
from .admin import build_admin_app
from .app import Service, build_proxy_app
from .config import Settings, load_settings, parse_host_port
from .connections import ConnectionGuard, admin_runner, proxy_runner
from .errors import ConfigError, SidecarError
from .notify import Notifier

LINGERING_TIME = 1.0

log = logging.getLogger("sidecar.server")


class Server:
    def __init__(
        self,
        settings: Settings,
        config_path: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides
        # The clock is a parameter for the scale benchmark, which moves time to expire
        # sessions on purpose; the command line always runs on the wall clock.
        # Only a real server process tunes the garbage collector (heap.py), not a test's.
        self.service = Service(settings, clock, freeze_heap=True)
        self.notifier = Notifier.from_env()
        self._stop = asyncio.Event()
        self._admin: web.AppRunner | None = None
        self._proxy: web.AppRunner | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        watchdog = asyncio.create_task(self.notifier.run_watchdog(), name="sidecar-watchdog")
        try:
            await self.start()
            await self._stop.wait()
        finally:
            self.notifier.stopping("draining")
            await self.stop()
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def start(self) -> None:
        """Admin first, so `/readyz` answers 503 while the store opens; the sessions are
        restored behind the open proxy port (`Service.start`)."""
        settings = self.settings
        metrics = self.service.metrics
        guard = ConnectionGuard(lambda reason: metrics.rejected.labels(reason).inc())
        # Guarded too: a head aiohttp refuses (two `Host` headers) is answered in JSON and
        # counted, and a slow head is cut, on the admin port as on the proxy's.
        self._admin = admin_runner(
            build_admin_app(self.service),
            header_timeout=settings.server.header_timeout,
            guard=guard,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
        )
        await self._listen(self._admin, settings.admin.listen, "admin.listen")
        self._proxy = proxy_runner(
            build_proxy_app(self.service),
            header_timeout=settings.server.header_timeout,
            guard=guard,
            fast=self.service.fast,
            handle_signals=False,
            access_log=None,
            # A client that drops a quiet stream must free it upstream now, not at the
            # upstream's next keepalive (never, for servers that send none).
            handler_cancellation=True,
            shutdown_timeout=settings.server.drain_timeout,
            keepalive_timeout=settings.server.keepalive_timeout,
            # After a 413 the rest of an oversized body is read (and dropped) for at most
            # this long before the connection closes, instead of aiohttp's 10 s.
            lingering_time=LINGERING_TIME,
        )
        await self._listen(self._proxy, settings.server.listen, "server.listen")
        self.service.ready = True
        upstreams = ", ".join(settings.upstream.replicas)
        log.info(
            "listening on %s for %s (admin on %s)",
            settings.server.listen,
            upstreams,
            settings.admin.listen,
        )
        log.info("%s", settings.summary_line())
        # Ready while the sessions are still being read back: every id already gets the
        # answer it will get after the restore (SPEC 2.6), so nothing needs to wait for it.
        restoring = self.service.restoring
        if restoring is None:
            self.notifier.ready(f"proxying {upstreams}")
            return
        self.notifier.ready(f"proxying {upstreams}; restoring sessions")
        restoring.add_done_callback(lambda _: self.notifier.status(f"proxying {upstreams}"))

    async def _listen(self, runner: web.AppRunner, address: str, key: str) -> None:
        await runner.setup()  # for the proxy: opens the store and starts the restore
        host, port = parse_host_port(address)
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            raise SidecarError(
                f"cannot listen on {address} ({exc.strerror}); "
                f"change {key} or stop what holds the port"
            ) from exc

    async def stop(self) -> None:
        """Readiness goes 503, the proxy drains and the store flushes, then the admin API.

        The admin listener stays up while the proxy drains, so probes see 503 (SPEC 3.3)
        rather than a refused connection, and operators can still watch the drain.
        """
        started = self.service.ready
        self.service.ready = False
        for runner in (self._proxy, self._admin):
            if runner is not None:
                await runner.cleanup()
        self._proxy = self._admin = None
        heap.release()
        if started:
            log.info(
                "stopped; %d live sessions kept for the next start",
                len(self.service.manager.live),
            )

    def stop_soon(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config; keys that need a restart are reported and ignored."""
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path, overrides=self.overrides)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration:\n%s", exc)
        else:
            for key in self.service.apply(new):
                log.warning("reload: %s changed but needs a restart; ignored until then", key)
            self.settings = self.service.settings
            log.info("reloaded configuration; %s", self.settings.summary_line())
        self.notifier.ready("reloaded")


def serve(
    settings: Settings, config_path: str | None = None, overrides: Mapping[str, Any] | None = None
) -> int:
    """Run until stopped; returns the process exit code."""
    sidecar_log.configure(settings.log.level, settings.log.format)
    try:
        uvloop.run(Server(settings, config_path, overrides).run())
    except SidecarError as exc:
        log.error("%s", exc)
        return 1
    return 0
