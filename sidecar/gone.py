"""Recognising "this session is gone" when the upstream does not say it with a 404.

The MCP transport spec says a server answers 404 for a session it no longer has, and clients
re-initialize on 404. Several servers in the wild answer 400, 403, or even 200 with a JSON-RPC
error instead, and clients then retry the dead id forever (SPEC 2.1). The sidecar matches the
upstream's answer on a *live* session against these patterns, closes the session
(`upstream_gone`) and answers the spec's 404 in the upstream's place.

Patterns are regexes searched in `"<status> <body>"` (the body decoded as UTF-8, at most the
first 4 KiB), case-insensitive. The built-in ones are kept narrow: each names a known SDK's
exact message or a phrase about a session, never a bare status code, because a false match
would end a healthy session.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

BODY_PREFIX = 4096

BUILTIN_PATTERNS: tuple[str, ...] = (
    # TypeScript SDK (and so server-everything): 400 for an id it does not hold.
    r"^400 .*No valid session ID provided",
    # Python SDK legacy SSE transport: 404 "Could not find session" (already a 404, kept
    # so the 404 is the spec's JSON-RPC body rather than plain text).
    r"^404 .*Could not find session",
    # Common phrasings on 400/403/410 from other servers and frameworks.
    r"^(400|403|410) .*\b(session (id )?(not found|expired|unknown|invalid)|"
    r"(unknown|invalid|expired) session( id)?|no such session)\b",
    # 200 carrying a JSON-RPC error about the session.
    r"^200 .*\"error\"\s*:\s*\{[^}]*\"message\"\s*:\s*\"[^\"]*session[^\"]*"
    r"(not found|expired|unknown|invalid|terminated)",
)


class GonePatterns:
    def __init__(self, extra: Iterable[str] = ()) -> None:
        self._patterns = [
            re.compile(p, re.IGNORECASE | re.DOTALL) for p in (*BUILTIN_PATTERNS, *extra)
        ]

    def matches(self, status: int, body: bytes) -> bool:
        if status >= 500 or 300 <= status < 400 or status in (201, 202, 204):
            return False
        text = f"{status} {body[:BODY_PREFIX].decode('utf-8', 'replace')}"
        return any(p.search(text) for p in self._patterns)
