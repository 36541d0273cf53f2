"""Recognising "session gone" answers: real SDK messages match, application errors never do."""

from __future__ import annotations

import json

import pytest

from sidecar.gone import GonePatterns


def _rpc_error(message: str, code: int = -32000) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": 3, "error": {"code": code, "message": message}}
    ).encode()


GONE = [
    # TypeScript SDK 1.x (server-everything): dead or unknown id on Streamable HTTP.
    (400, _rpc_error("Bad Request: No valid session ID provided")),
    (404, _rpc_error("Session not found", -32001)),
    # Python SDK 1.30: the session manager's unknown id, a terminated transport, legacy SSE.
    (404, _rpc_error("Session not found", -32600)),
    (404, _rpc_error("Not Found: Session has been terminated")),
    (404, b"Could not find session"),
    # Gateways and frameworks: plain text or JSON, with or without the id.
    (400, b"Invalid session ID"),
    (403, b'{"error": "session expired"}'),
    (410, b"Session not found: 3f2a9c1b-77aa-4d1e"),
    (400, b'{"message": "Unknown session"}'),
    (200, _rpc_error("Session not found")),
    (200, _rpc_error("Invalid session id 'abc123'")),
]

HEALTHY = [
    # FastMCP's error for a prompt whose name mentions a session (the finding of SPEC 2.5).
    (200, _rpc_error("Unknown prompt: session-expired-notice", -32602)),
    (200, _rpc_error("Unknown tool: session_not_found_handler", -32602)),
    # A tool's own result text or error about some other session.
    (200, _rpc_error("browser session expired, please log in again")),
    (
        200,
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "result": {"content": [{"type": "text", "text": "Session not found"}]},
            }
        ).encode(),
    ),
    (200, b"Session not found"),  # a 200 that is no JSON-RPC error is an application answer
    (400, _rpc_error("Bad Request: Missing session ID")),  # a request that named no session
    (400, _rpc_error("Bad Request: Unsupported protocol version: 2099-01-01")),
    (400, _rpc_error("Parse error: session field expected")),
    (400, b"The database session expired while running the query"),
    (403, b'{"error": "Origin not allowed for this session"}'),
    (500, b"Session not found"),  # a server error is never "gone": nothing is closed
    (202, b""),
    (400, _rpc_error("Error: could not find session-scoped resource foo/bar baz")),
]


@pytest.mark.parametrize(("status", "body"), GONE)
def test_known_sdk_session_gone_answers_are_recognised(status: int, body: bytes) -> None:
    assert GonePatterns().matches(status, body)


@pytest.mark.parametrize(("status", "body"), HEALTHY)
def test_application_errors_that_mention_a_session_are_not_gone(status: int, body: bytes) -> None:
    assert not GonePatterns().matches(status, body)


def test_operator_patterns_add_to_the_built_in_ones() -> None:
    patterns = GonePatterns([r"^409 .*lease lost"])
    assert patterns.matches(409, b"worker lease lost")
    assert patterns.matches(400, _rpc_error("Bad Request: No valid session ID provided"))
    assert not patterns.matches(409, b"conflict")
