"""`python -m sidecar`: the same command line as `mcp-sidecar`."""

from .cli import run

run()
