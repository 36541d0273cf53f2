"""The fast path's upstream request (`fast_http.upstream_request`) on random header sets: its
shortcut for the usual request (no `Connection`, no `X-Forwarded-*` of the client's) gives
the bytes the general rules give, and both give what the multidict rules (`end_to_end`,
`_replace`, `_append`, as `Forwarder.forward` applies them) give.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import header_rules
from sidecar.transports import fast_http as wire
from sidecar.transports import lane

PREFIX = b"POST /mcp HTTP/1.1\r\nHost: up.test:9\r\n"
NAMES = st.sampled_from(
    [
        b"Accept",
        b"Content-Type",
        b"User-Agent",
        b"Mcp-Session-Id",
        b"mcp-session-id",
        b"Authorization",
        b"Keep-Alive",
        b"Connection",
        b"TE",
        b"Host",
        b"Content-Length",
        b"X-Forwarded-For",
        b"x-forwarded-proto",
        b"X-Forwarded-Host",
        b"X-Custom",
        b"Server",
        b"Content-type",
    ]
)
VALUES = st.sampled_from(
    [
        b"a",
        b"keep-alive",
        b"close",
        b"X-Custom, keep-alive",
        b"x-forwarded-for",
        b"Server",
        b" 1.2.3.4 ",
        b"",
    ]
)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=10)


def by_multidict_rules(
    headers: header_rules.Headers, body: bytes, session: bytes | None, host: bytes, peer: bytes
) -> bytes:
    kept = header_rules.end_to_end(headers, session)
    header_rules.replace(kept, b"X-Forwarded-Host", host)
    header_rules.append(kept, b"X-Forwarded-For", peer)
    header_rules.append(kept, b"X-Forwarded-Proto", b"http")
    lines = b"".join(b"%s: %s\r\n" % pair for pair in kept)
    return PREFIX + lines + b"Content-Length: %d\r\n\r\n" % len(body) + body


@settings(max_examples=500, deadline=None)
@given(HEADERS, st.binary(max_size=20), st.sampled_from([None, b"up-1"]))
def test_the_upstream_request_follows_the_general_rules(
    headers: header_rules.Headers, body: bytes, session: bytes | None
) -> None:
    names, index = header_rules.indexed(headers)
    host, peer = b"example.test", b"127.0.0.1"
    made = wire.upstream_request(
        PREFIX, headers, names, index, body, host=host, peer=peer, scheme=b"http", session=session
    )
    general = wire._any_request(
        PREFIX, headers, names, index, body, host=host, peer=peer, scheme=b"http", session=session
    )
    assert made == general
    assert made == by_multidict_rules(headers, body, session, host, peer)


@settings(max_examples=500, deadline=None)
@given(
    HEADERS,
    st.binary(max_size=20),
    st.sampled_from([200, 202, 204, 404, 500]),
    st.sampled_from([b"", b"OK"]),
)
def test_the_client_answer_follows_end_to_end(
    headers: header_rules.Headers, body: bytes, status: int, reason: bytes
) -> None:
    names, _ = header_rules.indexed(headers)
    made = wire.buffered_from(status, reason, headers, names, session=b"client-1", body=body)
    expected = wire.buffered_answer(
        status, reason, header_rules.end_to_end(headers, b"client-1"), body
    )
    # The Date both add when the upstream gave none is the same second's, but may tick over.
    assert _undated(made) == _undated(expected)


def _undated(answer: bytes) -> bytes:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.startswith(b"Date: ")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def odd_by_the_rules(head: bytes) -> bool:
    """What aiohttp's strict parser refuses and llhttp's lenient one might take: control
    characters, obs-fold, a bare LF."""
    return (
        CONTROL.search(head) is not None
        or b"\n " in head
        or b"\n\t" in head
        or head.count(b"\n") != head.count(b"\r\n")
    )


HEAD_BYTES = st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b" ", b"\t", b"a", b":", b"\x00", b"\x7f", b"\xff"])
    | st.binary(max_size=2),
    max_size=30,
).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(HEAD_BYTES)
def test_the_lane_refuses_every_head_the_rules_call_odd(head: bytes) -> None:
    if odd_by_the_rules(head):
        assert lane._odd(head)
    elif b"\r" not in head.replace(b"\r\n", b""):  # a bare CR: refused, though not by the rules
        assert not lane._odd(head)
