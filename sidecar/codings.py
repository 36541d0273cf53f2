"""Which request bodies the sidecar can read: the `Content-Encoding` rule (SPEC 2.1, 2.3).

Every rule of the sidecar that looks at a body reads it as JSON-RPC: `initialize` creates a
session, a call keeps it in flight, a client's message is activity, an answer to a server
ping is not. A body in a content coding (`gzip`, `br`, ...) hides all of that, so a request
whose `Content-Encoding` names any coding but `identity` is refused with 415 and an
`Accept-Encoding: identity` header (RFC 9110 §15.5.16), and nothing of it is forwarded: an
`initialize` the sidecar cannot read would otherwise make a session it does not track, and
a call would count as nothing. Decompressing it instead would send the upstream other bytes
than the client's (labelled with a coding they no longer have); passing it through unread
would leave the session rules blind.

No I/O here: both edges call it, the full path (`Forwarder.check`, before the body is read)
and the fast path (`FastPath.head_ok`, which then leaves the request to the full path).
"""

from __future__ import annotations

from collections.abc import Iterable

from . import jsonrpc

STATUS = 415
REASON = "content_encoding"  # `rejected_total{reason=...}`
ACCEPTED = ("Accept-Encoding", "identity")


def unreadable(values: Iterable[str]) -> str | None:
    """The first content coding named in these `Content-Encoding` values that is not
    `identity` (compared without case, blanks around it ignored), or None."""
    for value in values:
        for token in value.split(","):
            coding = token.strip().lower()
            if coding and coding != "identity":
                return coding
    return None


def refusal_body(coding: str) -> bytes:
    """The JSON-RPC error body of the 415."""
    return jsonrpc.error_body(
        jsonrpc.INVALID_REQUEST,
        f"Content-Encoding {coding[:40]!r} not supported: send the body unencoded (identity)",
    )
