"""The operator's one-line problems: which layer set a key, and what was wrong with it.

`_Layers` merges the TOML file, the environment and the CLI's overrides the way
`load_settings()` asks, remembering which layer set each key last. Its `describe()` turns one
pydantic error into `<section>.<key>: <value> is not allowed; <what is allowed> (from X)`.
The settings model is passed in rather than imported, because `config.py` imports this
module; the helpers only need a model's fields to name keys and suggest spellings.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sidecar.config_values import _is_duration


class _Layers:
    """The raw values merged so far, and for each key which layer set it last."""

    def __init__(self, model: type[BaseModel], *, env_prefix: str, env_delimiter: str) -> None:
        self.model = model
        self.env_prefix = env_prefix
        self.env_delimiter = env_delimiter
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
            if not upper.startswith(self.env_prefix) or self.env_delimiter not in upper:
                continue  # e.g. MCP_SIDECAR_CONFIG, which is not a setting
            section, key = upper[len(self.env_prefix) :].lower().split(self.env_delimiter, 1)
            source = f" (from {name})"
            try:
                value = _from_env(self.model, section, key, text)
            except ValueError as exc:
                self.problems.append(f"{section}.{key}: {text!r} is not allowed; {exc}{source}")
                continue
            self.set(section, key, value, source)

    def reject_unknown_sections(self) -> None:
        """Move top-level names the model lacks from `data` to `problems`."""
        for name in [name for name in self.data if name not in self.model.model_fields]:
            # Checked here rather than by pydantic: BaseSettings would take a top-level
            # `_secrets_dir` or `_cli_parse_args` in the file as an option for itself.
            self.problems.append(
                f"{name}: {_unknown_key(self.model, (name,))}{self.sources[(name,)]}"
            )
            del self.data[name]

    def describe(self, error: Mapping[str, Any]) -> str:
        """One line for one pydantic error: key path, the value as written, what is allowed."""
        loc: tuple[str | int, ...] = tuple(error["loc"])
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        source = self.sources.get(tuple(map(str, loc[:2])), self.sources.get((str(loc[0]),), ""))
        if error["type"] == "extra_forbidden":
            return f"{where}: {_unknown_key(self.model, loc)}{source}"
        if len(loc) == 1 and "error" in (error.get("ctx") or {}):
            # A rule across keys of a section: its message names them, and the section's
            # values (headers may hold credentials) are not repeated.
            return f"{where}: {error['ctx']['error']}{source}"
        value = _lookup(self.data, loc, default=error.get("input"))
        return f"{where}: {value!r} is not allowed; {_expected(self.model, error, loc)}{source}"


def _from_env(model: type[BaseModel], section: str, key: str, text: str) -> Any:
    # Lists and tables cannot be spelt as one string otherwise; pydantic-settings agrees.
    field = _field_at(model, (section, key))
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


def _field_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> FieldInfo | None:
    # Only two levels: sections hold keys, and keys hold values, never further models.
    current: Any = model
    field = None
    for part in loc[:2]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
    return field


def _unknown_key(model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    if len(loc) == 1:
        allowed, kind = list(model.model_fields), "section"
    else:
        parent = _field_at(model, loc[:1])
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


def _expected(model: type[BaseModel], error: Mapping[str, Any], loc: tuple[str | int, ...]) -> str:
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    field = _field_at(model, loc) if len(loc) == 2 else None
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
