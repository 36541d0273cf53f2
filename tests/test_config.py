"""Tests for sidecar.config: layering, validation messages, durations, rendering."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from sidecar import config
from sidecar.config import (
    Settings,
    format_duration,
    load_settings,
    parse_duration,
    parse_host_port,
    render_toml,
)
from sidecar.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "config.example.toml"


def load_text(tmp_path: Path, text: str, **kwargs: Any) -> Settings:
    """Load `text` as the config file, with an empty environment unless one is given."""
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    kwargs.setdefault("environ", {})
    return load_settings(path, **kwargs)


def problems_of(tmp_path: Path, text: str, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, **kwargs)
    return caught.value.problems


# --- defaults and the example file ----------------------------------------------------------


def test_defaults_are_the_ones_the_spec_names() -> None:
    s = load_settings(environ={})
    assert s.server.listen == "127.0.0.1:8080"
    assert s.server.max_body_bytes == 4 * 1024 * 1024
    assert s.server.drain_timeout == 10
    assert s.upstream.url == "http://127.0.0.1:8000/mcp"
    assert s.upstream.path == "/mcp"
    assert (s.upstream.connect_timeout, s.upstream.read_timeout) == (5, 300)
    assert s.sessions.idle_timeout == 1800
    assert s.sessions.sweep_interval is None
    assert (s.sessions.max_lifetime, s.sessions.tombstone_ttl) == (0, 7 * 86400)
    assert (s.sessions.on_limit, s.sessions.unknown, s.sessions.bind_to) == (
        "reject",
        "reject",
        "identity",
    )
    assert s.store.path == "/var/lib/mcp-sidecar/sessions.db"
    assert s.store.flush_interval == 1
    assert (s.admin.listen, s.admin.token) == ("127.0.0.1:9091", "")
    assert (s.log.level, s.log.format) == ("info", "text")


def test_example_file_loads_to_exactly_the_defaults() -> None:
    assert load_settings(EXAMPLE, environ={}) == load_settings(environ={})


def test_example_file_has_every_key_in_model_order() -> None:
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert list(example) == list(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        assert list(example[name]) == list(model.model_fields), name


def test_example_comments_repeat_each_description() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    section = ""
    for number, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if not line or line.startswith("#"):
            continue
        key = line.split("=", 1)[0].strip()
        comment: list[str] = []
        for above in reversed(lines[:number]):
            if not above.startswith("#"):
                break
            comment.insert(0, above.removeprefix("#").strip())
        field = Settings.model_fields[section].annotation.model_fields[key]  # type: ignore[union-attr]
        assert " ".join(comment) == field.description, f"{section}.{key}"


def test_every_field_has_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
        for key, sub in field.annotation.model_fields.items():  # type: ignore[union-attr]
            assert sub.description, f"{name}.{key}"


# --- invalid values: one line each, naming the key --------------------------------------------

INVALID = [
    (
        '[sessions]\nidle_timeout = "5 minutes"',
        "sessions.idle_timeout",
        "'5 minutes' is not allowed; expected a duration like 90, \"90s\"",
    ),
    ('[sessions]\nidle_timeout = "-5s"', "sessions.idle_timeout", "expected a duration like"),
    ("[sessions]\nidle_timeout = 0", "sessions.idle_timeout", "expected a duration greater than 0"),
    ("[sessions]\ntombstone_ttl = -1", "sessions.tombstone_ttl", "not negative"),
    ('[sessions]\nsweep_interval = "0s"', "sessions.sweep_interval", "greater than 0"),
    ("[upstream]\nread_timeout = true", "upstream.read_timeout", "expected a duration"),
    (
        "[sessions]\nmax_sessions = -1",
        "sessions.max_sessions",
        "-1 is not allowed; expected a whole number of 0 or more",
    ),
    (
        "[sessions]\nmax_sessions_per_client = 1.5",
        "sessions.max_sessions_per_client",
        "expected a whole number",
    ),
    (
        "[server]\nmax_body_bytes = [1]",
        "server.max_body_bytes",
        "[1] is not allowed; expected a whole number",
    ),
    ("[server]\nmax_body_bytes = 0", "server.max_body_bytes", "greater than 0"),
    (
        '[sessions]\non_limit = "drop"',
        "sessions.on_limit",
        "'drop' is not allowed; expected one of 'reject', 'evict_idle'",
    ),
    ('[sessions]\nunknown = "allow"', "sessions.unknown", "expected one of 'reject', 'forward'"),
    ('[sessions]\nbind_to = "ip"', "sessions.bind_to", "expected one of 'identity', 'none'"),
    ('[sessions]\npersistent = "maybe"', "sessions.persistent", "expected true or false"),
    ('[sessions]\nignore_methods = "ping"', "sessions.ignore_methods", "expected a list"),
    ('[log]\nlevel = "loud"', "log.level", "expected one of 'debug', 'info', 'warning', 'error'"),
    ('[log]\nformat = "xml"', "log.format", "expected one of 'text', 'json'"),
    (
        '[upstream]\nurl = "ftp://example.com/mcp"',
        "upstream.url",
        "expected an http:// or https:// URL",
    ),
    ('[upstream]\nurl = "http:///mcp"', "upstream.url", "with a host"),
    (
        '[upstream]\nurl = "http://a:1/mcp"\nurls = ["http://b:1/mcp"]\nheaders = {X-Key = "s"}',
        "upstream",
        "upstream.url and upstream.urls are both set; keep urls alone",
    ),
    (
        '[upstream]\nurls = ["http://a:1/mcp", "http://A:1/other"]',
        "upstream.urls",
        "'http://A:1/other' is listed twice",
    ),
    (
        '[upstream]\nurls = ["http://a:1/mcp", "http://b:1/v2/mcp"]',
        "upstream.urls",
        "replicas must serve the same path, found /mcp, /v2/mcp",
    ),
    ('[upstream]\nurls = ["http://a:1/mcp", "b:1"]', "upstream.urls[1]", "http://"),
    ("[upstream]\nhealth_interval = 0", "upstream.health_interval", "greater than 0"),
    ('[upstream]\nsse_path = "sse"', "upstream.sse_path", 'starting with "/"'),
    (
        '[upstream]\nsession_gone = ["gone", "("]',
        "upstream.session_gone[1]",
        "expected a Python regular expression",
    ),
    ('[upstream]\nheaders = { "Bad Name" = "x" }', "upstream.headers", "header names"),
    ('[server]\nlisten = "localhost"', "server.listen", 'expected "host:port"'),
    ('[server]\nlisten = "127.0.0.1:70000"', "server.listen", "port from 0 to 65535"),
    ('[admin]\nlisten = "::1:9091"', "admin.listen", "IPv6 address in brackets"),
    (
        '[server]\nallowed_origins = ["https://app.example.com/"]',
        "server.allowed_origins[0]",
        "no path",
    ),
    ('[admin]\nlisten = "0.0.0.0:9091"', "admin.token", "expected a token"),
    ('[store]\npath = ""', "store.path", "non-empty"),
    ('[store]\nbackend = "postgres"', "store.backend", "expected one of 'sqlite', 'redis'"),
    ('[store]\nbackend = "redis"', "store.url", 'because backend is "redis"'),
    ('[store]\nurl = "http://127.0.0.1:6379"', "store.url", "redis:// or rediss://"),
    ('[store]\nurl = "redis:///0"', "store.url", "with a host"),
    ('[store]\nurl = "redis://127.0.0.1:6379/db"', "store.url", "database number"),
    ('[store]\nkey_prefix = ""', "store.key_prefix", "non-empty"),
    (
        "[sessions]\nidel_timeout = 5",
        "sessions.idel_timeout",
        "unknown key; did you mean 'idle_timeout'? allowed keys: idle_timeout,",
    ),
    ("[sesions]\nidle_timeout = 5", "sesions", "unknown section; did you mean 'sessions'?"),
    ("server = 5", "server", "5 is not allowed; expected a table"),
    ("_cli_parse_args = true", "_cli_parse_args", "unknown section"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), INVALID)
def test_invalid_value_is_reported_on_one_line_naming_the_key(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    [problem] = problems_of(tmp_path, text)
    assert problem.startswith(f"{key}: ")
    assert fragment in problem


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """
[server]
listen = "nowhere"
[sessions]
idle_timeout = "soon"
on_limit = "drop"
[log]
level = 3
"""
    problems = problems_of(tmp_path, text)
    assert [p.split(":", 1)[0] for p in problems] == [
        "server.listen",
        "sessions.idle_timeout",
        "sessions.on_limit",
        "log.level",
    ]


def test_config_error_message_has_one_indented_line_per_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, '[sessions]\non_limit = "drop"\nunknown = "x"')
    assert str(caught.value).splitlines() == [
        "invalid configuration:",
        "  sessions.on_limit: 'drop' is not allowed; expected one of 'reject', 'evict_idle'",
        "  sessions.unknown: 'x' is not allowed; expected one of 'reject', 'forward'",
    ]


def test_admin_token_allows_a_non_loopback_admin_listener(tmp_path: Path) -> None:
    s = load_text(tmp_path, '[admin]\nlisten = "0.0.0.0:9091"\ntoken = "t"')
    assert s.admin.listen == "0.0.0.0:9091"


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    assert load_text(tmp_path, '[log]\nlevel = "DEBUG"').log.level == "debug"


# --- files ----------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing, environ={})
    [problem] = caught.value.problems
    assert problem.startswith(f"{missing}: no such file")


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, '[server]\nlisten = "127.0.0.1:8080"\nmax_body_bytes 5\n')
    assert "not valid TOML" in problem
    assert "line 3" in problem


def test_default_config_path_prefers_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc-config.toml"
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", etc)
    assert config.default_config_path({}) is None
    etc.write_text("", encoding="utf-8")
    assert config.default_config_path({}) == etc
    assert config.default_config_path({"MCP_SIDECAR_CONFIG": "/x/c.toml"}) == Path("/x/c.toml")


# --- layering: file < environment < overrides -------------------------------------------------


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    env = {"MCP_SIDECAR_SESSIONS__IDLE_TIMEOUT": "60", "MCP_SIDECAR_CONFIG": "/ignored.toml"}
    s = load_text(tmp_path, '[sessions]\nidle_timeout = "10m"\nmax_sessions = 7', environ=env)
    assert s.sessions.idle_timeout == 60
    assert s.sessions.max_sessions == 7  # the rest of the section still comes from the file


def test_environment_names_are_case_insensitive_and_lists_are_json(tmp_path: Path) -> None:
    env = {
        "mcp_sidecar_log__level": "WARNING",
        "MCP_SIDECAR_SESSIONS__IGNORE_METHODS": '["ping"]',
        "MCP_SIDECAR_UPSTREAM__HEADERS": '{"X-Tenant": "a"}',
        "MCP_SIDECAR_SESSIONS__SWEEP_INTERVAL": "",
    }
    s = load_text(tmp_path, '[sessions]\nsweep_interval = "5s"', environ=env)
    assert s.log.level == "warning"
    assert s.sessions.ignore_methods == ["ping"]
    assert s.upstream.headers == {"X-Tenant": "a"}
    assert s.sessions.sweep_interval is None


def test_bad_environment_value_names_the_key_and_the_variable(tmp_path: Path) -> None:
    env = {
        "MCP_SIDECAR_SESSIONS__IDLE_TIMEOUT": "soon",
        "MCP_SIDECAR_SERVER__ALLOWED_ORIGINS": "https://a.example",
        "MCP_SIDECAR_SESSIONS__IDEL_TIMEOUT": "5",
    }
    problems = problems_of(tmp_path, "", environ=env)
    assert sorted(problems) == [
        "server.allowed_origins: 'https://a.example' is not allowed; expected JSON, "
        'e.g. ["a", "b"] (from MCP_SIDECAR_SERVER__ALLOWED_ORIGINS)',
        "sessions.idel_timeout: unknown key; did you mean 'idle_timeout'? allowed keys: "
        + ", ".join(config.SessionSettings.model_fields)
        + " (from MCP_SIDECAR_SESSIONS__IDEL_TIMEOUT)",
        "sessions.idle_timeout: 'soon' is not allowed; expected a duration like 90, "
        '"90s", "500ms", "30m", "2h", "7d" (from MCP_SIDECAR_SESSIONS__IDLE_TIMEOUT)',
    ]


def test_overrides_win_over_environment_and_file(tmp_path: Path) -> None:
    env = {"MCP_SIDECAR_UPSTREAM__URL": "http://env:1/mcp"}
    overrides = {"upstream": {"url": "http://flag:2/mcp"}, "server": {"listen": None}}
    s = load_text(
        tmp_path,
        '[upstream]\nurl = "http://file:3/mcp"\n[server]\nlisten = "127.0.0.1:1"',
        environ=env,
        overrides=overrides,
    )
    assert s.upstream.url == "http://flag:2/mcp"
    assert s.server.listen == "127.0.0.1:1"  # None in overrides: the flag was not given


def test_bad_override_says_it_came_from_the_command_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(overrides={"server": {"listen": "x"}}, environ={})
    [problem] = caught.value.problems
    assert problem.startswith("server.listen: 'x' is not allowed;")
    assert problem.endswith("(from the command line)")


def test_explicit_environ_replaces_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MCP_SIDECAR_SESSIONS__IDLE_TIMEOUT", "60")
    assert load_settings(environ={}).sessions.idle_timeout == 1800
    assert load_settings().sessions.idle_timeout == 60


def test_settings_alone_read_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SIDECAR_SESSIONS__IDLE_TIMEOUT", "90s")
    monkeypatch.setenv("MCP_SIDECAR_CONFIG", "/not/a/setting.toml")
    assert Settings().sessions.idle_timeout == 90


# --- durations and addresses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("100ms", 0.1),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("0", 0.0),
        (" 30 m ", 1800.0),
    ],
)
def test_duration_forms(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "", "-1", -1, "1w", "m", True, float("inf"), [1]])
def test_bad_durations_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration like"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0"),
        (90, "90s"),
        (1800, "30m"),
        (5400, "90m"),
        (7200, "2h"),
        (604800, "7d"),
        (0.5, "500ms"),
        (1.5, "1.5s"),
    ],
)
def test_format_duration_is_exact_and_short(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "idle", "effective"),
    [('""', 1800, 600.0), ('""', 2, 1.0), ('"5s"', 1800, 5.0), ('"250ms"', 2, 0.25)],
)
def test_sweep_interval_defaults_to_a_third_of_idle_timeout_at_least_1s(
    tmp_path: Path, text: str, idle: float, effective: float
) -> None:
    s = load_text(tmp_path, f"[sessions]\nidle_timeout = {idle}\nsweep_interval = {text}")
    assert s.sessions.effective_sweep_interval == effective


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_host_port(value: str, parsed: tuple[str, int]) -> None:
    assert parse_host_port(value) == parsed


@pytest.mark.parametrize("value", ["8080", ":8080", "host:", "host:http", "::1:80", "[nope]:80"])
def test_parse_host_port_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_host_port(value)


# --- what the sidecar prints ----------------------------------------------------------------


def test_summary_line_with_defaults() -> None:
    assert load_settings(environ={}).summary_line() == (
        "session lifecycle: idle_timeout=1800s sweep_interval=600s max_lifetime=off "
        "persistent=false idle_action=close recover_lost=false "
        "store=/var/lib/mcp-sidecar/sessions.db"
    )


def test_summary_line_with_a_lifetime(tmp_path: Path) -> None:
    s = load_text(
        tmp_path,
        '[sessions]\nidle_timeout = "90s"\nmax_lifetime = "1h"\npersistent = true\n'
        '[store]\npath = "/tmp/s.db"',
    )
    assert s.summary_line() == (
        "session lifecycle: idle_timeout=90s sweep_interval=30s max_lifetime=3600s "
        "persistent=true idle_action=close recover_lost=false store=/tmp/s.db"
    )


def test_rendered_toml_loads_back_to_equal_settings(tmp_path: Path) -> None:
    original = load_settings(
        environ={},
        overrides={
            "server": {"allowed_origins": ["https://App.example.com"], "drain_timeout": 2.5},
            "upstream": {
                "url": "https://mcp.internal:8443/v1/mcp",
                "headers": {"X-Tenant": 'quo"te\\back'},
                "session_gone": [r"^404 .*session", "ünï\tcode"],
            },
            "sessions": {"idle_timeout": "45s", "sweep_interval": "100ms", "persistent": True},
            "admin": {"listen": "[::1]:9999"},
            "log": {"level": "debug", "format": "json"},
        },
    )
    rendered = original.to_toml()
    assert 'idle_timeout = "45s"' in rendered
    assert 'sweep_interval = "100ms"' in rendered
    assert load_text(tmp_path, rendered) == original
    commented = render_toml(original, comments=True)
    assert load_text(tmp_path, commented) == original


def test_replicas_replace_url_and_render_back_without_it(tmp_path: Path) -> None:
    urls = ["http://10.0.0.1:8000/mcp", "http://10.0.0.2:8000/mcp"]
    text = f'[upstream]\nurls = ["{urls[0]}", "{urls[1]}"]\ndown_grace = "1m"'
    settings = load_text(tmp_path, text)
    assert settings.upstream.replicas == urls
    assert (settings.upstream.path, settings.upstream.down_grace) == ("/mcp", 60)
    rendered = settings.to_toml()
    assert "url" not in tomllib.loads(rendered)["upstream"]
    assert load_text(tmp_path, rendered) == settings
    assert load_settings(environ={}).upstream.replicas == ["http://127.0.0.1:8000/mcp"]


def test_the_upstream_flag_replaces_the_replicas_of_the_file(tmp_path: Path) -> None:
    flag = {"upstream": {"url": "http://127.0.0.1:9/mcp", "urls": []}}
    text = '[upstream]\nurls = ["http://10.0.0.1:8000/mcp", "http://10.0.0.2:8000/mcp"]'
    settings = load_text(tmp_path, text, overrides=flag)
    assert settings.upstream.replicas == ["http://127.0.0.1:9/mcp"]


def test_rendering_never_shows_credentials() -> None:
    s = load_settings(
        environ={
            "MCP_SIDECAR_ADMIN__TOKEN": "s3cret-token",
            "MCP_SIDECAR_UPSTREAM__HEADERS": '{"Authorization": "Bearer s3cret", "X-Tenant": "a"}',
        }
    )
    rendered = s.to_toml()
    assert "s3cret" not in rendered
    assert 'token = "***"' in rendered
    assert '"Authorization" = "***"' in rendered
    assert '"X-Tenant" = "a"' in rendered
    assert "s3cret" not in repr(s)


def test_redis_store_settings_and_the_password_masked(tmp_path: Path) -> None:
    s = load_text(
        tmp_path,
        '[store]\nbackend = "redis"\nurl = "rediss://app:pa55word@redis.internal:6380/2"\n'
        'key_prefix = "team-a:"',
    )
    assert (s.store.backend, s.store.key_prefix) == ("redis", "team-a:")
    assert s.store.url == "rediss://app:pa55word@redis.internal:6380/2"
    rendered = s.to_toml()
    assert "pa55word" not in rendered
    assert 'url = "rediss://app:***@redis.internal:6380/2"' in rendered
    assert "pa55word" not in repr(s)
    assert s.summary_line().endswith("store=rediss://app:***@redis.internal:6380/2 prefix=team-a:")
