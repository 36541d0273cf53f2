"""The admin HTTP API on its own listener (SPEC 3.3): see, act on, and scrape the sessions.

It acts only through the `SessionManager`, so an admin close is exactly a sweep's close
(streams aborted, upstream DELETE owed). When `admin.token` is set, every endpoint needs
`Authorization: Bearer <token>` (compared in constant time), except the probes: `/readyz`
always answers, and `/healthz` answers an unauthenticated caller with its status alone, so a
container HEALTHCHECK or a load balancer needs no secret and learns nothing about clients.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .app import SERVICE, Service, errors_middleware
from .errors import StoreError
from .log import Throttled
from .sessions import CloseReason, Session, State
from .status import gather
from .status_html import HEADERS, render
from .views import iso, listing, session_view

log = logging.getLogger("sidecar.admin")
_throttled = Throttled(log)

MAX_PAGE = 1000
DEFAULT_PAGE = 100
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
AUTHORIZED: web.RequestKey[bool] = web.RequestKey("authorized", bool)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_admin_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, _auth_middleware])
    app[SERVICE] = service
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/sessions", list_sessions)
    app.router.add_get("/sessions/{id}", show_session)
    app.router.add_delete("/sessions/{id}", close_session)
    app.router.add_put("/sessions/{id}/persistent", set_persistent)
    app.router.add_get("/clients/stuck", stuck_clients)
    install_status_page(app)
    return app


def install_status_page(app: web.Application) -> None:
    """`GET /`: the page for people (SPEC 3.3), behind the same token and Host rules."""
    app.router.add_get("/", status_page)


async def status_page(request: web.Request) -> web.Response:
    page = render(gather(request.app[SERVICE]))
    return web.Response(text=page, content_type="text/html", charset="utf-8", headers=HEADERS)


def _error(status: int, message: str, **extra: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=extra or None)


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.app[SERVICE]
    settings = service.settings
    token = settings.admin.token
    if not token and not _host_is_local(request, settings.admin.listen):
        # Without a token only loopback may ask; a web page that rebinds its DNS name to
        # 127.0.0.1 still sends its own name as Host (SPEC 2.5, DNS-rebinding protection).
        service.metrics.rejected.labels("admin_host").inc()
        _throttled.info(
            "admin_host",
            "admin request %s refused: Host %r (target %r) is not this listener or localhost",
            request.method,
            ", ".join(request.headers.getall("Host", []))[:100],
            request.raw_path[:100],
        )
        return _error(403, "Host not allowed: use localhost or the admin.listen address")
    authorized = not token or _bearer_matches(request.headers.get("Authorization", ""), token)
    request[AUTHORIZED] = authorized
    if not authorized and request.path not in PUBLIC_PATHS:
        log.info(
            "admin request %s %s refused: missing or wrong bearer token",
            request.method,
            request.path,
        )
        return _error(
            401,
            "missing or wrong bearer token (admin.token)",
            **{"WWW-Authenticate": 'Bearer realm="mcp-sidecar"'},
        )
    try:
        return await handler(request)
    except StoreError as exc:
        # The store cannot answer (disk, Redis): say so and when to retry, never a 500.
        log.warning("admin request %s %s: store failed: %s", request.method, request.path, exc)
        return _error(503, f"the session store failed: {exc}", **{"Retry-After": "5"})


LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# `host[:port]` and nothing else (RFC 3986 authority without userinfo): a name or IPv4
# address, or an IPv6 address in brackets. Anything looser let `localhost:80@evil.com` pass
# as "localhost".
_AUTHORITY = re.compile(
    r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?"
)


def _host_is_local(request: web.Request, listen: str) -> bool:
    """Whether the request names loopback or the listener's own address (any port).

    Both names count: the `Host` header (exactly one) and an absolute-form target's
    authority, which aiohttp prefers to the header for `request.host`. No `Host` at all names
    nothing a rebound DNS name could have put there (browsers always send one), so it is
    judged by the target alone, as before.
    """
    allowed = LOCAL_HOSTS | {h for h in (authority_host(listen),) if h is not None}
    hosts = request.headers.getall("Host", [])
    if len(hosts) > 1 or (hosts and authority_host(hosts[0]) not in allowed):
        return False
    target = _target_authority(request.raw_path)
    return target is None or authority_host(target) in allowed


def authority_host(authority: str) -> str | None:
    """The host `authority` names (lower case, IPv6 in its short form, without the root
    label's trailing dot), or None when it is not exactly `host[:port]` with a valid port."""
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        return None
    port = match["port"]
    if port is not None and not 0 < int(port) <= 65535:
        return None
    if match["ip6"] is not None:
        try:
            return str(ipaddress.IPv6Address(match["ip6"]))
        except ValueError:
            return None
    name = match["name"].lower()
    # `localhost.` is the fully qualified `localhost`; one trailing dot, never an empty label.
    name = name.removesuffix(".")
    return None if not name or ".." in name or name.startswith(".") else name


def _target_authority(target: str) -> str | None:
    """The authority of an absolute-form request target, "" when it has none that parses, or
    None for the usual origin-form (`/path`) and asterisk-form targets."""
    if target.startswith("/") or target == "*":
        return None
    _, sep, rest = target.partition("://")
    if not sep:
        return ""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


def _bearer_matches(header: str, token: str) -> bool:
    scheme, _, presented = header.partition(" ")
    # compare_digest on equal-length inputs is constant time; the scheme check leaks nothing.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if not request[AUTHORIZED]:
        return web.json_response({"status": "ok"})
    body: dict[str, Any] = {"status": "ok", "sessions": service.manager.health_counts()}
    _add_peers(service, body)
    return web.json_response(body)


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    ready = service.ready
    body: dict[str, Any] = {"ready": ready}
    if service.restoring is not None:
        # Ready all the same (every id is answered right meanwhile), but the session counts
        # elsewhere are not whole until the restore ends: it says so.
        body["restoring"] = True
    _add_peers(service, body)
    return web.json_response(body, status=200 if ready else 503)


def _add_peers(service: Service, body: dict[str, Any]) -> None:
    """On a shared store, whether the other sidecars' events are heard. Not hearing them
    leaves both probes 200: this sidecar still serves every session right (the store decides
    closes and claims), only an admin close or pin made elsewhere reaches it late; and the
    cause (Redis) is every sidecar's at once, so a 503 would take all of them out together."""
    if service.peers is not None:
        hearing = service.peers.hearing
        body["peers"] = {
            "listening": hearing.listening,
            "since": iso(hearing.since),
            "restarts": hearing.restarts,
        }


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def list_sessions(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    query = request.query
    state = query.get("state", "live")
    if state not in ("live", "dormant", "closed"):
        return _error(400, f"state={state!r} is not allowed; use 'live', 'dormant' or 'closed'")
    try:
        limit = _int_param(query.get("limit"), DEFAULT_PAGE, 1, MAX_PAGE, "limit")
        offset = _int_param(query.get("offset"), 0, 0, None, "offset")
    except ValueError as exc:
        return _error(400, str(exc))
    client = query.get("client", "")
    if state == "live":
        sessions = list(service.manager.live.values())
    elif state == "dormant":
        # Held compact in memory (`dormant.py`): listed whole from the store, as closed ones.
        sessions = await service.store.load(State.DORMANT)
    else:
        sessions = await service.store.load(State.CLOSED)
    matching = listing(sessions, client)
    page = matching[offset : offset + limit]
    return web.json_response(
        {
            "total": len(matching),
            "limit": limit,
            "offset": offset,
            "sessions": [view(service, s) for s in page],
        }
    )


def _int_param(raw: str | None, default: int, low: int, high: int | None, name: str) -> int:
    if raw is None:
        return default
    allowed = f"an integer from {low} to {high}" if high else f"an integer >= {low}"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not allowed; use {allowed}") from None
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={raw!r} is not allowed; use {allowed}")
    return value


def _usable(service: Service, session_id: str) -> Session | None:
    """A live or dormant session: the ones an admin can still close or pin."""
    manager = service.manager
    held = manager.live.get(session_id) or manager.dormant.get(session_id)
    return held if isinstance(held, Session) else None  # a compact record: the store has it


async def _find(service: Service, session_id: str) -> Session | None:
    return _usable(service, session_id) or await service.store.get(session_id)


async def show_session(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    session = await _find(service, request.match_info["id"])
    if session is None:
        return _error(404, "no such session")
    return web.json_response(view(service, session))


async def close_session(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    session = await service.manager.find(request.match_info["id"])
    if session is None:
        known = await service.store.get(request.match_info["id"])
        return _error(
            409 if known else 404, "session is already closed" if known else "no such session"
        )
    await service.manager.close(session, CloseReason.ADMIN)
    return web.json_response(view(service, session))


async def set_persistent(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("persistent"), bool):
        return _error(400, 'body must be JSON {"persistent": true} or {"persistent": false}')
    session = await service.manager.find(request.match_info["id"])
    if session is None or not session.live:
        return _error(404, "no such live session")
    await service.manager.set_persistent(session, body["persistent"])
    return web.json_response(view(service, session))


async def stuck_clients(request: web.Request) -> web.Response:
    return web.json_response({"clients": request.app[SERVICE].manager.stuck.snapshot()})


def view(service: Service, session: Session) -> dict[str, Any]:
    return session_view(session, service.manager.policy, service.manager.clock())
