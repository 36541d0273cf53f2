"""The upstream side: one HTTP client per MCP server (`client.py`), and the pool of them that
sessions are bound to (`pool.py`)."""

from __future__ import annotations

from .client import PROTOCOL_HEADER, SESSION_HEADER, Upstream
from .pool import UpstreamPool

__all__ = ["PROTOCOL_HEADER", "SESSION_HEADER", "Upstream", "UpstreamPool"]
