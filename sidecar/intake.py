"""A client request before any session decision: the checks, the reads, and the sidecar's
own answers.

Everything here is about one request in isolation: is its `Origin` allowed, does its body
fit `server.max_body_bytes` and is it in a coding the sidecar reads, who is the client, which
credentials would a later upstream `DELETE` need. `Rejected` carries an answer the sidecar
gives itself (status, JSON-RPC error body, the `rejected_total` reason); `RequestTimer`
measures the sidecar's own share of a request for `request_duration_seconds`.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from . import codings, jsonrpc
from .clients import client_identity
from .errors import UpstreamError, UpstreamTimeoutError

CREDENTIAL_HEADERS = ("Authorization", "Cookie")
JSON = "application/json"


class Rejected(Exception):
    """Raised inside a handler to answer the client directly; `reason` labels the metric."""

    def __init__(
        self, status: int, reason: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status, self.reason, self.body, self.headers = status, reason, body, headers or {}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body, content_type=JSON, headers=self.headers
        )


class RequestTimer:
    """The sidecar's own time on a request: wall time minus time spent on the upstream.

    Upstream time is waiting for its answer and relaying a streamed body (a GET stream may
    stay open for hours; none of that is the sidecar's overhead).
    """

    __slots__ = ("_since", "start", "waiting")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.waiting = 0.0
        self._since: float | None = None

    def upstream_begins(self) -> None:
        self._since = time.perf_counter()

    def upstream_answered(self) -> None:
        if self._since is not None:
            self.waiting += time.perf_counter() - self._since
            self._since = None

    def own_time(self) -> float:
        return time.perf_counter() - self.start - self.waiting


def check_origin(request: web.Request, allowed: frozenset[str]) -> None:
    """SPEC 2.5: with `server.allowed_origins` set, another `Origin` gets 403."""
    origin = request.headers.get("Origin")
    if allowed and origin is not None and origin not in allowed:
        raise Rejected(
            403, "origin", jsonrpc.error_body(jsonrpc.SERVER_ERROR, "Origin not allowed")
        )


def check_content_coding(request: web.Request) -> None:
    """`codings.py`: a body in a coding other than identity gets 415, before it is read (aiohttp
    would decompress it, and a bogus one would raise)."""
    values = request.headers.getall("Content-Encoding", ())
    coding = codings.unreadable(values) if values else None
    if coding is not None:
        raise Rejected(
            codings.STATUS,
            codings.REASON,
            codings.refusal_body(coding),
            headers=dict([codings.ACCEPTED]),
        )


async def read_body(request: web.Request, limit: int, within: float = 0) -> bytes:
    """The whole body; 413 as soon as it is known to be larger than `limit`, 408 when it has
    not arrived whole within `within` seconds (0 = no limit; slow clients, SPEC 2.5)."""
    try:
        async with asyncio.timeout(within or None):
            return await _read_limited(request, limit)
    except TimeoutError:
        raise Rejected(
            408,
            "body_timeout",
            jsonrpc.error_body(
                jsonrpc.INVALID_REQUEST,
                f"Request body not received within {within:g}s (server.body_timeout)",
            ),
        ) from None


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> Rejected:
    # Built only when needed: the JSON body costs more than reading a small request.
    return Rejected(
        413,
        "too_large",
        jsonrpc.error_body(jsonrpc.INVALID_REQUEST, f"Request body larger than {limit} bytes"),
    )


def request_identity(request: web.Request) -> str:
    return client_identity(request.headers.get("Authorization"), request.remote)


def credentials(request: web.Request) -> dict[str, str]:
    """What the client authenticated with, for the sidecar's own upstream DELETE."""
    return {name: request.headers[name] for name in CREDENTIAL_HEADERS if name in request.headers}


def upstream_failure(exc: UpstreamError, body: bytes) -> web.Response:
    """502 or 504 with a JSON-RPC error echoing the request's id (SPEC 2.5)."""
    timeout = isinstance(exc, UpstreamTimeoutError)
    batch = jsonrpc.parse(body) if body else jsonrpc.INVALID
    message = "Upstream MCP server timed out" if timeout else "Upstream MCP server unreachable"
    return web.Response(
        status=504 if timeout else 502,
        content_type=JSON,
        body=jsonrpc.error_body(jsonrpc.SERVER_ERROR, message, batch.first_id),
    )
