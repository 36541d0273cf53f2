"""Incremental Server-Sent Events framing for relaying streams event by event.

The proxy relays upstream SSE bytes exactly as received, but cut at event boundaries, so a
client never waits on a half-delivered event and the sidecar can look at each event on the way
through: server-initiated `ping` requests (whose answers must not count as activity, SPEC 2.3),
comment lines (keepalives, never activity) and the legacy transport's `endpoint` event.

The parser does not use aiohttp's line reader on purpose: that reader refuses lines longer
than its buffer (128 KiB), and a tool result inside one `data:` line is routinely larger.
"""

from __future__ import annotations

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


def _event_end(buffer: bytearray) -> int:
    """Index just past the first blank line (any of the three line endings), or -1."""
    best = -1
    for terminator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        index = buffer.find(terminator)
        if index >= 0 and (best < 0 or index + len(terminator) < best):
            best = index + len(terminator)
    return best
