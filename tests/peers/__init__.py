"""Real peers the integration tests put around the sidecar: an MCP server and process helpers."""
