"""What a single config value may look like: durations, addresses, URLs, header tables.

Each check is a plain function that returns the value (perhaps normalised) or raises a
`ValueError` whose text says what is allowed, because `config_problems` quotes that text to
the operator as it is. The `Annotated` types bind those checks to pydantic, so the settings
models in `config.py` only name a type. Nothing here knows about sections or sources.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator
from pydantic.fields import FieldInfo

OnLimit = Literal["reject", "evict_idle"]
UnknownSessions = Literal["reject", "forward"]
BindTo = Literal["identity", "none"]
IdleAction = Literal["close", "hibernate"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
StoreBackend = Literal["sqlite", "redis"]

# --- durations ------------------------------------------------------------------------------

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


def _is_duration(field: FieldInfo) -> bool:
    # Here rather than in config_problems, because rendering needs it too: a duration is
    # written back as "30m", not as the float pydantic holds.
    return any(
        isinstance(m, BeforeValidator) and m.func in (parse_duration, _optional_duration)
        for m in field.metadata
    )


# --- addresses, URLs and other strings ------------------------------------------------------


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


def _check_redis_url(value: str) -> str:
    """Empty (the SQLite store needs none) or a redis:// or rediss:// (TLS) URL with a host."""
    if not value:
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is out of range
    except ValueError as exc:
        raise ValueError(f"expected a redis:// or rediss:// URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(
            "expected a redis:// or rediss:// (TLS) URL with a host, e.g. "
            '"redis://:PASSWORD@127.0.0.1:6379/0"'
        )
    if parts.path not in ("", "/") and not parts.path[1:].isdigit():
        raise ValueError("expected a database number as the URL's path, e.g. /0")
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
