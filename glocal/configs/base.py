"""Config machinery shared by the model configs and the training config.

``Config`` is a frozen dataclass base with ``key=value`` overrides and type coercion, a
suggestion for misspelt keys, JSON round-trips, and a ``validate()`` hook whose errors say
what is wrong and how to fix it. A model family's config derives from ``ModelConfig``
(the registry maps config classes to models); ``glocal.train.config.TrainConfig`` derives
from ``Config`` directly, so a training config is never mistaken for a model config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from glocal.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message says which and how to fix it."""


def did_you_mean(key: str, names) -> str:
    """`` Did you mean a, b?`` with the names closest to a misspelt ``key`` ('' if none is close)."""
    close = difflib.get_close_matches(key, list(names), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a command-line string (or a JSON value) into the field's declared type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except (ConfigError, ValueError, TypeError) as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r} does not fit {annotation}: {'; '.join(errors)}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer, got {value!r}.") from None
        if f != int(f):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        return int(f)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}.") from None
    if annotation is str:
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        return tuple(_coerce(v, args[0], key) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every glocal config. Subclasses add fields and extend ``validate``."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:  # overridden by each config class
        pass

    def require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}.")

    def require_multiple(self, name: str, of: str) -> None:
        """``name`` must be a multiple of field ``of``; the error names the two nearest values."""
        value, unit = getattr(self, name), getattr(self, of)
        if value % unit:
            lo = value // unit * unit
            raise ConfigError(f"{name}={value} is not a multiple of {of}={unit}; "
                              f"use {name}={lo or unit} or {lo + unit}.")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def other_keys(self) -> list[str]:
        """Keys beyond the fields that ``replace`` accepts (a model config's kind options)."""
        return []

    def replace(self, **overrides: Any):
        """A copy with ``overrides`` applied; strings are coerced to the field types."""
        hints = typing.get_type_hints(type(self))
        names = self.field_names()
        coerced = {}
        for key, value in overrides.items():
            if key not in names:
                raise ConfigError(f"{type(self).__name__} has no field {key!r}."
                                  f"{did_you_mean(key, names + self.other_keys())} Valid fields: {', '.join(names)}."
                                  + (f" Kind options: {', '.join(self.other_keys())}." if self.other_keys() else ""))
            coerced[key] = _coerce(value, hints[key], key)
        return dataclasses.replace(self, **coerced)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = set(cls.field_names())
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} does not know the keys {unknown}.")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k], k) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """Base of all model configs. Subclasses add fields and extend ``validate``."""


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["d_model=256", "dtype=bfloat16"]`` -> dict; rejects items without ``=``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. d_model=256).")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
