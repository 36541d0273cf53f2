"""The fast path's writer: the upstream request and the client's answer as bytes, by the
header rules both ways share (`header_rules.py`), with a shortcut for the usual request
(`_plain_request`, held equal to the general rules by tests/test_fast_http.py).

`Content-Type`, `Date` and `Server` are added to an answer as aiohttp's response adds them.
Header names and values stay the bytes they arrived as, but for bytes that are not
UTF-8 in a value: aiohttp decodes a value as UTF-8 with surrogate escapes and writes a
surrogate as nothing, so they drop out on the full path, and here too (`relayed_text`).
"""

from __future__ import annotations

from http import HTTPStatus

from ..aiohttp_private import SERVER_SOFTWARE, rfc822_formatted_time
from ..errors import UpstreamUnreachableError
from ..header_rules import (
    DROPPED,
    FORWARDED,
    SESSION,
    Headers,
    Index,
    dropped_by,
    first,
    forwarded,
)
from ..upstream.answers import UNRELAYABLE, relayed_text, unrelayable_head

_SERVER = SERVER_SOFTWARE.encode()
# Statuses whose answer has no body (RFC 9110 §6.4.1): no Content-Length, no Content-Type.
EMPTY_STATUSES = frozenset({204, 304})


def upstream_request(
    prefix: bytes,
    headers: Headers,
    names: list[bytes],
    index: Index,
    body: bytes,
    *,
    host: bytes,
    peer: bytes,
    scheme: bytes,
    session: bytes | None,
) -> bytes:
    """The request as the upstream gets it, as `Forwarder.forward` sends it via aiohttp:
    `prefix` (request line and Host), then `end_to_end` of the headers with the session id
    replaced, X-Forwarded-Host set and X-Forwarded-For/-Proto appended to (the multidict
    rules of `_replace` and `_append`), in one pass over the headers (`names` are theirs in
    lower case, `index` maps them to their values)."""
    if b"connection" not in index and FORWARDED.isdisjoint(index):
        return _plain_request(
            prefix, headers, names, body, host=host, peer=peer, scheme=scheme, session=session
        )
    return _any_request(
        prefix, headers, names, index, body, host=host, peer=peer, scheme=scheme, session=session
    )


def _any_request(
    prefix: bytes,
    headers: Headers,
    names: list[bytes],
    index: Index,
    body: bytes,
    *,
    host: bytes,
    peer: bytes,
    scheme: bytes,
    session: bytes | None,
) -> bytes:
    """`upstream_request` by the general rules (`header_rules.forwarded`)."""
    lines = [prefix]
    pairs = forwarded(headers, names, index, host=host, peer=peer, scheme=scheme, session=session)
    for name, value in pairs:
        lines += (name, b": ", value if value.isascii() else relayed_text(value), b"\r\n")
    lines += (b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body)
    return b"".join(lines)


def _plain_request(
    prefix: bytes,
    headers: Headers,
    names: list[bytes],
    body: bytes,
    *,
    host: bytes,
    peer: bytes,
    scheme: bytes,
    session: bytes | None,
) -> bytes:
    """`upstream_request` for the usual request: no `Connection` header and no
    `X-Forwarded-*` of its own, so nothing is named for dropping and nothing appended to: the
    three X-Forwarded lines go last, as the general rules put them (held equal to those by
    tests/test_fast_http.py), without the table of replacements."""
    lines = [prefix]
    replace = session is not None
    for (name, value), low in zip(headers, names, strict=True):
        if low in DROPPED:
            continue
        if low != SESSION or session is None:
            lines += (name, b": ", value if value.isascii() else relayed_text(value), b"\r\n")
        elif replace:  # the first one's place; later ones are gone
            replace = False
            lines += (b"Mcp-Session-Id: ", session, b"\r\n")
    lines += (
        b"X-Forwarded-Host: ",
        host,
        b"\r\nX-Forwarded-For: ",
        peer,
        b"\r\nX-Forwarded-Proto: ",
        scheme,
        b"\r\nContent-Length: ",
        str(len(body)).encode(),
        b"\r\n\r\n",
        body,
    )
    return b"".join(lines)


def status_line(status: int, reason: bytes) -> bytes:
    if not reason:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def answer_head(status: int, reason: bytes, headers: Headers, length: int | None) -> bytes:
    """The head aiohttp's `web.Response` (`length` given) or `web.StreamResponse` (chunked)
    writes for these headers."""
    lines = [status_line(status, reason)]
    for name, value in headers:
        lines += (name, b": ", value if value.isascii() else relayed_text(value), b"\r\n")
    empty = status in EMPTY_STATUSES
    if not empty:
        if length is None:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            lines += (b"Content-Length: ", str(length).encode(), b"\r\n")
        if length != 0 and first(headers, b"content-type") is None:
            lines.append(b"Content-Type: application/octet-stream\r\n")
    if first(headers, b"date") is None:
        lines += (b"Date: ", rfc822_formatted_time().encode(), b"\r\n")
    if first(headers, b"server") is None:
        lines += (b"Server: ", _SERVER, b"\r\n")
    lines.append(b"\r\n")
    return _relayable(b"".join(lines))


def _relayable(head: bytes) -> bytes:
    """The head, if the client may get it (`answers.unrelayable_head`); else the full path's
    refusal of the answer, a 502."""
    if unrelayable_head(head):
        raise UpstreamUnreachableError(UNRELAYABLE)
    return head


def buffered_answer(status: int, reason: bytes, headers: Headers, body: bytes) -> bytes:
    if status in EMPTY_STATUSES:
        return answer_head(status, reason, headers, 0)
    return answer_head(status, reason, headers, len(body)) + body


def buffered_from(
    status: int,
    reason: bytes,
    headers: Headers,
    names: list[bytes],
    *,
    session: bytes,
    body: bytes,
) -> bytes:
    """`buffered_answer(status, reason, end_to_end(headers, session), body)` in one pass over
    the upstream's headers (`names`: theirs in lower case)."""
    lines = [status_line(status, reason)]
    drop = _relayed(headers, names, session, lines)
    empty = status in EMPTY_STATUSES
    if not empty:
        lines += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
        if body and not _kept(b"content-type", names, drop):
            lines.append(b"Content-Type: application/octet-stream\r\n")
    if not _kept(b"date", names, drop):
        lines += (b"Date: ", rfc822_formatted_time().encode(), b"\r\n")
    if not _kept(b"server", names, drop):
        lines += (b"Server: ", _SERVER, b"\r\n")
    lines.append(b"\r\n")
    head = _relayable(b"".join(lines))
    return head if empty else head + body


def _relayed(
    headers: Headers, names: list[bytes], session: bytes, lines: list[bytes]
) -> frozenset[bytes]:
    """`end_to_end`'s header lines added to `lines`; the (lower-case) names dropped."""
    drop = DROPPED
    count = names.count(b"connection")
    if count == 1:  # an upstream's usual `keep-alive`: its value is at hand
        drop = dropped_by([headers[names.index(b"connection")][1]])
    elif count:
        drop = dropped_by(
            [v for (_, v), low in zip(headers, names, strict=True) if low == b"connection"]
        )
    replace = True
    for (name, value), low in zip(headers, names, strict=True):
        if low in drop:
            continue
        if low != SESSION:
            lines += (name, b": ", value if value.isascii() else relayed_text(value), b"\r\n")
        elif replace:  # only the first one's place, with the client's own id
            replace = False
            lines += (b"Mcp-Session-Id: ", session, b"\r\n")
    return drop


def _kept(name: bytes, names: list[bytes], drop: frozenset[bytes]) -> bool:
    """Whether a header `_relayed` passed on is called `name` (lower case)."""
    return name in names and name not in drop


def json_answer(status: int, body: bytes) -> bytes:
    """The sidecar's own JSON answer (a rejection, an upstream failure), as `web.Response`
    with `content_type="application/json"` writes it."""
    return buffered_answer(status, b"", [(b"Content-Type", b"application/json")], body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
