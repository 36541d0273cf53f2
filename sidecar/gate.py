"""The gate every client request passes before anything is forwarded (SPEC 2.5, "No side doors").

Two questions, answered the same way whatever path a request is sent to:

* which sessions does it name? Every `Mcp-Session-Id` header (header names are
  case-insensitive) and every legacy `sessionId`/`session_id` query parameter. More than one
  naming is refused: the sidecar would check one and the upstream might act on another
  (Starlette takes the last query value, FastMCP reads either spelling).
* which endpoint would the upstream take the path for? Upstreams match loosely: Express
  ignores case and a trailing slash, Starlette mounts (FastMCP's `/messages/`) accept any
  sub-path. The sidecar matches at least as loosely, so no spelling skips the session checks.
"""

from __future__ import annotations

import enum
import re

from aiohttp import web

from . import jsonrpc
from .intake import Rejected
from .upstream import SESSION_HEADER

SESSION_PARAMS = ("sessionId", "session_id")

_SLASHES = re.compile(r"/{2,}")


class Route(enum.Enum):
    MCP = "mcp"
    SSE = "sse"
    MESSAGE = "message"


def named_sessions(request: web.Request) -> list[str]:
    """Every session id the request names, repeats included (a repeat is still ambiguous)."""
    names = list(request.headers.getall(SESSION_HEADER, []))
    for param in SESSION_PARAMS:
        names.extend(request.query.getall(param, []))
    return names


def names_legacy_session(request: web.Request) -> bool:
    """Whether the query names a session in the legacy transport's parameter (either spelling).

    Such a request gets the legacy message rules on every path, the MCP endpoint's included:
    an id of someone else's legacy session, or any id the sidecar does not hold as a legacy
    session (a Streamable HTTP id belongs in the header), is answered 404 there too.
    """
    query = request.query
    return any(param in query for param in SESSION_PARAMS)


def check_one_session(request: web.Request) -> None:
    """Refuse a request that names more than one session, before anything reads it further."""
    if len(named_sessions(request)) > 1:
        raise Rejected(
            400,
            "ambiguous_session",
            jsonrpc.error_body(
                jsonrpc.INVALID_REQUEST,
                "The request names more than one session (Mcp-Session-Id header or "
                "sessionId/session_id parameter); send exactly one",
            ),
        )


def canonical(path: str) -> str:
    """A path as a loose upstream router sees it: lower case, `//` merged, no trailing `/`."""
    merged = _SLASHES.sub("/", path).lower()
    return merged.rstrip("/") or "/"


def route_of(path: str, mcp_path: str, sse_path: str, messages_path: str) -> Route | None:
    """The endpoint an upstream could take `path` for, or None for a plain pass-through path."""
    seen = canonical(path)
    if seen == canonical(mcp_path):
        return Route.MCP
    if _under(seen, canonical(messages_path)):
        return Route.MESSAGE
    if _under(seen, canonical(sse_path)):
        return Route.SSE
    return None


def _under(path: str, prefix: str) -> bool:
    # A mount at "/" would swallow everything; the exact routes handle that case.
    return prefix != "/" and (path == prefix or path.startswith(prefix + "/"))
