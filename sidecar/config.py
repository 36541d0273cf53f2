"""The sidecar's settings: one model, loaded once from a TOML file, the environment and flags.

`load_settings()` layers the sources, lowest first: built-in defaults, the TOML file,
`MCP_SIDECAR_<SECTION>__<KEY>` environment variables, then the CLI's overrides. It is the one
boundary where pydantic's errors become a `ConfigError`, with one line per bad key in the form
`<section>.<key>: <value> is not allowed; <what is allowed>`, because the reader is an operator
who must fix a file, not a developer reading a traceback. `render_toml()` prints the effective
configuration back (for `check-config`), and `config.example.toml` mirrors every description.

This module holds the models and the loading; three helpers hold the rest:
`config_values` (what one value may look like: durations, addresses, URLs),
`config_problems` (source layering and the operator's one-line problems) and
`config_render` (the TOML written back, secrets masked). Import from here, not from them.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any
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
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sidecar.config_problems import _Layers
from sidecar.config_render import mask_url_password, render_toml
from sidecar.config_values import (
    BindTo,
    Duration,
    IdleAction,
    ListenAddress,
    LogFormat,
    LogLevel,
    OnLimit,
    OptionalDuration,
    StoreBackend,
    UnknownSessions,
    UrlPath,
    _check_headers,
    _check_http_url,
    _check_origin,
    _check_redis_url,
    _check_regex,
    _is_loopback,
    _lower,
    format_duration,
    parse_duration,
    parse_host_port,
)
from sidecar.errors import ConfigError

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "ENV_NESTED_DELIMITER",
    "ENV_PREFIX",
    "AdminSettings",
    "BindTo",
    "Duration",
    "ListenAddress",
    "LogFormat",
    "LogLevel",
    "LogSettings",
    "OnLimit",
    "OptionalDuration",
    "ServerSettings",
    "SessionSettings",
    "Settings",
    "StoreSettings",
    "UnknownSessions",
    "UpstreamSettings",
    "UrlPath",
    "default_config_path",
    "format_duration",
    "load_settings",
    "parse_duration",
    "parse_host_port",
    "render_toml",
    "resolve_config_path",
]

ENV_PREFIX = "MCP_SIDECAR_"
ENV_NESTED_DELIMITER = "__"
CONFIG_ENV_VAR = "MCP_SIDECAR_CONFIG"
# Read at call time by default_config_path(), so tests can point it elsewhere.
DEFAULT_CONFIG_PATH = Path("/etc/mcp-sidecar/config.toml")

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
    header_timeout: Duration = Field(
        default=10.0,
        ge=0,
        description="A new connection must send a whole request head within this (0 = off).",
    )
    body_timeout: Duration = Field(
        default=30.0,
        ge=0,
        description="A request body must arrive whole within this, else 408 (0 = off).",
    )
    keepalive_timeout: Duration = Field(
        default=75.0,
        ge=0,
        description="An idle keep-alive connection is closed after this.",
    )
    fast_path: bool = Field(
        default=True,
        description="Serve a live session's plain POST below aiohttp's server and client "
        "(same answers, less CPU); a reload applies to connections opened after it.",
    )


class UpstreamSettings(_Section):
    """The unmodified MCP server this sidecar fronts."""

    url: Annotated[str, AfterValidator(_check_http_url)] = Field(
        default="http://127.0.0.1:8000/mcp",
        description="The MCP endpoint of the server; its path is the Streamable HTTP path.",
    )
    urls: list[Annotated[str, AfterValidator(_check_http_url)]] = Field(
        default_factory=list,
        description="Or the MCP endpoints of several replicas of it (same path; replaces url).",
    )
    health_interval: Duration = Field(
        default=5.0, gt=0, description="How often each replica is probed (with several urls)."
    )
    down_grace: Duration = Field(
        default=30.0,
        ge=0,
        description="A replica down this long has its sessions closed (or, with recover_lost, "
        "re-created on another).",
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
    recover_lost: bool = Field(
        default=False,
        description="Re-create a session the upstream lost (404 or session gone) behind the "
        "client's id and send the request again, once.",
    )

    @field_validator("urls")
    @classmethod
    def _one_server(cls, urls: list[str]) -> list[str]:
        return _check_replicas(urls)

    @model_validator(mode="after")
    def _url_or_urls(self) -> UpstreamSettings:
        # Both set is ambiguous: which one did the operator mean to remove?
        if self.urls and "url" in self.model_fields_set:
            raise ValueError(
                "upstream.url and upstream.urls are both set; keep urls alone for replicas "
                "(or url alone for one server)"
            )
        return self

    @property
    def replicas(self) -> list[str]:
        """The upstream endpoints: `urls` when set, else the one `url`."""
        return list(self.urls) or [self.url]

    @property
    def path(self) -> str:
        """The Streamable HTTP path clients use, taken from the upstream URL ("/" when none)."""
        return urlsplit(self.replicas[0]).path or "/"


def _check_replicas(urls: list[str]) -> list[str]:
    """Replicas of one server: each once, all serving the MCP endpoint on the same path
    (clients use one path, whichever replica their session is bound to)."""
    seen: set[tuple[str, str | None, int | None]] = set()
    for url in urls:
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname, parts.port)
        if key in seen:
            raise ValueError(f"{url!r} is listed twice; list each replica once")
        seen.add(key)
    paths = {urlsplit(url).path or "/" for url in urls}
    if len(paths) > 1:
        raise ValueError("replicas must serve the same path, found " + ", ".join(sorted(paths)))
    return urls


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
    idle_action: IdleAction = Field(
        default="close",
        description='What an idle session gets: "close" it, or "hibernate" it (the upstream '
        "session is closed, the client's id kept and resumed on its next request).",
    )
    dormant_ttl: Duration = Field(
        default=604800.0, gt=0, description="How long a hibernated session's id can be resumed."
    )

    @property
    def effective_sweep_interval(self) -> float:
        """`sweep_interval`, or when unset idle_timeout / 3 but at least one second."""
        if self.sweep_interval is None:
            return max(1.0, self.idle_timeout / 3)
        return self.sweep_interval


class StoreSettings(_Section):
    """Where sessions are kept across restarts: an SQLite file, or a Redis sidecars share."""

    backend: StoreBackend = Field(
        default="sqlite",
        description='"sqlite": the embedded database at path; "redis": the Redis at url, which '
        "several sidecars can share.",
    )
    path: str = Field(
        default="/var/lib/mcp-sidecar/sessions.db",
        min_length=1,
        description='The SQLite database file (backend = "sqlite").',
    )
    url: Annotated[str, AfterValidator(_check_redis_url)] = Field(
        default="",
        repr=False,
        validate_default=True,
        description='The Redis (backend = "redis"): "redis://HOST:6379/0", "rediss://" for TLS, '
        'a password as "redis://:PASSWORD@HOST:6379/0" (or keep it out of the file: '
        "MCP_SIDECAR_STORE__URL).",
    )
    key_prefix: str = Field(
        default="mcp-sidecar:",
        min_length=1,
        description="Prefix of every Redis key the store writes: sidecars sharing sessions use "
        "the same one.",
    )
    flush_interval: Duration = Field(
        default=1.0, gt=0, description="How often activity times are written, in one transaction."
    )

    @field_validator("url")
    @classmethod
    def _url_for_redis(cls, url: str, info: ValidationInfo) -> str:
        # Without a URL the Redis backend has nowhere to go; say so at start, not at first use.
        if not url and info.data.get("backend") == "redis":
            raise ValueError('expected a redis:// or rediss:// URL, because backend is "redis"')
        return url


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
            f"persistent={str(s.persistent).lower()} idle_action={s.idle_action} "
            f"recover_lost={str(self.upstream.recover_lost).lower()} store={self._store_where()}"
        )

    def _store_where(self) -> str:
        if self.store.backend == "redis":
            return f"{mask_url_password(self.store.url)} prefix={self.store.key_prefix}"
        return self.store.path


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
    layers = _Layers(Settings, env_prefix=ENV_PREFIX, env_delimiter=ENV_NESTED_DELIMITER)
    if path is not None:
        layers.add_tree(_read_toml(Path(path)), source="")
    layers.add_environment(os.environ if environ is None else environ)
    if overrides:
        layers.add_tree(overrides, source=" (from the command line)")
    layers.reject_unknown_sections()
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
