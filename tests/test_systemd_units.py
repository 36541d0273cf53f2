"""The systemd units under systemd/: systemd's own verifier, and the settings SPEC 3.4 names."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
PLAIN = "mcp-sidecar.service"
TEMPLATE = "mcp-sidecar@.service"
BINARY = "/usr/local/bin/mcp-sidecar"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value assigned, in order (systemd allows repeated keys).

    configparser cannot be used as is: it rejects repeated keys (or keeps only the last
    one) and knows nothing of backslash continuation lines.
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical = re.sub(r"\\\n", " ", text)
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=value line: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def load(name: str) -> Unit:
    return parse_unit((UNIT_DIR / name).read_text())


def single(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"{key}= missing from [{section}]"
    assert len(values) == 1, f"{key}= set {len(values)} times in [{section}]"
    return values[0]


@pytest.mark.parametrize(
    ("name", "config", "state_dir"),
    [
        (PLAIN, "/etc/mcp-sidecar/config.toml", "mcp-sidecar"),
        (TEMPLATE, "/etc/mcp-sidecar/%i.toml", "mcp-sidecar/%i"),
    ],
)
def test_unit_declares_the_service_contract(name: str, config: str, state_dir: str) -> None:
    unit = load(name)

    assert single(unit, "Service", "Type") == "notify"
    assert single(unit, "Service", "NotifyAccess") == "main"
    assert single(unit, "Service", "ExecStart") == f"{BINARY} serve --config {config}"
    assert single(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert single(unit, "Service", "KillSignal") == "SIGTERM"
    assert single(unit, "Service", "Restart") == "on-failure"
    assert single(unit, "Service", "WatchdogSec")
    assert single(unit, "Service", "StateDirectory") == state_dir
    assert single(unit, "Service", "StateDirectoryMode") == "0750"
    # The store must live inside the state directory: the only writable path under
    # ProtectSystem=strict, and the one systemd hands to the dynamic user.
    assert unit["Service"]["Environment"] == [
        f"MCP_SIDECAR_STORE__PATH=/var/lib/{state_dir}/sessions.db"
    ]
    assert single(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("name", [PLAIN, TEMPLATE])
def test_unit_is_sandboxed(name: str) -> None:
    service = load(name)["Service"]

    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "UMask": "0077",
    }
    assert {key: service.get(key) for key in expected} == {
        key: [value] for key, value in expected.items()
    }


def test_template_differs_from_plain_unit_only_per_instance() -> None:
    # Guards against the two files drifting apart: a hardening line added to one only.
    per_instance = {
        ("Unit", "Description"),
        ("Service", "ExecStart"),
        ("Service", "StateDirectory"),
        ("Service", "Environment"),
        ("Service", "EnvironmentFile"),
        ("Service", "User"),
    }
    plain, template = load(PLAIN), load(TEMPLATE)

    def shared(unit: Unit) -> dict[tuple[str, str], list[str]]:
        return {
            (section, key): values
            for section, keys in unit.items()
            for key, values in keys.items()
            if (section, key) not in per_instance
        }

    assert shared(template) == shared(plain)
    assert all("%i" in v for (s, k) in per_instance if k in template[s] for v in template[s][k])


@pytest.mark.parametrize(
    ("name", "verify_as"),
    [(PLAIN, PLAIN), (TEMPLATE, "mcp-sidecar@demo.service")],
)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, name: str, verify_as: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found: install Debian's `systemd` package")

    # `verify` fails when ExecStart= names a missing binary, and mcp-sidecar is not
    # installed in /usr/local/bin on a build machine. Point ExecStart= at an executable
    # that exists (this interpreter) and verify everything else unchanged.
    text = (UNIT_DIR / name).read_text()
    assert text.count(f"ExecStart={BINARY} ") == 1
    text = text.replace(f"ExecStart={BINARY} ", f'ExecStart="{sys.executable}" ')
    (tmp_path / name).write_text(text)

    # For the template, name an instance: systemd finds mcp-sidecar@.service next to it
    # and expands %i, which is how it will be loaded on a host.
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / verify_as)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    output = (result.stdout + result.stderr).splitlines()
    about_us = [line for line in output if "mcp-sidecar" in line or str(tmp_path) in line]
    assert result.returncode == 0, "\n".join(output)
    assert about_us == [], "\n".join(output)
