"""Unit tests for `sidecar.jsonrpc`: classifying POST bodies and the sidecar's error bodies."""

from __future__ import annotations

import json

import pytest

from sidecar import jsonrpc
from sidecar.jsonrpc import Batch, Message, parse


def test_single_request_is_classified_as_a_request() -> None:
    batch = parse(b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"a":1}}')
    assert batch.valid
    assert batch.messages == (Message(method="tools/list", id=1, params={"a": 1}),)
    (message,) = batch.messages
    assert message.is_request
    assert not message.is_notification
    assert not message.is_response
    assert batch.requests == batch.messages
    assert batch.calls == batch.messages
    assert batch.responses == ()
    assert batch.first_id == 1


def test_string_ids_are_kept_as_strings() -> None:
    batch = parse(b'{"jsonrpc":"2.0","id":"abc","method":"ping"}')
    assert batch.valid
    assert batch.first_id == "abc"


def test_notification_has_a_method_and_no_id() -> None:
    batch = parse(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    assert batch.valid
    (message,) = batch.messages
    assert message.is_notification
    assert not message.is_request
    assert batch.calls == (message,)
    assert batch.requests == ()
    assert batch.first_id is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":7,"result":{}}',
        b'{"jsonrpc":"2.0","id":7,"error":{"code":-1,"message":"no"}}',
    ],
)
def test_response_has_an_id_and_no_method(body: bytes) -> None:
    batch = parse(body)
    assert batch.valid
    (message,) = batch.messages
    assert message.is_response
    assert batch.responses == (message,)
    assert batch.calls == ()
    # A response's id is not a request id to echo in an error answer.
    assert batch.first_id is None


def test_batch_keeps_order_and_classifies_each_message() -> None:
    body = json.dumps(
        [
            {"jsonrpc": "2.0", "id": 5, "result": {}},
            {"jsonrpc": "2.0", "method": "notifications/progress"},
            {"jsonrpc": "2.0", "id": "r1", "method": "tools/call"},
            {"jsonrpc": "2.0", "id": 9, "method": "initialize"},
        ]
    ).encode()
    batch = parse(body)
    assert batch.valid
    assert [m.method for m in batch.messages] == [
        None,
        "notifications/progress",
        "tools/call",
        "initialize",
    ]
    assert [m.id for m in batch.requests] == ["r1", 9]
    assert [m.method for m in batch.calls] == ["notifications/progress", "tools/call", "initialize"]
    assert [m.id for m in batch.responses] == [5]
    assert batch.first_id == "r1"
    found = batch.find("initialize")
    assert found is not None
    assert found.id == 9
    assert batch.find("resources/list") is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"not json",
        b"\xff\xfe\x00",
        b"null",
        b"42",
        b'"a string"',
        b"[]",
        b"{}",
    ],
)
def test_malformed_or_non_jsonrpc_bodies_are_invalid_not_errors(body: bytes) -> None:
    batch = parse(body)
    assert not batch.valid
    assert batch.messages == ()
    assert batch.first_id is None


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "1.0", "id": 1, "method": "ping"},
        {"jsonrpc": 2.0, "id": 1, "method": "ping"},
        {"id": 1, "method": "ping"},
    ],
)
def test_wrong_or_missing_jsonrpc_version_is_invalid(message: dict[str, object]) -> None:
    assert not parse(json.dumps(message).encode()).valid


@pytest.mark.parametrize("bad_id", [True, False])
def test_boolean_id_is_rejected(bad_id: bool) -> None:
    # bool is an int to Python, but JSON-RPC ids are strings or numbers only.
    assert not parse(json.dumps({"jsonrpc": "2.0", "id": bad_id, "method": "x"}).encode()).valid


@pytest.mark.parametrize("bad_id", [1.5, [1], {"a": 1}])
def test_ids_that_are_not_strings_or_integers_are_rejected(bad_id: object) -> None:
    assert not parse(json.dumps({"jsonrpc": "2.0", "id": bad_id, "method": "x"}).encode()).valid


def test_non_string_method_is_invalid() -> None:
    assert not parse(b'{"jsonrpc":"2.0","id":1,"method":5}').valid


def test_message_with_neither_method_nor_id_is_invalid() -> None:
    assert not parse(b'{"jsonrpc":"2.0","result":{}}').valid


def test_one_bad_member_invalidates_the_whole_batch() -> None:
    body = b'[{"jsonrpc":"2.0","id":1,"method":"ping"}, {"jsonrpc":"1.0","id":2,"method":"x"}]'
    batch = parse(body)
    assert not batch.valid
    assert batch.messages == ()


def test_from_json_accepts_already_decoded_data() -> None:
    batch = jsonrpc.from_json({"jsonrpc": "2.0", "id": 3, "method": "ping"})
    assert batch == Batch((Message("ping", 3, None),))


def test_session_not_found_body_is_exactly_what_the_spec_prescribes() -> None:
    assert jsonrpc.session_not_found(None) == (
        b'{"jsonrpc": "2.0", "id": null, "error": {"code": -32001, "message": "Session not found"}}'
    )
    assert json.loads(jsonrpc.session_not_found(12)) == {
        "jsonrpc": "2.0",
        "id": 12,
        "error": {"code": -32001, "message": "Session not found"},
    }
    assert json.loads(jsonrpc.session_not_found("req-1"))["id"] == "req-1"


def test_error_body_without_data_has_no_data_member() -> None:
    assert json.loads(jsonrpc.error_body(-32000, "Upstream MCP server timed out", 4)) == {
        "jsonrpc": "2.0",
        "id": 4,
        "error": {"code": -32000, "message": "Upstream MCP server timed out"},
    }


def test_error_body_with_data_carries_it() -> None:
    assert json.loads(jsonrpc.error_body(-32600, "bad", None, limit=10, scope="x")) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "bad", "data": {"limit": 10, "scope": "x"}},
    }


def test_error_codes_are_the_documented_ones() -> None:
    assert jsonrpc.SESSION_NOT_FOUND == -32001
    assert jsonrpc.SERVER_ERROR == -32000
    assert jsonrpc.INVALID_REQUEST == -32600


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert jsonrpc.parse(body) is jsonrpc.INVALID
