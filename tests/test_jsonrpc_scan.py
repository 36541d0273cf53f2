"""`jsonrpc.parse` reads a body without `json.loads`'s Python wrapper when it can: a security
boundary (whether a POST is an `initialize`, a call, use of the session), so its answer must be
the full parse's for every input. The reference here is the parse as it was: `json.loads` and
`from_json`. Bodies are random JSON-RPC-ish documents written in odd ways (escaped keys,
duplicate keys, whitespace, BOMs, other encodings, odd numbers), random byte mutations of
them, and random bytes.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar import jsonrpc
from sidecar.activity import classify
from sidecar.sessions import Policy


def reference(body: bytes) -> jsonrpc.Batch:
    """The full parse: what `parse` decided before it read objects with the scanner alone."""
    if not body:
        return jsonrpc.INVALID
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return jsonrpc.INVALID
    return jsonrpc.from_json(data)


def same(body: bytes) -> None:
    # repr, not ==: NaN params are unequal to themselves, and -0.0 == 0.0 would hide a change.
    assert repr(jsonrpc.parse(body)) == repr(reference(body)), body


KEYS = st.sampled_from(["jsonrpc", "id", "method", "params", "result", "error", "x", "méthod"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["2.0", "ping", "initialize", "tools/call", "{", "}", '"', "\\", "\u2028"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
NUMBERS = st.sampled_from(["1", "-0", "1.0", "1e3", "1E+2", "-1.5", "01", "1.", "+1", "0x1"])


def _key(name: str, escape: bool) -> str:
    """A key's JSON text, its letters escaped as \\uXXXX when asked (`"\\u006dethod"`)."""
    if not escape:
        return json.dumps(name)
    return '"' + "".join(f"\\u{ord(c):04x}" for c in name) + '"'


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """A JSON-RPC-ish object (or batch) written out by hand: keys may repeat or be escaped,
    ids may be odd numbers, the spacing and encoding vary."""
    messages = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        pairs = []
        for _ in range(draw(st.integers(min_value=0, max_value=6))):
            key = draw(KEYS)
            if key == "id" and draw(st.booleans()):
                value = draw(NUMBERS)
            elif key == "jsonrpc" and draw(st.booleans()):
                value = '"2.0"'
            else:
                value = json.dumps(draw(VALUES), ensure_ascii=draw(st.booleans()))
            space = draw(st.sampled_from(["", " ", "\n\t", "\r\n  ", "\x0b", "\xa0"]))
            pairs.append(f"{space}{_key(key, draw(st.booleans()))}{space}:{space}{value}{space}")
        messages.append("{" + ",".join(pairs) + "}")
    text = messages[0] if len(messages) == 1 and draw(st.booleans()) else f"[{','.join(messages)}]"
    text = draw(st.sampled_from(["", " ", "\n", "\ufeff", "\x00"])) + text
    text += draw(st.sampled_from(["", " ", "\r\n", "x", "}", " \x00", "{}", "\u3000"]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16-le", "utf-32", "utf-16"]))
    return text.encode(encoding, "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A document with a few bytes replaced, inserted or deleted."""
    body = bytearray(draw(documents()))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(body)))
        byte = draw(st.sampled_from([0, 0x22, 0x5C, 0x7B, 0x7D, 0x2C, 0x3A, 0x20, 0xC3, 0xFF]))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "insert" or at == len(body):
            body.insert(at, byte)
        elif action == "replace":
            body[at] = byte
        else:
            del body[at]
    return bytes(body)


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(documents())
@example(b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
@example(b'{"jsonrpc":"2.0","id":1,"\\u006dethod":"initialize"}')
@example(b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"initialize"}')
@example(b'{"jsonrpc":"2.0","id":1.0,"method":"initialize"}')
@example(b'{"jsonrpc":"2.0","id":1e3,"method":"ping"}')
@example(b'{"jsonrpc":"2.0","id":-0,"method":"ping"}')
@example(b'{"jsonrpc":"2.0","method":"ping","params":{"method":"x","id":2}}')
@example(b'{"jsonrpc":"2.0","id":"{\\"}","method":"ping"}')
@example(codecs.BOM_UTF8 + b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
@example('{"jsonrpc":"2.0","id":1,"method":"ping"}'.encode("utf-16-le"))
@example(b'{"jsonrpc":"2.0","id":1,"method":"ping"} \r\n\t')
@example(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\x0c')
@example(b'{"jsonrpc":"2.0","id":1,"method":"ping"}{}')
@example(b'{"jsonrpc":"2.0","id":1,"method":"\xff"}')
@example(b'{"jsonrpc":"2.0","id":1,"method":"\xed\xa0\x80"}')  # a lone surrogate, UTF-8'd
@example(b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}')
@example(b"{")
@example(b"{\x00")
@example(b"{\x00\x00")
@example(b"{}")
@example(b"{" * 100_000)
@example(b'{"a":' * 5_000 + b"1" + b"}" * 5_000)
@example(b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"ping"}')
def test_the_scan_decides_as_the_full_parse_on_documents(body: bytes) -> None:
    same(body)


@PROPERTY
@given(mutated())
def test_the_scan_decides_as_the_full_parse_on_mutated_documents(body: bytes) -> None:
    same(body)


@PROPERTY
@given(st.binary(max_size=64))
def test_the_scan_decides_as_the_full_parse_on_random_bytes(body: bytes) -> None:
    same(body)


def test_a_huge_body_decides_as_the_full_parse() -> None:
    params = {"text": "x" * 3_000_000, "nested": [{"method": "initialize", "id": 1}] * 1000}
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 9, "method": "tools/call"}
    body = json.dumps({**message, "params": params}).encode()
    same(body)
    same(body + b" garbage")
    assert jsonrpc.parse(body).first_id == 9


POLICIES = st.builds(
    Policy,
    idle_timeout=st.just(60.0),
    ignore_methods=st.frozensets(st.sampled_from(["ping", "tools/list", "x"]), max_size=2),
)


@PROPERTY
@given(st.one_of(documents(), mutated()), POLICIES, st.sets(st.integers(0, 3) | st.just("a")))
def test_classify_decides_as_on_the_full_parse(
    body: bytes, policy: Policy, pings: set[jsonrpc.RequestId]
) -> None:
    assert classify(jsonrpc.parse(body), policy, pings) == classify(reference(body), policy, pings)
