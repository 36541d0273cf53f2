"""mcp-sidecar: session lifecycle enforcement for unmodified MCP servers.

The sidecar is a reverse proxy in front of an MCP server (Streamable HTTP, and the legacy
HTTP+SSE transport): it tracks every session, expires idle ones (404 to the client, DELETE
upstream) and keeps its state in SQLite. See README.md and SPEC for the contract.
"""

__version__ = "0.1.0"
