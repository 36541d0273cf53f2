"""The sidecar's settings: one model, loaded once from a TOML file, the environment and flags.

`load_settings()` layers the sources, lowest first: built-in defaults, the TOML file,
`MCP_SIDECAR_<SECTION>__<KEY>` environment variables, then the CLI's overrides. It is the one
boundary where pydantic's errors become a `ConfigError`, with one line per bad key in the form
`<section>.<key>: <value> is not allowed; <what is allowed>`, because the reader is an operator
who must fix a file, not a developer reading a traceback. `render_toml()` prints the effective
configuration back (for `check-config`), and `config.example.toml` mirrors every description.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import textwrap
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sidecar.errors import ConfigError

ENV_PREFIX = "MCP_SIDECAR_"
ENV_NESTED_DELIMITER = "__"
CONFIG_ENV_VAR = "MCP_SIDECAR_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/mcp-sidecar/config.toml")

OnLimit = Literal["reject", "evict_idle"]
UnknownSessions = Literal["reject", "forward"]
BindTo = Literal["identity", "none"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]

# --- value types ----------------------------------------------------------------------------

_DURATION_FORMS = 'expected a duration like 90, "90s", "500ms", "30m", "2h", "7d"'
# The exponent is undocumented; it lets format_duration() write back any float it is given.
_DURATION_RE = re.compile(r"((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(ms|s|m|h|d)?")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "90", "1.5s", "500ms", "30m", "2h", "7d"."""
    # bool is an int to Python, but `idle_timeout = true` is a mistake, not one second.
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip().lower())):
        number, unit = match.groups()
        # Divide for ms rather than multiply by 0.001, so "100ms" is exactly 0.1.
        seconds = (
            float(number) / 1000 if unit == "ms" else float(number) * _UNIT_SECONDS[unit or "s"]
        )
    else:
        raise ValueError(_DURATION_FORMS)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(_DURATION_FORMS + " (finite, not negative)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest string `parse_duration` reads back as exactly `seconds`: "30m", "90s"."""
    if seconds == 0:
        return "0"
    if float(seconds).is_integer():
        unit = next(u for u, size in _UNIT_SECONDS.items() if seconds % size == 0)
        return f"{int(seconds) // _UNIT_SECONDS[unit]}{unit}"
    millis = f"{round(seconds * 1000)}ms"
    return millis if seconds < 1 and parse_duration(millis) == seconds else f"{seconds!r}s"


def _optional_duration(value: object) -> float | None:
    # The spec writes "unset" as an empty string, since TOML has no null.
    return None if value is None or value == "" else parse_duration(value)


def parse_host_port(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:8080") into host and port; ValueError says the fix."""
    host, colon, port = value.rpartition(":")
    if not colon or not host or any(c.isspace() or c == "/" for c in host):
        raise ValueError('expected "host:port", e.g. "127.0.0.1:8080" or "[::1]:8080"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv6 address in the brackets, not {host!r}") from None
    elif ":" in host:
        raise ValueError('expected an IPv6 address in brackets, e.g. "[::1]:8080"')
    # Port 0 asks the OS for a free port, which tests rely on.
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError("expected a port from 0 to 65535 after the colon")
    return host, int(port)


def _check_listen(value: str) -> str:
    parse_host_port(value)
    return value


def _check_http_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is out of range
    except ValueError as exc:
        raise ValueError(f"expected an http:// or https:// URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            'expected an http:// or https:// URL with a host, e.g. "http://127.0.0.1:8000/mcp"'
        )
    return value


def _check_origin(value: str) -> str:
    parts = urlsplit(value)
    if not parts.scheme or not parts.hostname or parts.path or parts.query or parts.fragment:
        raise ValueError(
            'expected an origin: scheme and host, no path, e.g. "https://app.example.com"'
        )
    # Browsers send the scheme and host in lower case; a capital letter would never match.
    return value.lower()


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError('expected a path starting with "/"')
    return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"expected a Python regular expression ({exc})") from None
    return value


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_headers(value: dict[str, str]) -> dict[str, str]:
    for name, text in value.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"expected HTTP header names; {name!r} is not one")
        if "\r" in text or "\n" in text:
            raise ValueError(f"expected header values on one line; {name!r} has a line break")
    return value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Duration = Annotated[float, BeforeValidator(parse_duration)]
OptionalDuration = Annotated[float | None, BeforeValidator(_optional_duration)]
ListenAddress = Annotated[str, AfterValidator(_check_listen)]
UrlPath = Annotated[str, AfterValidator(_check_path)]

# --- the settings model ---------------------------------------------------------------------


class _Section(BaseModel):
    # A misspelt key must fail loudly: silently ignoring `idel_timeout` keeps the default.
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    """Where clients connect, and what the sidecar accepts from them."""

    listen: ListenAddress = Field(
        default="127.0.0.1:8080",
        description='Address clients connect to, "host:port" ("[::1]:8080").',
    )
    allowed_origins: list[Annotated[str, AfterValidator(_check_origin)]] = Field(
        default_factory=list,
        description="Origins allowed to send requests (others get 403); empty: Origin not checked.",
    )
    max_body_bytes: int = Field(
        default=4194304, gt=0, description="Largest request body accepted; larger ones get 413."
    )
    drain_timeout: Duration = Field(
        default=10.0,
        ge=0,
        description="On SIGTERM, how long to wait for in-flight requests to finish.",
    )


class UpstreamSettings(_Section):
    """The unmodified MCP server this sidecar fronts."""

    url: Annotated[str, AfterValidator(_check_http_url)] = Field(
        default="http://127.0.0.1:8000/mcp",
        description="The MCP endpoint of the server; its path is the Streamable HTTP path.",
    )
    sse_path: UrlPath = Field(
        default="/sse", description="Path of the legacy HTTP+SSE stream, if any."
    )
    messages_path: UrlPath = Field(
        default="/messages/", description="Path the legacy HTTP+SSE transport posts messages to."
    )
    connect_timeout: Duration = Field(
        default=5.0,
        gt=0,
        description="How long to wait for a connection to the upstream (then 502).",
    )
    read_timeout: Duration = Field(
        default=300.0, gt=0, description="How long to wait for the upstream to answer (then 504)."
    )
    headers: Annotated[dict[str, str], AfterValidator(_check_headers)] = Field(
        default_factory=dict,
        repr=False,  # may carry credentials, which never reach a log
        description="Static headers sent with the sidecar's own requests (the closing DELETEs).",
    )
    session_gone: list[Annotated[str, AfterValidator(_check_regex)]] = Field(
        default_factory=list,
        description='Extra regexes on "<status> <body>" that mean "session not found" upstream.',
    )

    @property
    def path(self) -> str:
        """The Streamable HTTP path clients use, taken from `url` ("/" when it has none)."""
        return urlsplit(self.url).path or "/"


class SessionSettings(_Section):
    """The session lifecycle the sidecar enforces."""

    idle_timeout: Duration = Field(
        default=1800.0, gt=0, description="A session with no client activity for this long expires."
    )
    sweep_interval: OptionalDuration = Field(
        default=None,
        gt=0,
        description='How often expired sessions are closed upstream; "" means idle_timeout / 3, '
        "at least 1s.",
    )
    max_lifetime: Duration = Field(
        default=0.0,
        ge=0,
        description='Absolute limit from creation, whatever the activity; "0" is off.',
    )
    persistent: bool = Field(
        default=False, description="Make new sessions persistent: they never expire by time."
    )
    max_sessions: int = Field(
        default=0, ge=0, description="Limit on live sessions; 0 is unlimited."
    )
    max_sessions_per_client: int = Field(
        default=0, ge=0, description="Limit on live sessions per client identity; 0 is unlimited."
    )
    on_limit: OnLimit = Field(
        default="reject",
        description='At a limit: "reject" the initialize with 503, or "evict_idle" the least '
        "recently active session.",
    )
    unknown: UnknownSessions = Field(
        default="reject",
        description='Requests with a session id the sidecar never saw: "reject" with 404, or '
        '"forward" them.',
    )
    bind_to: BindTo = Field(
        default="identity",
        description='"identity": only the client that created a session may use it; "none": no '
        "binding.",
    )
    ignore_methods: list[str] = Field(
        default_factory=list,
        description='JSON-RPC methods that do not count as activity, e.g. ["ping"].',
    )
    open_stream_keeps_alive: bool = Field(
        default=False, description="Count an open GET stream as activity, as some SDKs do."
    )
    tombstone_ttl: Duration = Field(
        default=604800.0, ge=0, description="How long a closed session's id keeps getting 404."
    )

    @property
    def effective_sweep_interval(self) -> float:
        """`sweep_interval`, or when unset idle_timeout / 3 but at least one second."""
        if self.sweep_interval is None:
            return max(1.0, self.idle_timeout / 3)
        return self.sweep_interval


class StoreSettings(_Section):
    """The SQLite database that keeps sessions across restarts."""

    path: str = Field(
        default="/var/lib/mcp-sidecar/sessions.db",
        min_length=1,
        description="The SQLite database file.",
    )
    flush_interval: Duration = Field(
        default=1.0, gt=0, description="How often activity times are written, in one transaction."
    )


class AdminSettings(_Section):
    """The admin HTTP API: health, metrics and session management."""

    listen: ListenAddress = Field(
        default="127.0.0.1:9091",
        description="Address of the admin API; not loopback requires a token.",
    )
    token: str = Field(
        default="",
        repr=False,
        validate_default=True,
        description="Bearer token the admin API requires; empty: none (loopback only).",
    )

    @field_validator("token")
    @classmethod
    def _token_off_loopback(cls, token: str, info: ValidationInfo) -> str:
        # An admin API that can close every session must not be open to the network.
        listen = info.data.get("listen")
        if not token and listen is not None and not _is_loopback(parse_host_port(listen)[0]):
            raise ValueError(f"expected a token, because admin.listen {listen!r} is not loopback")
        return token


class LogSettings(_Section):
    """What the sidecar logs, and how."""

    level: Annotated[LogLevel, BeforeValidator(_lower)] = Field(
        default="info", description="Least severe level logged: debug, info, warning or error."
    )
    format: LogFormat = Field(
        default="text", description='"text" for people, "json" for collectors.'
    )


# load_settings() layers file, environment and flags itself, because it must say which layer a
# bad value came from; while it validates, the only values that count are the ones it passes.
_layered_load: ContextVar[bool] = ContextVar("_layered_load", default=False)


class Settings(BaseSettings):
    """The whole configuration; `Settings()` alone reads defaults and the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, extra="forbid"
    )

    server: ServerSettings = Field(
        default_factory=ServerSettings, description=ServerSettings.__doc__
    )
    upstream: UpstreamSettings = Field(
        default_factory=UpstreamSettings, description=UpstreamSettings.__doc__
    )
    sessions: SessionSettings = Field(
        default_factory=SessionSettings, description=SessionSettings.__doc__
    )
    store: StoreSettings = Field(default_factory=StoreSettings, description=StoreSettings.__doc__)
    admin: AdminSettings = Field(default_factory=AdminSettings, description=AdminSettings.__doc__)
    log: LogSettings = Field(default_factory=LogSettings, description=LogSettings.__doc__)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,) if _layered_load.get() else (init_settings, env_settings)

    def to_toml(self) -> str:
        """The effective configuration as TOML, secrets masked (see `render_toml`)."""
        return render_toml(self)

    def summary_line(self) -> str:
        """The start-up log line that says what the sidecar enforces."""
        s = self.sessions
        lifetime = _seconds(s.max_lifetime) if s.max_lifetime else "off"
        return (
            f"session lifecycle: idle_timeout={_seconds(s.idle_timeout)} "
            f"sweep_interval={_seconds(s.effective_sweep_interval)} max_lifetime={lifetime} "
            f"persistent={str(s.persistent).lower()} store={self.store.path}"
        )


def _seconds(value: float) -> str:
    return f"{int(value)}s" if float(value).is_integer() else f"{value!r}s"


# --- loading --------------------------------------------------------------------------------


def default_config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """`$MCP_SIDECAR_CONFIG`, else /etc/mcp-sidecar/config.toml if it exists, else None."""
    named = (os.environ if environ is None else environ).get(CONFIG_ENV_VAR)
    if named:
        return Path(named)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def resolve_config_path(explicit: str | None) -> str | None:
    """The config a command uses: the flag's path, else `default_config_path()`."""
    if explicit:
        return explicit
    found = default_config_path()
    return str(found) if found else None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the TOML file at `path` (None: no file), then the environment, then
    `overrides` (nested like the file; None values are skipped, so unset CLI flags can be
    passed as they are). Raises ConfigError listing every problem at once.
    """
    layers = _Layers()
    if path is not None:
        layers.add_tree(_read_toml(Path(path)), source="")
    layers.add_environment(os.environ if environ is None else environ)
    if overrides:
        layers.add_tree(overrides, source=" (from the command line)")
    for name in [name for name in layers.data if name not in Settings.model_fields]:
        # Checked here rather than by pydantic: BaseSettings would take a top-level
        # `_secrets_dir` or `_cli_parse_args` in the file as an option for itself.
        layers.problems.append(f"{name}: {_unknown_key((name,))}{layers.sources[(name,)]}")
        del layers.data[name]
    token = _layered_load.set(True)
    try:
        settings = Settings(**layers.data)
    except ValidationError as exc:
        layers.problems += [layers.describe(error) for error in exc.errors()]
    finally:
        _layered_load.reset(token)
    if layers.problems:
        raise ConfigError(layers.problems)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [f"{path}: no such file; check the path (see config.example.toml)"]
        ) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line L, column C)", which is what the operator needs.
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc


class _Layers:
    """The raw values merged so far, and for each key which layer set it last."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.sources: dict[tuple[str, ...], str] = {}
        self.problems: list[str] = []

    def set(self, section: str, key: str | None, value: Any, source: str) -> None:
        if key is None:
            self.data[section] = value
        elif isinstance(table := self.data.setdefault(section, {}), dict):
            table[key] = value
        # else: the section itself is not a table, which validation reports.
        self.sources.setdefault((section,), source)
        self.sources[(section,) if key is None else (section, key)] = source

    def add_tree(self, tree: Mapping[str, Any], source: str) -> None:
        for section, value in tree.items():
            if isinstance(value, Mapping):
                for key, item in value.items():
                    if item is not None:
                        self.set(section, key, item, source)
            elif value is not None:
                self.set(section, None, value, source)

    def add_environment(self, environ: Mapping[str, str]) -> None:
        for name, text in environ.items():
            upper = name.upper()
            if not upper.startswith(ENV_PREFIX) or ENV_NESTED_DELIMITER not in upper:
                continue  # e.g. MCP_SIDECAR_CONFIG, which is not a setting
            section, key = upper[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER, 1)
            source = f" (from {name})"
            try:
                value = _from_env(section, key, text)
            except ValueError as exc:
                self.problems.append(f"{section}.{key}: {text!r} is not allowed; {exc}{source}")
                continue
            self.set(section, key, value, source)

    def describe(self, error: Mapping[str, Any]) -> str:
        """One line for one pydantic error: key path, the value as written, what is allowed."""
        loc: tuple[str | int, ...] = tuple(error["loc"])
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        source = self.sources.get(tuple(map(str, loc[:2])), self.sources.get((str(loc[0]),), ""))
        if error["type"] == "extra_forbidden":
            return f"{where}: {_unknown_key(loc)}{source}"
        value = _lookup(self.data, loc, default=error.get("input"))
        return f"{where}: {value!r} is not allowed; {_expected(error, loc)}{source}"


def _from_env(section: str, key: str, text: str) -> Any:
    # Lists and tables cannot be spelt as one string otherwise; pydantic-settings agrees.
    field = _field_at((section, key))
    if field is None or get_origin(field.annotation) not in (list, dict):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        example = '["a", "b"]' if get_origin(field.annotation) is list else '{"Name": "value"}'
        raise ValueError(f"expected JSON, e.g. {example}") from None


def _lookup(data: Any, loc: tuple[str | int, ...], default: Any) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return default
    return data


def _field_at(loc: tuple[str | int, ...]) -> FieldInfo | None:
    model: Any = Settings
    field = None
    for part in loc[:2]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = field.annotation
    return field


def _unknown_key(loc: tuple[str | int, ...]) -> str:
    if len(loc) == 1:
        allowed, kind = list(Settings.model_fields), "section"
    else:
        parent = _field_at(loc[:1])
        allowed = list(parent.annotation.model_fields) if parent and parent.annotation else []
        kind = "key"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {kind}; {hint}allowed {kind}s: {', '.join(allowed)}"


_TYPE_NAMES = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list, e.g. []",
    "dict": "a table, e.g. {}",
    "model": "a table",
    "model_attributes": "a table",
    "string_too_short": "a non-empty string",
}


def _expected(error: Mapping[str, Any], loc: tuple[str | int, ...]) -> str:
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    field = _field_at(loc) if len(loc) == 2 else None
    if kind == "literal_error" and field is not None:
        return "expected one of " + ", ".join(map(repr, get_args(field.annotation)))
    if "error" in ctx:  # our own validators' ValueErrors already say what is allowed
        return str(ctx["error"])
    if kind in ("greater_than", "greater_than_equal"):
        bound = f"greater than {ctx['gt']:g}" if "gt" in ctx else f"of {ctx['ge']:g} or more"
        return f"expected {_noun(field)} {bound}"
    # int_type, int_parsing, int_from_float, bool_parsing, model_type ...: a wrong type.
    base = kind.removesuffix("_type").removesuffix("_parsing").removesuffix("_from_float")
    if base in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[base]}"
    return str(error["msg"]).lower()


def _noun(field: FieldInfo | None) -> str:
    if field is not None and _is_duration(field):
        return "a duration"
    return "a whole number" if field is not None and field.annotation is int else "a number"


def _is_duration(field: FieldInfo) -> bool:
    return any(
        isinstance(m, BeforeValidator) and m.func in (parse_duration, _optional_duration)
        for m in field.metadata
    )


# --- rendering ------------------------------------------------------------------------------

_MASK = "***"
# Header names that carry credentials; their values are masked like admin.token.
_SECRET_HEADER = re.compile(r"auth|cookie|token|secret|key|password", re.IGNORECASE)


def render_toml(settings: Settings, *, comments: bool = False) -> str:
    """`settings` as a TOML file that loads back to equal settings, except that the admin
    token and credential-bearing upstream headers read "***". With `comments`, each key is
    preceded by its description, as in config.example.toml.
    """
    return "\n".join(_toml_lines(settings, comments)) + "\n"


def _toml_lines(settings: Settings, comments: bool) -> Iterator[str]:
    for name, section_field in type(settings).model_fields.items():
        section: BaseModel = getattr(settings, name)
        yield from _comment(section_field, comments)
        yield f"[{name}]"
        for key, field in type(section).model_fields.items():
            yield from _comment(field, comments)
            yield f"{key} = {_toml_value(_masked(name, key, getattr(section, key)), field)}"
            if comments:
                yield ""
        if not comments and name != "log":
            yield ""


def _comment(field: FieldInfo, comments: bool) -> Iterator[str]:
    if comments and field.description:
        yield from (f"# {line}" for line in textwrap.wrap(field.description, width=96))


def _masked(section: str, key: str, value: Any) -> Any:
    if (section, key) == ("admin", "token") and value:
        return _MASK
    if (section, key) == ("upstream", "headers"):
        return {k: _MASK if _SECRET_HEADER.search(k) else v for k, v in value.items()}
    return value


def _toml_value(value: Any, field: FieldInfo | None = None) -> str:
    if field is not None and _is_duration(field):
        return _toml_string("" if value is None else format_duration(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
