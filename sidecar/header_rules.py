"""The header rules of SPEC 2.1 on raw header lists, for both ways in (no I/O).

Hop-by-hop headers (RFC 9110 §7.6.1) and those named in `Connection` are dropped both ways;
upstream, `Host` is the member's authority (written by the edge that sends), `X-Forwarded-Host`
the client's Host and `X-Forwarded-For` / `X-Forwarded-Proto` appended to; back to the
client, the upstream's session id becomes the client's own. Names and values stay the bytes
they arrived as: the full path (`forwarding.py`) decodes the result for aiohttp, the fast path
(`transports/fast_http.py`) writes it; the first is held equal to the second's shortcut for
the usual request by tests/test_fast_http.py, and both ways by the differential fuzzer.
Replacing a header keeps the first one's place and drops the others, appending joins the
values with ", " (a multidict's `headers[name] = value`, as the full path always did).
"""

from __future__ import annotations

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Headers the writer computes itself for the message it writes.
RECOMPUTED = frozenset({b"content-length", b"host"})

Headers = list[tuple[bytes, bytes]]
Index = dict[bytes, list[bytes]]  # lower-case name: its values, in order

DROPPED = HOP_BY_HOP | RECOMPUTED
SESSION = b"mcp-session-id"


def first(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def indexed(headers: Headers) -> tuple[list[bytes], Index]:
    """The headers' names in lower case, and the index `forwarded` takes."""
    names = [name.lower() for name, _ in headers]
    index: Index = {}
    for low, (_, value) in zip(names, headers, strict=True):
        index.setdefault(low, []).append(value)
    return names, index


def first_of(index: Index, name: bytes) -> bytes | None:
    values = index.get(name)
    return None if values is None else values[0]


def all_of(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def _dropped(headers: Headers) -> frozenset[bytes]:
    tokens = all_of(headers, b"connection")
    if not tokens:
        return DROPPED
    named = {t.strip().lower() for value in tokens for t in value.split(b",") if t.strip()}
    return DROPPED | named


def end_to_end(headers: Headers, session: bytes | None = None) -> Headers:
    """The headers that pass, the session id (if given) replacing the one that came."""
    drop = _dropped(headers)
    kept = [(k, v) for k, v in headers if k.lower() not in drop]
    if session is not None:
        replace(kept, b"Mcp-Session-Id", session, only_if_present=True)
    return kept


def replace(headers: Headers, name: bytes, value: bytes, *, only_if_present: bool = False) -> None:
    """A multidict's `headers[name] = value`: the first one's place, the others removed."""
    low = name.lower()
    at = next((i for i, (k, _) in enumerate(headers) if k.lower() == low), None)
    if at is None:
        if not only_if_present:
            headers.append((name, value))
        return
    headers[at] = (name, value)
    headers[at + 1 :] = [(k, v) for k, v in headers[at + 1 :] if k.lower() != low]


def append(headers: Headers, name: bytes, value: bytes) -> None:
    existing = b", ".join(all_of(headers, name.lower()))
    replace(headers, name, existing + b", " + value if existing else value)


def forwarded(
    headers: Headers,
    names: list[bytes],
    index: Index,
    *,
    host: bytes,
    peer: bytes,
    scheme: bytes,
    session: bytes | None,
) -> Headers:
    """The client's headers as the upstream gets them (but `Host` and `Content-Length`, the
    writer's): `end_to_end`, the session id replaced by `session` (the binding's) where the
    request names one, X-Forwarded-Host set, X-Forwarded-For/-Proto appended to, in one pass
    over the headers (`names`: theirs in lower case, `index`: name to values)."""
    tokens = index.get(b"connection")
    drop = DROPPED if tokens is None else dropped_by(tokens)
    replacing = {
        b"x-forwarded-host": (b"X-Forwarded-Host", host),
        b"x-forwarded-for": (b"X-Forwarded-For", _appended(index, drop, b"x-forwarded-for", peer)),
        b"x-forwarded-proto": (
            b"X-Forwarded-Proto",
            _appended(index, drop, b"x-forwarded-proto", scheme),
        ),
    }
    if session is not None:
        replacing[SESSION] = (b"Mcp-Session-Id", session)
    out: Headers = []
    done: set[bytes] = set()
    for (name, value), low in zip(headers, names, strict=True):
        if low in drop:
            continue
        replaced = replacing.get(low)
        if replaced is None:
            out.append((name, value))
        elif low not in done:  # the first one's place; later ones are gone
            done.add(low)
            out.append(replaced)
    for low, pair in replacing.items():
        if low not in done and low != SESSION:
            out.append(pair)
    return out


FORWARDED = frozenset((b"x-forwarded-host", b"x-forwarded-for", b"x-forwarded-proto"))


def dropped_by(tokens: list[bytes]) -> frozenset[bytes]:
    """The headers dropped when `Connection` names some (see `_dropped`); remembered for the
    few values seen (an upstream says `keep-alive` on every answer)."""
    key = tokens[0] if len(tokens) == 1 else b",".join(tokens)
    drop = _NAMED.get(key)
    if drop is None:
        named = {t.strip().lower() for t in key.split(b",") if t.strip()}
        drop = DROPPED | named
        if len(_NAMED) < MAX_NAMED:  # bounded: a client chooses its own `Connection` values
            _NAMED[key] = drop
    return drop


MAX_NAMED = 64
_NAMED: dict[bytes, frozenset[bytes]] = {}


def _appended(index: Index, drop: frozenset[bytes], name: bytes, value: bytes) -> bytes:
    existing = b"" if name in drop else b", ".join(index.get(name, ()))
    return existing + b", " + value if existing else value
