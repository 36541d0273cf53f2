"""An upstream session id the sidecar cannot track: the rule, and the answer (no I/O).

A session id is 1 to 256 visible ASCII characters (SPEC 2.1, the MCP transport spec). An
upstream that issues anything else (a non-ASCII byte, a blank or a control character
inside, more than 256 bytes) has created a session the sidecar can neither key, store nor
name back to the client unaltered: aiohttp writes header values as UTF-8 and drops what does
not encode, so the client would get another id than the upstream's. Such a session must not
reach the client as one (SPEC 2.5: the upstream never holds a session the sidecar does not
know). Every path that sees an upstream's new id (the full and the fast `initialize`, the
backstop) asks `why_untrackable`, and for an id it cannot track closes the session upstream
with the id's bytes exactly as they came and answers `refusal`: a 502 with a JSON-RPC error.

The id is carried as bytes. Both HTTP parsers the sidecar reads upstream answers with decode
a header value as UTF-8 with `surrogateescape` (aiohttp's client) or hand over its bytes
(llhttp on the fast path), so `raw_id` gives back exactly what the upstream sent.
"""

from __future__ import annotations

from . import jsonrpc
from .intake import Rejected

MAX_ID_BYTES = 256
REASON = "untrackable_session"  # the `rejected_total` label


def raw_id(value: str) -> bytes:
    """The bytes of a header value as aiohttp decoded it (UTF-8, `surrogateescape`)."""
    return value.encode("utf-8", "surrogateescape")


def why_untrackable(session_id: bytes) -> str | None:
    """What makes the upstream's id one the sidecar cannot track, or None when it can."""
    if not session_id:
        return "empty"
    if len(session_id) > MAX_ID_BYTES:
        return f"longer than {MAX_ID_BYTES} bytes"
    if not session_id.isascii():
        return "not ASCII"
    if any(byte < 0x21 or byte > 0x7E for byte in session_id):
        return "a blank or control character inside"
    return None


def loggable(session_id: bytes) -> str:
    """The id's first bytes, escaped: a log line never holds a whole id (SPEC 2.5), nor the
    control characters of one that could forge a line of its own."""
    return ascii(session_id[:8])


def refusal(why: str, request_id: jsonrpc.RequestId | None) -> Rejected:
    """The client's answer: a 502 naming the fault, which is the upstream's, not the client's."""
    return Rejected(
        502,
        REASON,
        jsonrpc.error_body(
            jsonrpc.SERVER_ERROR,
            f"The upstream MCP server issued a session id the sidecar cannot track ({why}: "
            "a session id is 1-256 visible ASCII characters); the session was closed upstream",
            request_id,
        ),
    )
