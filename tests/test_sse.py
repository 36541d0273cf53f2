"""Unit tests for `sidecar.sse`: cutting a byte stream into events without buffering it whole."""

from __future__ import annotations

import pytest

from sidecar.sse import MAX_INSPECTED_EVENT, Event, EventSplitter, parse_event

ENDINGS = [b"\n", b"\r\n", b"\r"]


def _stream(eol: bytes) -> tuple[bytes, list[bytes]]:
    events = [
        b"event: message" + eol + b'data: {"jsonrpc":"2.0","id":1,"result":{}}' + eol + eol,
        b": keepalive" + eol + eol,
        b"id: 42" + eol + b"data: line one" + eol + b"data: line two" + eol + eol,
    ]
    return b"".join(events), events


@pytest.mark.parametrize("eol", ENDINGS, ids=["lf", "crlf", "cr"])
def test_events_are_cut_at_blank_lines_for_every_line_ending(eol: bytes) -> None:
    stream, expected = _stream(eol)
    splitter = EventSplitter()
    events = splitter.feed(stream)
    assert [e.raw for e in events] == expected
    assert splitter.flush() == b""
    assert events[0].data == '{"jsonrpc":"2.0","id":1,"result":{}}'
    assert events[1].is_comment_only
    assert events[2].id == "42"
    assert events[2].data == "line one\nline two"


@pytest.mark.parametrize("eol", ENDINGS, ids=["lf", "crlf", "cr"])
def test_events_split_at_every_byte_boundary_come_out_whole(eol: bytes) -> None:
    stream, expected = _stream(eol)
    for cut in range(1, len(stream)):
        splitter = EventSplitter()
        events = splitter.feed(stream[:cut]) + splitter.feed(stream[cut:])
        assert b"".join(e.raw for e in events) + splitter.flush() == stream, cut
        assert [e.raw for e in events] == expected, cut


@pytest.mark.parametrize("eol", ENDINGS, ids=["lf", "crlf", "cr"])
def test_a_stream_fed_one_byte_at_a_time_yields_the_same_events(eol: bytes) -> None:
    stream, expected = _stream(eol)
    splitter = EventSplitter()
    events: list[Event] = []
    for i in range(len(stream)):
        events += splitter.feed(stream[i : i + 1])
    assert [e.raw for e in events] == expected
    assert splitter.flush() == b""


def test_no_event_is_returned_before_its_blank_line_arrives() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\n") == []
    assert splitter.feed(b"data: b") == []
    (event,) = splitter.feed(b"\n\n")
    assert event.raw == b"data: a\ndata: b\n\n"
    assert event.data == "a\nb"


def test_comment_only_events_are_relayed_but_not_inspectable() -> None:
    splitter = EventSplitter()
    events = splitter.feed(b": ping\n\n:\n\n")
    assert [e.raw for e in events] == [b": ping\n\n", b":\n\n"]
    assert all(e.is_comment_only for e in events)
    assert not any(e.inspectable for e in events)


def test_oversized_event_passes_through_in_pieces_and_memory_stays_bounded() -> None:
    limit = 64
    splitter = EventSplitter(max_event=limit)
    head = b"data: " + b"x" * 100
    pieces = splitter.feed(head)
    assert [p.raw for p in pieces] == [head]
    assert pieces[0].is_comment_only
    assert not pieces[0].inspectable
    more = b"y" * 100
    pieces = splitter.feed(more)
    assert [p.raw for p in pieces] == [more]
    # The end of the oversized event is relayed raw, uninspected; the next event is normal.
    pieces = splitter.feed(b"zz\n\ndata: small\n\n")
    assert [p.raw for p in pieces] == [b"zz\n\n", b"data: small\n\n"]
    assert not pieces[0].inspectable
    assert pieces[1].inspectable
    assert pieces[1].data == "small"
    assert splitter.flush() == b""


def test_oversized_event_bytes_are_relayed_exactly_in_order() -> None:
    splitter = EventSplitter(max_event=10)
    stream = b"data: " + b"a" * 50 + b"\n\ndata: b\n\n" + b"data: " + b"c" * 30 + b"\n\n"
    out = b""
    for i in range(0, len(stream), 7):
        out += b"".join(e.raw for e in splitter.feed(stream[i : i + 7]))
    out += splitter.flush()
    assert out == stream


def test_default_inspection_limit_is_one_mebibyte() -> None:
    assert MAX_INSPECTED_EVENT == 1 << 20
    splitter = EventSplitter()
    big = b"data: " + b"x" * (MAX_INSPECTED_EVENT - 100) + b"\n\n"
    (event,) = splitter.feed(big)
    assert event.raw == big
    assert event.inspectable


def test_flush_returns_trailing_bytes_of_an_unfinished_event_once() -> None:
    splitter = EventSplitter()
    assert [e.raw for e in splitter.feed(b"data: done\n\ndata: half")] == [b"data: done\n\n"]
    assert splitter.flush() == b"data: half"
    assert splitter.flush() == b""


def test_parse_event_reads_event_id_and_multi_line_data() -> None:
    event = parse_event(b"event: endpoint\nid: 7\ndata: /messages/?session_id=abc\ndata: two\n\n")
    assert event.event == "endpoint"
    assert event.id == "7"
    assert event.data == "/messages/?session_id=abc\ntwo"
    assert not event.is_comment_only
    assert event.inspectable


def test_parse_event_defaults_and_value_spacing() -> None:
    event = parse_event(b"data:no-space\ndata:  two-spaces\n")
    assert event.event == "message"
    assert event.id is None
    # Only the first space after the colon is part of the syntax.
    assert event.data == "no-space\n two-spaces"


def test_parse_event_ignores_comments_and_unknown_fields() -> None:
    event = parse_event(b": hello\nretry: 1000\nfoo: bar\ndata: x\n\n")
    assert event.data == "x"
    assert not event.is_comment_only


def test_parse_event_field_without_colon_counts_as_a_field() -> None:
    event = parse_event(b"data\n\n")
    assert event.data == ""
    assert not event.is_comment_only
    assert not event.inspectable


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_parse_event_handles_every_line_ending(eol: str) -> None:
    raw = eol.join(["event: message", "id: 1", "data: a", "data: b", "", ""]).encode()
    event = parse_event(raw)
    assert (event.event, event.id, event.data) == ("message", "1", "a\nb")
    assert event.raw == raw


def test_parse_event_survives_invalid_utf8() -> None:
    event = parse_event(b"data: \xff\xfe\n\n")
    assert event.data == "\ufffd\ufffd"


@pytest.mark.parametrize("blank", [b"\n\r\n", b"\r\n\n", b"\r\r\n"])
def test_mixed_line_endings_still_end_an_event(blank: bytes) -> None:
    splitter = EventSplitter()
    first = b"data: one" + blank
    events = splitter.feed(first + b"data: two\n\n")
    assert [e.data for e in events] == ["one", "two"]
    assert b"".join(e.raw for e in events) == first + b"data: two\n\n"


def test_a_cr_only_stream_is_not_held_back_waiting_for_a_line_feed() -> None:
    events = EventSplitter().feed(b"data: x\r\r")
    assert [e.data for e in events] == ["x"]
