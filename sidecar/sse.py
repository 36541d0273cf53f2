"""Incremental Server-Sent Events framing for relaying streams event by event.

The proxy relays upstream SSE bytes exactly as received, but cut at event boundaries, so a
client never waits on a half-delivered event and the sidecar can look at each event on the way
through: server-initiated `ping` requests (whose answers must not count as activity, SPEC 2.3),
comment lines (keepalives, never activity) and the legacy transport's `endpoint` event.

The parser does not use aiohttp's line reader on purpose: that reader refuses lines longer
than its buffer (128 KiB), and a tool result inside one `data:` line is routinely larger.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# An event larger than this is relayed in pieces without being inspected: the sidecar only
# needs to look at small control messages, and must not hold a huge event in memory twice.
MAX_INSPECTED_EVENT = 1 << 20


@dataclass(frozen=True, slots=True)
class Event:
    """One SSE event as it appeared on the wire, plus its parsed fields."""

    raw: bytes
    event: str = "message"
    data: str = ""
    id: str | None = None
    is_comment_only: bool = False

    @property
    def inspectable(self) -> bool:
        return bool(self.data) and not self.is_comment_only


def parse_event(raw: bytes) -> Event:
    """Parse the fields of one complete event block (terminator included or not)."""
    name = "message"
    data: list[str] = []
    event_id: str | None = None
    saw_field = False
    text = raw.decode("utf-8", errors="replace")
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line or line.startswith(":"):
            continue
        saw_field = True
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "data":
            data.append(value)
        elif key == "event":
            name = value
        elif key == "id":
            event_id = value
    return Event(raw, name, "\n".join(data), event_id, is_comment_only=not saw_field)


class EventSplitter:
    """Feed bytes in, get back complete events (as raw byte blocks) in order.

    Oversized events are passed through as raw chunks (`Event` with no data) so relaying never
    stalls and memory stays bounded.
    """

    def __init__(self, max_event: int = MAX_INSPECTED_EVENT) -> None:
        self._buffer = bytearray()
        self._max_event = max_event
        self._passthrough = False  # inside an oversized event: relay until its end

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer.extend(chunk)
        events: list[Event] = []
        while True:
            end = _event_end(self._buffer)
            if end < 0:
                break
            block = bytes(self._buffer[:end])
            del self._buffer[:end]
            if self._passthrough:
                self._passthrough = False
                events.append(Event(block, is_comment_only=True))
            else:
                events.append(parse_event(block))
        if len(self._buffer) > self._max_event:
            self._passthrough = True
            events.append(Event(bytes(self._buffer), is_comment_only=True))
            self._buffer.clear()
        return events

    def flush(self) -> bytes:
        """Whatever trails the last complete event (the stream ended mid-event)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


# Two line endings in a row: the blank line that ends an event. A lone CR is a line ending
# of its own only when no LF follows it, so "\r\n" always counts once; mixed endings such as
# "\n\r\n" are recognised too.
_BLANK_LINE = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")


def _event_end(buffer: bytearray) -> int:
    """Index just past the first blank line, or -1."""
    match = _BLANK_LINE.search(buffer)
    if match is None:
        return -1
    end = match.end()
    # A CR at the very end after a CRLF or LF line is almost surely the first half of a CRLF
    # still in flight: wait for it, so CRLF events come out whole. In a CR-only stream
    # ("\r\r") it is the blank line itself, and waiting could hold the event indefinitely.
    if end == len(buffer) and buffer.endswith(b"\r") and match.group().startswith((b"\n", b"\r\n")):
        return -1
    return end
