"""What a client message means for its session's clock (SPEC 2.3), decided in one place.

`classify` is a pure function of the message and what the session remembers: whether it
counts as use (moves last activity), which requests in it are calls (the session is in
flight until they are answered), and which of its responses answer a server `ping` the
sidecar relayed (those are not use, and the manager forgets their ids). Both transports ask
the same question the same way; only the manager acts on the answer.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from .jsonrpc import Batch, Message, RequestId
from .sessions import Policy


@dataclass(frozen=True, slots=True)
class Use:
    counts: bool = False
    calls: tuple[RequestId, ...] = ()
    ping_answers: tuple[RequestId, ...] = ()

    @property
    def is_call(self) -> bool:
        return bool(self.calls)


NO_USE = Use()


def classify(batch: Batch, policy: Policy, server_pings: Container[RequestId]) -> Use:
    """SPEC 2.3: requests and notifications count unless their method is ignored; responses
    count unless they answer a relayed server `ping`. Malformed bodies never count."""
    if not batch.valid:
        return NO_USE
    ignored = policy.ignore_methods
    if len(batch.messages) == 1:
        return _one(batch.messages[0], ignored, server_pings)
    counts = any(m.method not in ignored for m in batch.calls)
    ping_answers: list[RequestId] = []
    for response in batch.responses:
        if response.id is not None and response.id in server_pings:
            ping_answers.append(response.id)
        else:
            counts = True
    calls = tuple(m.id for m in batch.requests if m.id is not None and m.method not in ignored)
    return Use(counts, calls if counts else (), tuple(ping_answers))


USE = Use(True)  # a notification, or a response that answers no relayed ping


def _one(message: Message, ignored: Container[str], server_pings: Container[RequestId]) -> Use:
    """`classify` of a one-message batch, the usual body, without the batch's three passes
    (a third of a fast-path request's bookkeeping); tests/test_jsonrpc_scan.py holds the two
    equal."""
    method = message.method
    if method is not None:
        if method in ignored:
            return NO_USE
        return USE if message.id is None else Use(True, (message.id,))
    request_id = message.id  # a message without a method is a response: it has an id
    if request_id is not None and request_id in server_pings:
        return Use(False, (), (request_id,))
    return USE
