"""Whether an idle kept-alive upstream connection may carry the next request (SPEC 2.5).

An upstream may close a kept-alive connection right after an answer (or write bytes nobody
asked for). Until the event loop has read that FIN, the connection looks reusable; a request
written on it then never reaches the upstream, and cannot be retried safely once written,
since nothing tells it apart from a request the upstream received and dropped. Asked before
the write, the socket tells: readable while idle means closed or spoken on, and the request
goes on a fresh connection. Both ways to the upstream ask this one question: the fast path's
raw connections (`wire.py`) and the full path's aiohttp pool (`aiohttp_private`).

Plain TCP only: on a TLS connection the socket is readable for the TLS layer's own records
(session tickets), which would send every request on a fresh connection.
"""

from __future__ import annotations

import select
import socket


class IdleWatch:
    """One connection's socket, asked whether it was closed or spoken on while idle."""

    __slots__ = ("_poll",)

    def __init__(self, sock: socket.socket | None) -> None:
        self._poll: select.poll | None = None
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def spoke(self) -> bool:
        """Readable now: the upstream closed the connection or wrote on it while idle."""
        return self._poll is not None and bool(self._poll.poll(0))


def spoke_while_idle(sock: socket.socket | None) -> bool:
    """`IdleWatch.spoke` for a socket asked once."""
    return IdleWatch(sock).spoke()
