"""Recognising "this session is gone" when the upstream does not say it with a 404.

The MCP transport spec says a server answers 404 for a session it no longer has, and clients
re-initialize on 404. Several servers in the wild answer 400, 403, or even 200 with a JSON-RPC
error instead, and clients then retry the dead id forever (SPEC 2.1). The sidecar matches the
upstream's answer on a *live* session against these patterns, closes the session
(`upstream_gone`) and answers the spec's 404 in the upstream's place.

The built-in rule reads the *message* of the answer (a JSON-RPC error's `message`, a JSON
`{"error": "..."}`, or a plain-text body), drops a status prefix such as "Bad Request:", and
requires the whole message to be one of the known SDKs' phrases for a missing session,
optionally followed by the id. Anchoring on the whole message is what keeps it narrow: an
application error that merely mentions a session ("Unknown prompt: session-expired-notice",
"browser session expired, log in again") is relayed untouched, because a false match would end
a healthy session (SPEC 2.5). A 200 counts only when its body is a JSON-RPC error.

Operators' extra patterns (`upstream.session_gone`) are regexes searched in
`"<status> <body>"` (the body decoded as UTF-8, at most the first 4 KiB), case-insensitive.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

BODY_PREFIX = 4096

# Statuses on which a server says "no such session": 404 is the spec's; 400 is the TypeScript
# SDK's; 403 and 410 are seen from gateways and frameworks; 200 only as a JSON-RPC error.
GONE_STATUSES = frozenset({200, 400, 403, 404, 410})
_STATUS_PREFIX = re.compile(r"^(?:bad request|not found|forbidden|gone|error)\s*:\s*", re.I)
# Each phrase is a known SDK's or framework's whole message, e.g. the TypeScript SDK's
# "Bad Request: No valid session ID provided", the Python SDK's "Session not found",
# "Session has been terminated" and legacy "Could not find session".
_PHRASES = re.compile(
    r"(?:no valid session id provided"
    r"|could not find session"
    r"|no such session"
    r"|(?:mcp[- ])?session(?: id)? (?:not found|expired|unknown|invalid|does not exist"
    r"|has been terminated|has expired|is closed|terminated)"
    r"|(?:unknown|invalid|expired) (?:mcp[- ])?session(?: id)?)"
    r"(?:\s*(?:[:=]|for|with id)?\s*['\"]?[\w.\-]{1,256}['\"]?)?[.!]?",
    re.IGNORECASE,
)


def message_of(status: int, body: bytes) -> str | None:
    """The human message of an error answer, or None when it is not an error answer."""
    text = body[:BODY_PREFIX].decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return None if status == 200 else text
    return _json_message(data, rpc_only=status == 200)


def _json_message(data: Any, *, rpc_only: bool) -> str | None:
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        return message if isinstance(message, str) else None
    if rpc_only:
        return None
    for key in ("error", "message", "detail"):
        if isinstance(data.get(key), str):
            return str(data[key])
    return None


def _may_hold_error(body: bytes) -> bool:
    """Whether a 200's body can be a JSON-RPC error: without the bytes `error` (or a \\u
    escape that could spell them) no JSON object in it has an "error" member, so the JSON
    parse every plain answer would otherwise cost is skipped."""
    return b"error" in body or b"\\u" in body


def is_gone_message(message: str) -> bool:
    return _PHRASES.fullmatch(_STATUS_PREFIX.sub("", message.strip(), count=1)) is not None


class GonePatterns:
    def __init__(self, extra: Iterable[str] = ()) -> None:
        self._extra = [re.compile(p, re.IGNORECASE | re.DOTALL) for p in extra]

    def matches(self, status: int, body: bytes) -> bool:
        if status not in GONE_STATUSES and not self._extra:
            return False
        if status >= 500 or 300 <= status < 400 or status in (201, 202, 204):
            return False
        if status in GONE_STATUSES and (status != 200 or _may_hold_error(body)):
            message = message_of(status, body)
            if message is not None and is_gone_message(message):
                return True
        if not self._extra:
            return False
        text = f"{status} {body[:BODY_PREFIX].decode('utf-8', 'replace')}"
        return any(p.search(text) for p in self._extra)
