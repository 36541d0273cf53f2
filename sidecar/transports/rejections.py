"""The sidecar's own answers, built once for both transports.

Each is a `Rejected` (status, JSON-RPC error body, the `rejected_total` reason, headers);
`Forwarder.reject` turns it into the response, the metric and the throttled log line.
"""

from __future__ import annotations

from .. import jsonrpc
from ..admission import LimitReachedError
from ..intake import Rejected

LIMIT_RETRY_AFTER = "30"
STORE_RETRY_AFTER = "5"


def not_found(reason: str, request_id: jsonrpc.RequestId | None) -> Rejected:
    """SPEC 2.1's 404 for an expired, closed, unknown or foreign session id (no oracle)."""
    return Rejected(404, reason, jsonrpc.session_not_found(request_id))


def bad_session_id(where: str, request_id: jsonrpc.RequestId | None) -> Rejected:
    return Rejected(
        400,
        "bad_session_id",
        jsonrpc.error_body(
            jsonrpc.INVALID_REQUEST,
            f"Invalid {where}: expected 1-256 visible ASCII characters",
            request_id,
        ),
    )


def limit_rejection(
    exc: LimitReachedError, request_id: jsonrpc.RequestId | None = None
) -> Rejected:
    """503 with Retry-After and a JSON-RPC error: a session limit refused a new session."""
    return Rejected(
        503,
        "limit",
        jsonrpc.error_body(
            jsonrpc.SERVER_ERROR, f"Too many sessions ({exc.scope}); retry later", request_id
        ),
        {"Retry-After": LIMIT_RETRY_AFTER},
    )


NO_RECORD = "The sidecar cannot record new sessions right now (its store failed); retry later"
NO_LOOKUP = "The sidecar cannot look this session up right now (its store failed); retry later"


def store_rejection(request_id: jsonrpc.RequestId | None, message: str = NO_RECORD) -> Rejected:
    """503 with Retry-After: the store could not record a new session, or (on a store other
    sidecars share) look up one this sidecar does not hold (SPEC 2.5, 2.8)."""
    return Rejected(
        503,
        "store_unavailable",
        jsonrpc.error_body(jsonrpc.SERVER_ERROR, message, request_id),
        {"Retry-After": STORE_RETRY_AFTER},
    )
