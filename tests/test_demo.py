"""`mcp-sidecar demo`, the Quickstart's first command, run as a newcomer runs it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys


def test_demo_shows_expiry_and_hibernation_with_the_servers_own_counts() -> None:
    command = shutil.which("mcp-sidecar")
    args = [command, "demo"] if command else [sys.executable, "-m", "sidecar", "demo"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    out = done.stdout
    assert done.returncode == 0, (out, done.stderr)
    # Expiry: the server's own session count drops to 0, the client gets the 404.
    assert re.search(r"^6\. .*the server now holds 0 session\(s\)$", out, re.M), out
    assert re.search(r"^7\. .*HTTP 404", out, re.M), out
    # Hibernation: freed on the server, then resumed behind the same id.
    assert re.search(r"^11\. .*the server holds 1 session\(s\)$", out, re.M), out
    assert re.search(r"^13\. .*the server holds 0 session\(s\)", out, re.M), out
    assert re.search(
        r"^14\. .*STILL THERE\?!; its session id is unchanged; the server holds 1 session",
        out,
        re.M,
    ), out
    assert "Traceback" not in done.stderr, done.stderr
