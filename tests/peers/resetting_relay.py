"""A TCP relay in front of a real upstream that can reset every connection through it.

``ResettingRelay`` listens on 127.0.0.1 and a free port and copies bytes both ways to the
target, keeping what it passed towards the target in ``sent`` (the upstream's bytes, as the
sidecar wrote them). ``reset()`` ends every open connection with a TCP RST (SO_LINGER 0,
then close) on the side facing the sidecar, as a crashing upstream, a load balancer or a NAT
dropping its state would: the sidecar reads ECONNRESET in the middle of whatever it was
receiving. New connections are relayed as before, so the upstream stays reachable after a
reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Self

from tests.peers.processes import HOST

_LINGER_ZERO = struct.pack("ii", 1, 0)  # on, 0 s: close() sends RST and drops unsent data
_CHUNK = 65536


class ResettingRelay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.resets = 0
        self.sent = bytearray()  # every byte relayed towards the target, in arrival order

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for near, far in list(self._open):
            near.transport.abort()
            far.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def connections(self) -> int:
        return len(self._open)

    def reset(self) -> int:
        """RST every open connection towards the sidecar (and drop its upstream half);
        returns how many were reset."""
        count = 0
        for near, far in list(self._open):
            sock = near.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            near.transport.abort()
            far.transport.abort()
            count += 1
        self.resets += count
        return count

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            far_reader, far_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, far_writer)
        self._open.add(pair)
        try:
            await asyncio.gather(_copy(reader, far_writer, self.sent), _copy(far_reader, writer))
        finally:
            self._open.discard(pair)
            writer.transport.abort()
            far_writer.transport.abort()


async def _copy(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, kept: bytearray | None = None
) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while chunk := await source.read(_CHUNK):
            if kept is not None:
                kept += chunk
            sink.write(chunk)
            await sink.drain()
    # One side ended: pass the half-close on, so HTTP/1.1 sees the end it would see directly.
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        if sink.can_write_eof():
            sink.write_eof()
