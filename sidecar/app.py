"""Wiring only: build the parts from the settings and hand them to aiohttp's lifecycle.

Start-up order (aiohttp `cleanup_ctx`, torn down in reverse): store -> upstream client ->
session table restored, then the closer and the background loops. Every task started here is
owned by `Service`, cancelled and awaited on shutdown; the last act is one final activity
flush, so a graceful stop loses nothing (SPEC 3.4).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from . import heap, jsonrpc
from . import log as sidecar_log
from .closer import UpstreamCloser
from .config import Settings
from .errors import StoreError
from .gone import GonePatterns
from .manager import Clock, Limits, SessionManager
from .metrics import Metrics
from .monitor import Monitor
from .peer_events import limits_changed
from .peers import Peers
from .sessions import CloseReason, Policy
from .store import Store, open_store
from .sweeper import Sweeper
from .transports import (
    FastPath,
    Forwarder,
    LegacySse,
    ProxyOptions,
    Resumer,
    Router,
    StreamableHttp,
)
from .upstream import HealthChecker, Upstream, UpstreamPool

log = logging.getLogger("sidecar.app")

SERVICE: web.AppKey[Service] = web.AppKey("service")


def policy_from(settings: Settings) -> Policy:
    s = settings.sessions
    return Policy(
        idle_timeout=s.idle_timeout,
        max_lifetime=s.max_lifetime,
        open_stream_keeps_alive=s.open_stream_keeps_alive,
        ignore_methods=frozenset(s.ignore_methods),
        call_timeout=settings.upstream.read_timeout,
        idle_action=s.idle_action,
        dormant_ttl=s.dormant_ttl,
    )


def limits_from(settings: Settings) -> Limits:
    s = settings.sessions
    return Limits(
        max_sessions=s.max_sessions,
        max_sessions_per_client=s.max_sessions_per_client,
        on_limit=s.on_limit,
        bind_to=s.bind_to,
        persistent_default=s.persistent,
    )


def options_from(settings: Settings) -> ProxyOptions:
    return ProxyOptions(
        allowed_origins=frozenset(settings.server.allowed_origins),
        max_body_bytes=settings.server.max_body_bytes,
        body_timeout=settings.server.body_timeout,
        unknown=settings.sessions.unknown,
        messages_path=settings.upstream.messages_path,
        mcp_path=settings.upstream.path,
        sse_path=settings.upstream.sse_path,
        recover_lost=settings.upstream.recover_lost,
        fast_path=settings.server.fast_path,
    )


class Service:
    """Everything one running sidecar owns, shared by the proxy and admin listeners."""

    def __init__(
        self, settings: Settings, clock: Clock = time.time, *, freeze_heap: bool = False
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store: Store = open_store(settings.store)
        up = settings.upstream
        self.upstreams = UpstreamPool(up.replicas, up.connect_timeout, up.read_timeout, up.headers)
        self.closer = UpstreamCloser(self.upstreams, self.store, self.metrics, clock)
        self.manager = SessionManager(
            self.store,
            self.closer,
            self.metrics,
            policy=policy_from(settings),
            limits=limits_from(settings),
            tombstone_ttl=settings.sessions.tombstone_ttl,
            clock=clock,
        )
        self.forwarder = Forwarder(
            self.manager,
            self.upstreams,
            self.metrics,
            options_from(settings),
            GonePatterns(settings.upstream.session_gone),
        )
        self.resumer = Resumer(self.forwarder)
        self.fast = FastPath(self.forwarder, self.resumer)
        self.streamable = StreamableHttp(self.forwarder, self.resumer)
        self.legacy = LegacySse(self.forwarder, self.streamable)
        self.router = Router(self.forwarder, self.streamable, self.legacy)
        self.sweeper = Sweeper(
            self.manager,
            settings.sessions.effective_sweep_interval,
            settings.store.flush_interval,
            freeze_heap=freeze_heap,
        )
        self.monitor = Monitor(
            lambda: (len(self.manager.live), len(self.manager.dormant)),
            self.manager.live.values,
            clock,
        )
        self.manager.close_listeners.append(self.monitor.record_close)
        if freeze_heap:
            self.manager.between_slices = heap.settle
        # Health checks only choose between replicas: one upstream is used whatever it does.
        self.health = (
            HealthChecker(
                self.upstreams,
                up.health_interval,
                up.down_grace,
                self._replicas_gone,
                on_up=self.closer.retry_now,
            )
            if len(self.upstreams) > 1
            else None
        )
        if self.health is not None:  # one upstream is never probed: its gauge would say nothing
            self.metrics.bind_upstreams(self._upstreams_up, self._upstream_sessions)
        self.ready = False
        self.metrics.bind_service_state(
            lambda: (self.manager.limits.max_sessions, self.manager.limits.max_sessions_per_client),
            lambda: self.ready,
            lambda: len(self.manager.stuck),
        )
        self.metrics.bind_store_transactions(lambda: self.store.transactions)
        # Only the SQLite store has one (its WAL checkpoints, in the background); looked up
        # by name so the Redis backend does not load SQLite's libraries.
        checkpointer = getattr(self.store, "checkpointer", None)
        if checkpointer is not None:
            checkpointer.on_failure = self.metrics.store_errors.labels("checkpoint").inc
        self._tasks: list[asyncio.Task[None]] = []
        # Sidecars sharing one Redis tell each other of closes, pins and limits (SPEC 2.8).
        self.peers: Peers | None = None
        if self.store.shared:
            self.peers = Peers(self.manager, self.metrics)
            self.manager.announce = self.peers.announce
        # The start's one-off sweep of what expired while stopped: owned (cancelled and
        # awaited by stop) like the loops, but not one of them.
        self._restoring: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the store, restore sessions and start the background loops."""
        await self.store.open()
        try:
            await self.upstreams.start()
            self._tasks.append(asyncio.create_task(self.closer.run(), name="sidecar-closer"))
            # Only the owed DELETEs are read before the port opens; the sessions are read
            # back behind it, each id answered from the store until its slice is in.
            await self.manager.begin_restore()
            self._restoring = asyncio.create_task(self._restore(), name="sidecar-restore")
            self._restoring.add_done_callback(_report_failure)
            self._tasks += self.sweeper.tasks()
            self._tasks.append(asyncio.create_task(self.monitor.run(), name="sidecar-monitor"))
            if self.health is not None:
                self._tasks.append(asyncio.create_task(self.health.run(), name="sidecar-health"))
            if self.peers is not None:
                self._tasks.append(asyncio.create_task(self.peers.run(), name="sidecar-peers"))
                # DELETEs a sidecar that died was retrying: taken up without waiting for a start.
                rescan = self.closer.rescan_periodically()
                self._tasks.append(asyncio.create_task(rescan, name="sidecar-closer-rescan"))
        except BaseException:
            await self.stop()
            raise

    async def _restore(self) -> None:
        """The sessions of the last run, read back in slices; then the ones that expired
        while stopped are ended (their DELETEs go out in the background, as any close's)."""
        legacy = await self.manager.restore(sweep=False)
        await self.manager.sweep_restored(legacy)

    @property
    def restoring(self) -> asyncio.Task[None] | None:
        """The restore at start while it runs (None before the start and after it)."""
        task = self._restoring
        return task if task is not None and not task.done() else None

    async def stop(self) -> None:
        self.ready = False
        owned = [*self._tasks, *([self._restoring] if self._restoring is not None else [])]
        for task in owned:
            task.cancel()
        await asyncio.gather(*owned, return_exceptions=True)
        self._tasks.clear()
        self._restoring = None
        try:
            await self.manager.flush()
        except StoreError as exc:
            log.error(
                "the final activity flush failed (%s); the last %gs of activity times "
                "are lost, sessions themselves are not",
                exc,
                self.settings.store.flush_interval,
            )
        self.fast.close()
        await self.upstreams.close()
        await self.store.close()

    async def _replicas_gone(self, names: list[str]) -> None:
        """Replicas down for `down_grace`: their sessions are closed `upstream_gone` (a DELETE
        stays owed, should the replica come back). With `recover_lost` they are left bound:
        each is re-created on a healthy replica by its next request (SPEC 2.8)."""
        if self.forwarder.options.recover_lost:
            return
        pool = self.upstreams
        gone = set(names)
        # Taken with no await before the close below flips them: all are live, each once.
        owed = [
            (s, s.binding, dict(s.credentials))
            for s in self.manager.live.values()
            if s.binding is not None and pool.canonical(s.binding.upstream) in gone
        ]
        if not owed:
            return
        log.warning(
            "closing %d sessions of upstream %s, down longer than upstream.down_grace",
            len(owed),
            ", ".join(pool.at(name).authority for name in names),
        )
        await self.manager.close_many([s for s, _, _ in owed], CloseReason.UPSTREAM_GONE)
        for session, binding, credentials in owed:  # upstream_gone owes no DELETE by itself
            await self.manager.owe_close(binding, session.protocol_version, credentials)

    def _upstreams_up(self) -> dict[str, bool]:
        return {r.label: r.up for r in self.upstreams.replicas}

    def _upstream_sessions(self) -> dict[str, int]:
        pool = self.upstreams
        live = self.manager.live.values()
        counts = pool.tally(s.binding.upstream for s in live if s.binding is not None)
        return {pool.at(name).authority: count for name, count in counts.items()}

    @property
    def upstream(self) -> Upstream:
        """The upstream that answers requests of no session (the only one, so far)."""
        return self.upstreams.primary

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        return tuple(self._tasks)

    def apply(self, new: Settings) -> list[str]:
        """Apply a reloaded config; returns the keys that need a restart (and were ignored)."""
        old = self.settings
        ignored = [
            key
            for key, before, after in (
                ("server.listen", old.server.listen, new.server.listen),
                ("admin.listen", old.admin.listen, new.admin.listen),
                # A kept listener keeps the token rules it started with: a reload that clears
                # the token must never leave a listener open without one (SPEC 2.5).
                ("admin.token", old.admin.token, new.admin.token),
                ("server.header_timeout", old.server.header_timeout, new.server.header_timeout),
                (
                    "server.keepalive_timeout",
                    old.server.keepalive_timeout,
                    new.server.keepalive_timeout,
                ),
                ("store.backend", old.store.backend, new.store.backend),
                ("store.path", old.store.path, new.store.path),
                ("store.url", old.store.url, new.store.url),
                ("store.key_prefix", old.store.key_prefix, new.store.key_prefix),
                ("upstream.url", old.upstream.url, new.upstream.url),
                ("upstream.urls", old.upstream.urls, new.upstream.urls),
            )
            if before != after
        ]
        self.manager.policy = policy_from(new)
        self.manager.limits = limits_from(new)
        if self.peers is not None and limits_from(old) != self.manager.limits:
            self.peers.announce(limits_changed(self.manager.limits))
        self.manager.tombstone_ttl = new.sessions.tombstone_ttl
        self.forwarder.options = options_from(new)
        self.forwarder.gone = GonePatterns(new.upstream.session_gone)
        self.sweeper.sweep_interval = new.sessions.effective_sweep_interval
        self.sweeper.flush_interval = new.store.flush_interval
        self.upstreams.configure(
            new.upstream.connect_timeout, new.upstream.read_timeout, new.upstream.headers
        )
        if self.health is not None:
            self.health.interval = new.upstream.health_interval
            self.health.down_grace = new.upstream.down_grace
        sidecar_log.set_level(new.log.level)
        self.settings = new.model_copy(
            update={
                "server": new.server.model_copy(
                    update={
                        "listen": old.server.listen,
                        "header_timeout": old.server.header_timeout,
                        "keepalive_timeout": old.server.keepalive_timeout,
                    }
                ),
                "admin": new.admin.model_copy(
                    update={"listen": old.admin.listen, "token": old.admin.token}
                ),
                "store": new.store.model_copy(
                    update={
                        "backend": old.store.backend,
                        "path": old.store.path,
                        "url": old.store.url,
                        "key_prefix": old.store.key_prefix,
                    }
                ),
                "upstream": new.upstream.model_copy(
                    update={"url": old.upstream.url, "urls": old.upstream.urls}
                ),
            }
        )
        return ignored

    def abort_open_streams(self) -> int:
        """On shutdown: end GET streams (sessions stay live) so draining can finish.

        In-flight POST answers are left to finish within `server.drain_timeout`.
        """
        sessions = [*self.manager.live.values(), *self.manager.dormant.whole()]
        relays = [
            r for s in sessions if s.runtime is not None for r in s.runtime.relays if r.long_lived
        ]
        for relay in relays:
            relay.abort()
        return len(relays)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Nothing a client sends may crash the sidecar: unexpected errors become a JSON 500."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return web.Response(
            status=500,
            content_type="application/json",
            body=jsonrpc.error_body(jsonrpc.SERVER_ERROR, "Internal error in mcp-sidecar"),
        )


def build_proxy_app(service: Service) -> web.Application:
    """The client-facing application: the MCP endpoint and pass-through for everything else."""
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=service.settings.server.max_body_bytes
    )
    app[SERVICE] = service
    app.cleanup_ctx.append(_service_lifecycle)
    app.on_shutdown.append(_end_streams)
    handle_mcp = service.router.handle_mcp
    path = service.settings.upstream.path
    app.router.add_route("*", path, handle_mcp)
    if path != "/" and path.endswith("/"):
        app.router.add_route("*", path.rstrip("/"), handle_mcp)
    elif path != "/":
        app.router.add_route("*", path + "/", handle_mcp)
    _add_legacy_routes(app, service)
    app.router.add_route("*", "/{tail:.*}", service.router.handle_passthrough)
    return app


def _add_legacy_routes(app: web.Application, service: Service) -> None:
    """The 2024-11-05 HTTP+SSE paths, unless they collide with the Streamable HTTP path."""
    upstream = service.settings.upstream
    taken = {upstream.path, upstream.path.rstrip("/")}
    for path, handler in (
        (upstream.sse_path, service.legacy.handle_sse),
        (upstream.messages_path, service.legacy.handle_message),
    ):
        for variant in {path, path.rstrip("/") or "/"} - taken:
            app.router.add_route("*", variant, handler)
            taken.add(variant)


async def _service_lifecycle(app: web.Application) -> AsyncIterator[None]:
    service = app[SERVICE]
    await service.start()
    yield
    await service.stop()


async def _end_streams(app: web.Application) -> None:
    service = app[SERVICE]
    service.ready = False
    count = service.abort_open_streams()
    if count:
        log.info("shutting down: ended %d relayed streams (their sessions stay live)", count)


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        # Ids not read back are still answered from the store; the next start reads all.
        log.error("restoring the sessions of the last run failed", exc_info=exc)
