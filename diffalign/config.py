"""Typed dataclass configs: loaded from YAML, overridden with ``key=value``, validated.

Every method config (``DDPOConfig``, ``AWMConfig``, ...) subclasses ``BaseConfig``, a plain
dataclass whose fields carry ``metadata={"help": ...}`` as trl's configs do. What this module adds
is strictness where hand-written YAML goes wrong: an unknown or misspelt key is an error that
names the closest valid key and lists all of them; a value of the wrong type is an error that
names the field and the expected type; ``validate()`` checks relations between fields.

Overrides use dotted keys for nested configs (``--set optim.lr=1e-4``); values are read as YAML
(``true``, ``[1, 2]``, ``null``), and numbers written like ``3e-4`` are accepted for float fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from diffalign.files import atomic_write_text

ConfigT = TypeVar("ConfigT", bound="BaseConfig")
_NONE_WORDS = {"none", "null", "~"}


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def unknown_key_error(key: str, valid: Sequence[str], owner: str) -> ConfigError:
    """The error for a key that ``owner`` does not have, with the closest match and all keys."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"Unknown config key {key!r} for {owner}.{hint} Valid keys: {', '.join(sorted(valid))}."
    )


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation`` and convert where the conversion is lossless."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}.")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{key}: expected a mapping for {annotation.__name__}, got {value!r}."
            )
        return _from_mapping(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        return _coerce_sequence(value, annotation, key)
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}.")
        value_type = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, annotation, key)


def _coerce_union(value: Any, args: tuple, key: str) -> Any:
    if type(None) in args and (value is None or str(value).lower() in _NONE_WORDS):
        return None
    errors = []
    for option in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, option, key)
        except ConfigError as error:
            errors.append(str(error))
    names = " or ".join(_type_name(a) for a in args)
    raise ConfigError(f"{key}: {value!r} is not a valid {names}.")


def _coerce_sequence(value: Any, annotation: Any, key: str) -> Any:
    origin, args = typing.get_origin(annotation) or annotation, typing.get_args(annotation)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{key}: expected a list, got {value!r}.")
    item_type = args[0] if args else Any
    items = [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(value: Any, annotation: Any, key: str) -> Any:
    expected = _type_name(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    if annotation in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if annotation is float else int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected {expected}, got {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected {expected}, got {value!r}.")
        if annotation is int and not float(value).is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}.")
        return annotation(value)
    if annotation is str:
        if isinstance(value, (Mapping, list, tuple)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}.")
        return str(value)
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}.")
        return Path(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}.")
    return value


def _from_mapping(cls: type[ConfigT], data: Mapping[str, Any], prefix: str = "") -> ConfigT:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise unknown_key_error(
                f"{prefix}{key}", [f"{prefix}{k}" for k in fields], cls.__name__
            )
    missing = [
        name
        for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{cls.__name__} is missing required keys: {', '.join(missing)}.")
    values = {key: _coerce(value, hints[key], f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"key.sub=value"`` into the dotted key and the YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"Override {text!r} is not of the form key=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if not rest:
        data[head] = value
        return
    child = data.setdefault(head, {})
    if not isinstance(child, dict):
        raise ConfigError(f"Override {key!r}: {head!r} is not a nested config.")
    _set_dotted(child, rest, value)


def _plain(value: Any) -> Any:
    """Convert a config value to YAML-friendly builtins."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


@dataclasses.dataclass
class BaseConfig:
    """Base class of every diffalign config: strict loading, overrides, validation, YAML."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check relations between fields; subclasses raise ``ConfigError`` with the fix."""

    @classmethod
    def from_dict(
        cls: type[ConfigT], data: Mapping[str, Any], overrides: Sequence[str] = ()
    ) -> ConfigT:
        """Build a config from a mapping, then apply ``key=value`` overrides."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"A {cls.__name__} must be a mapping of keys to values, got {data!r}."
            )
        merged = _plain(dict(data))
        for text in overrides:
            _set_dotted(merged, *parse_override(text))
        return _from_mapping(cls, merged)

    @classmethod
    def from_yaml(cls: type[ConfigT], path: str | Path, overrides: Sequence[str] = ()) -> ConfigT:
        """Load a YAML file (an empty file gives the defaults), then apply overrides."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        return cls.from_dict(data, overrides)

    def with_overrides(self: ConfigT, overrides: Sequence[str]) -> ConfigT:
        """A copy of this config with ``key=value`` overrides applied and validated."""
        return type(self).from_dict(self.to_dict(), overrides)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain builtins (nested configs as dicts, tuples as lists)."""
        return _plain(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """The ``help`` text of every field, for ``--help`` listings and docs."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
