"""The client-facing side: one handler per MCP transport over one shared forwarder.

* `forwarder.py`: what every request passes (checks, the upstream exchange, the relay of its
  answer, rejections and upstream failures answered in one place);
* `streamable.py`: Streamable HTTP (2025-03-26 and later);
* `legacy.py`: HTTP+SSE (2024-11-05);
* `resume.py`: re-creating an upstream session behind the client's id (SPEC 2.7);
* `routing.py`: paths the exact routes missed, sent to the transport whose rules apply;
* `rejections.py`: the sidecar's own answers;
* `lane.py`, `fast.py`, `fast_http.py`: a live session's POST served below aiohttp's server
  and client (the fast path, `server.fast_path`).
"""

from __future__ import annotations

from .fast import FastPath
from .forwarder import Forwarder, ProxyOptions
from .legacy import LegacySse
from .resume import Resumer
from .routing import Router
from .streamable import StreamableHttp

__all__ = [
    "FastPath",
    "Forwarder",
    "LegacySse",
    "ProxyOptions",
    "Resumer",
    "Router",
    "StreamableHttp",
]
