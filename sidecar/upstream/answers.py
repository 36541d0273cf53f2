"""What an upstream answer's head means, whichever client read it (SPEC 2.5).

The full path reads upstream answers with aiohttp's client, whose parser is llhttp with a few
leniencies and checks of aiohttp's own; the fast path (`wire.py`) reads them with httptools,
the same llhttp. These are aiohttp's choices, written down once so the fast path makes them
too and an odd upstream gets the same answer either way: what llhttp is told to tolerate,
which interim answers are skipped, the limits on a head, and a field value without the
blanks around it. No I/O and no parser here: `wire.py` applies the rules to llhttp's
callbacks, `client.py`'s aiohttp applies them itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The llhttp leniencies aiohttp's client sets outside dev mode (`_http_parser.pyx`): obs-fold
# and other odd header bytes, bare LF line ends, blanks after a chunk size. Without them
# httptools refused answers the full path relays (502 on one path, 200 on the other).
LENIENCIES = {
    "lenient_headers": True,
    "lenient_optional_cr_before_lf": True,
    "lenient_spaces_after_chunk_size": True,
}

# aiohttp's `ClientSession` defaults: past these an answer head is malformed (502).
MAX_LINE = 8190  # the status line's reason
# A header's value, and its name: aiohttp's parser means name and value together, but counts
# the name only for an answer's first header (it resets the count as it files the header
# before), so the value alone is what it refuses in practice.
MAX_FIELD = 8190
MAX_HEADERS = 128

BLANKS = b" \t"  # the OWS of RFC 9110 §5.6.3


def interim(status: int) -> bool:
    """A 1xx answer that comes before the final one (RFC 9110 §15.2): skipped, as aiohttp's
    client skips it. 101 is final: it switches protocols instead of answering."""
    return 100 <= status < 200 and status != 101


def field_value(value: bytes) -> bytes:
    """A header value without the blanks after it (RFC 9110 §5.5): llhttp drops those before
    it but not after, aiohttp strips them, so identity (`Mcp-Session-Id`) and forwarding see
    the same value on both paths."""
    if value and value[-1] in BLANKS:
        return value.rstrip(BLANKS)
    return value


def refused_field(name: bytes, raw_value: bytes, count: int) -> str:
    """Why aiohttp's client refuses a header it has read `count` of (this one included), or
    "": a NUL in the value (llhttp's lenient mode lets it through, aiohttp does not), a field
    past `MAX_FIELD` or more than `MAX_HEADERS` headers."""
    if len(raw_value) > MAX_FIELD or len(name) > MAX_FIELD:
        return f"a header name or value longer than {MAX_FIELD} bytes"
    if b"\x00" in raw_value:
        return "a NUL byte in a header value"
    if count > MAX_HEADERS:
        return f"more than {MAX_HEADERS} headers"
    return ""


def relayed_text(text: bytes) -> bytes:
    """A reason or a header value as the full path writes it on: aiohttp decodes it as UTF-8
    with surrogate escapes and writes a surrogate as nothing, so bytes that are not UTF-8 drop
    out (ASCII, the usual text, is returned as it is, without a copy)."""
    if text.isascii():
        return text
    return text.decode("utf-8", "ignore").encode()


def refused_reason(reason: bytes) -> str | None:
    """Why aiohttp's client refuses a status line's reason, or None."""
    if len(reason) > MAX_LINE:
        return f"a status line longer than {MAX_LINE} bytes"
    return None


# Control characters a header value may not carry (RFC 9110 §5.5; HTAB is allowed). llhttp's
# lenient mode and aiohttp's client read them, but aiohttp's server refuses to write them
# ("header injection"): an answer whose head holds one cannot be relayed, on either path.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTROL_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
UNRELAYABLE = "a control character in a header value of the upstream's answer"


def unrelayable_head(head: bytes) -> bool:
    """Whether a head written for the client (lines ended by CRLF) holds a control character
    in a header: one scan of the whole head."""
    return _CONTROL.search(head) is not None


def unrelayable_values(values: Iterable[str]) -> bool:
    """`unrelayable_head` for header values as aiohttp's client read them."""
    return any(_CONTROL_TEXT.search(value) for value in values)
