"""What a client's request head may be, as rules with no I/O (SPEC 2.5, one proxy).

The reference path's heads are parsed by aiohttp's strict request parser; the fast lane
(`transports/lane.py`) parses them with its own llhttp parser and must never serve a head
aiohttp would have refused, nor read a header differently. The rules both need live here:

* aiohttp answers 400 for a second header of a singleton field (`SINGLETONS`, its list:
  tests/test_fast_lane_framing.py holds them equal) and for the obsolete WebSocket handshake
  key (`REFUSED`); the lane hands such a head to aiohttp, which answers it.
* A field value does not include the blanks around it (RFC 9110 §5.5): aiohttp strips them,
  and so must every value the lane reads, forwards or hashes into a client identity
  (`field_value`, `field_text`).
"""

from __future__ import annotations

from collections.abc import Iterable

SINGLETONS = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)
REFUSED = frozenset({b"sec-websocket-key1"})
BLANKS = b" \t"  # optional white space around a field value (RFC 9110 §5.6.3)


def field_value(raw: bytes) -> bytes:
    """A field value as it is meant: without the blanks around it. (`bytes.strip` returns
    the same object when there is nothing to strip: the usual header costs no copy.)"""
    return raw.strip(BLANKS)


def field_text(raw: str) -> str:
    """`field_value` for a value already decoded."""
    return raw.strip(" \t")


def refused(names: list[bytes], index: dict[bytes, list[bytes]]) -> bool:
    """Whether aiohttp refuses these headers (lower-case `names` in order, and the `index`
    of their values): a singleton field twice, or a refused field at all."""
    if len(names) != len(index) and any(  # some name came twice: is it a singleton?
        len(index[name]) > 1 for name in SINGLETONS.intersection(index)
    ):
        return True
    return not REFUSED.isdisjoint(index)


def spelled(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers with a name sent again in another spelling (`X-Odd`, then `x-odd`) under
    its first one: names are case-insensitive (RFC 9110 §5.1), and aiohttp's client, which
    the full path sends with, keeps only the last spelling's values of a name sent in two.
    The usual head, each name once, is returned as it came."""
    first: dict[bytes, bytes] = {}
    out = []
    for name, value in headers:
        spelling = first.setdefault(name.lower(), name)
        out.append((spelling, value))
    return out
