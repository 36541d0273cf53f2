"""What the sidecar needs to know about JSON-RPC 2.0 messages, and the bodies it answers with.

The sidecar never rewrites a client's JSON-RPC traffic: it only reads enough of it to decide
whether a `POST` shows use of the session (SPEC 2.3), whether it is an `initialize`, and which
request ids it should echo in its own error answers. Malformed JSON is not an error here: it is
forwarded untouched (the upstream owns JSON-RPC errors) and simply never counts as activity.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RequestId = str | int

# JSON-RPC error codes the sidecar itself uses.
SESSION_NOT_FOUND = -32001  # the code MCP SDKs use for an unknown session
SERVER_ERROR = -32000  # generic implementation-defined server error
INVALID_REQUEST = -32600


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message: a request (method + id), notification (method) or response."""

    method: str | None
    id: RequestId | None
    params: Any = None

    @property
    def is_request(self) -> bool:
        return self.method is not None and self.id is not None

    @property
    def is_notification(self) -> bool:
        return self.method is not None and self.id is None

    @property
    def is_response(self) -> bool:
        return self.method is None and self.id is not None


@dataclass(frozen=True, slots=True)
class Batch:
    """The messages of one POST body; `valid` is False for anything that is not JSON-RPC."""

    messages: tuple[Message, ...] = field(default_factory=tuple)
    valid: bool = True

    @property
    def requests(self) -> tuple[Message, ...]:
        return tuple(m for m in self.messages if m.is_request)

    @property
    def calls(self) -> tuple[Message, ...]:
        """Requests and notifications: messages the client originates."""
        return tuple(m for m in self.messages if m.method is not None)

    @property
    def responses(self) -> tuple[Message, ...]:
        return tuple(m for m in self.messages if m.is_response)

    def find(self, method: str) -> Message | None:
        return next((m for m in self.messages if m.method == method), None)

    @property
    def first_id(self) -> RequestId | None:
        """The id to echo in an error answer: JSON-RPC allows only one, so the first request's."""
        return next((m.id for m in self.messages if m.is_request), None)


INVALID = Batch(valid=False)


# `json.loads`'s own decoder settings (all defaults), so `_loads` decides as it does.
_DECODER = json.JSONDecoder()
# Set in `JSONDecoder.__init__` (the C scanner when `_json` is built), not in the stubs.
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_BLANK = " \t\n\r"  # JSON's whitespace: all `json.loads` allows after the document
_OPEN = ord("{")


def ends_handshake(batch: Batch) -> bool:
    """Whether the batch holds the client's `notifications/initialized`: the end of the
    initialize handshake, and the first message sent with the version it negotiated."""
    return batch.find("notifications/initialized") is not None


def parse(body: bytes) -> Batch:
    """Read a POST body into a Batch; never raises."""
    if not body:
        return INVALID
    try:
        data = _loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: a few MiB of "[[[[..." nests deeper than the parser's stack.
        return INVALID
    if type(data) is dict:  # one message, the usual body: no list to build
        message = _message(data)
        return INVALID if message is None else Batch((message,))
    return from_json(data)


def _loads(body: bytes) -> Any:
    """`json.loads(body)`, with the same result or error for every input, at a quarter of its
    cost for the usual body (a JSON object): `json.loads` spends most of a small document's
    time in Python around its C scanner (`detect_encoding`, `decode`'s whitespace regexes).
    A body that starts with `{` and whose second byte is not NUL is UTF-8 to `json.loads`
    (no BOM, not UTF-16/32) and has no leading whitespace; its C scanner then reads the
    document at 0 and only JSON whitespace may follow. Any other body goes to `json.loads`
    itself (tests/test_jsonrpc_scan.py holds the two equal on random and mutated bodies)."""
    if body[0] != _OPEN or body[1:2] == b"\x00":
        return json.loads(body)
    text = body.decode("utf-8", "surrogatepass")
    try:
        data, end = _SCAN(text, 0)
    except StopIteration as exc:  # what `raw_decode` turns into "Expecting value"
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    if end != len(text) and text[end:].strip(_BLANK):
        raise json.JSONDecodeError("Extra data", text, end)
    return data


def from_json(data: Any) -> Batch:
    """Classify already-decoded JSON (a single message or a batch array)."""
    items = data if isinstance(data, list) else [data]
    messages = []
    for item in items:
        message = _message(item)
        if message is None:
            return INVALID
        messages.append(message)
    return Batch(tuple(messages)) if messages else INVALID


def _message(item: Any) -> Message | None:
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        return None
    method = item.get("method")
    msg_id = item.get("id")
    if isinstance(msg_id, float) and msg_id.is_integer():
        # JavaScript has one number type: the TypeScript SDK takes `"id": 1.0` as the integer 1,
        # so an `initialize` spelled that way creates a session and must be recognised.
        msg_id = int(msg_id)
    if method is not None and not isinstance(method, str):
        return None
    if msg_id is not None and (isinstance(msg_id, bool) or not isinstance(msg_id, str | int)):
        return None
    if method is None and msg_id is None:
        return None
    return Message(method=method, id=msg_id, params=item.get("params"))


def error_body(code: int, message: str, request_id: RequestId | None = None, **data: Any) -> bytes:
    """A JSON-RPC error response, the body of every answer the sidecar gives on its own."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data:
        error["data"] = data
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}).encode()


def session_not_found(request_id: RequestId | None) -> bytes:
    """The exact body SPEC 2.1 prescribes for expired, closed and unknown session ids."""
    return error_body(SESSION_NOT_FOUND, "Session not found", request_id)
