"""The effective configuration written back as TOML, for `check-config` and the example file.

The output loads back to equal settings, with one deliberate exception: the admin token,
credential-bearing upstream headers and the password in store.url read "***", since this
text ends up in terminals, tickets and logs. Durations are written the way an operator
would ("30m"), not as pydantic's floats.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sidecar.config_values import _is_duration, format_duration

if TYPE_CHECKING:
    # Only for the annotation: config.py imports this module, and reads fields off the instance.
    from sidecar.config import Settings

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
            if (name, key) == ("upstream", "url") and getattr(section, "urls", None):
                # Both keys in one file are refused; the replicas replace the one URL.
                yield "# url: replaced by urls"
                continue
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
    if (section, key) == ("store", "url"):
        return mask_url_password(value)
    if (section, key) == ("upstream", "headers"):
        return {k: _MASK if _SECRET_HEADER.search(k) else v for k, v in value.items()}
    return value


def mask_url_password(url: str) -> str:
    """`url` with its password, if it has one, as "***": "redis://:***@host:6379/0"."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}:{_MASK}@{host}"


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
