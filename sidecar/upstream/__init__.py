"""The upstream side: one HTTP client per MCP server (`client.py`), the pool of replicas
sessions are bound to (`pool.py`), and their health checks (`health.py`)."""

from __future__ import annotations

from .client import PROTOCOL_HEADER, SESSION_HEADER, Upstream
from .health import HealthChecker
from .pool import Replica, UpstreamPool

__all__ = [
    "PROTOCOL_HEADER",
    "SESSION_HEADER",
    "HealthChecker",
    "Replica",
    "Upstream",
    "UpstreamPool",
]
