"""Per-kind options inside a model config: the ``options`` table of ``DecoderConfig``.

Each mixer or FFN kind registered with a ``KindOptions`` class (``glocal.layers.spec``) gets a
section of the config, set as ``kind.field=value`` (``moe.num_experts=8``,
``linear.feature_dim=16``, ``window.size=64``) and written to JSON as ``{"moe": {...}}``.
Flat keys that configs used before kinds owned their options (``num_experts``,
``sliding_window``, ``moe_impl``, ...) are each the alias of exactly one option, so they are
still accepted on input (command line, presets, old workdirs' ``config.json``) and mean that
option; output always uses the sections.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from glocal.configs.base import ConfigError, _coerce, did_you_mean
from glocal.layers.spec import KINDS, Kind, KindOptions, load_builtin_kinds


class KindSettings(Mapping):
    """An immutable, hashable ``{kind name: KindOptions}`` (a frozen config can hold it)."""

    def __init__(self, items: Mapping[str, KindOptions] | None = None):
        self._items = tuple(sorted((items or {}).items()))

    def __getitem__(self, name: str) -> KindOptions:
        for k, v in self._items:
            if k == name:
                return v
        raise KeyError(name)

    def __iter__(self):
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other) -> bool:
        return isinstance(other, KindSettings) and self._items == other._items

    def __repr__(self) -> str:
        return f"KindSettings({dict(self._items)!r})"

    def __deepcopy__(self, memo):  # dataclasses.asdict deep-copies fields; this one is immutable
        return self

    def set(self, name: str, options: KindOptions) -> "KindSettings":
        return KindSettings({**dict(self._items), name: options})

    def only(self, names) -> "KindSettings":
        return KindSettings({k: v for k, v in self._items if k in names})

    def to_dict(self) -> dict[str, dict]:
        return {k: dataclasses.asdict(v) for k, v in self._items}


def optioned_kinds() -> dict[str, Kind]:
    load_builtin_kinds()
    return {name: k for name, k in KINDS.items() if k.options is not None}


def alias_table() -> dict[str, tuple[str, str]]:
    """``{flat key: (kind, field)}`` over every registered kind."""
    return {flat: (k.name, field) for k in optioned_kinds().values() for flat, field in k.aliases}


def split_keys(overrides: Mapping[str, Any], fields: set[str]) -> tuple[dict, dict[str, dict], set[str]]:
    """Separate a config's own fields from kind options: ``(plain, {kind: {field: value}},
    explicit kinds)``; ``kind.field`` keys are explicit, flat aliases are not (they also
    come from old files that listed every option of every kind)."""
    kinds, aliases = optioned_kinds(), alias_table()
    plain, sections, explicit = {}, {}, set()
    for key, value in overrides.items():
        if key in fields:
            plain[key] = value
        elif "." in key:
            name, field = key.split(".", 1)
            if name not in kinds:
                raise ConfigError(f"{key!r}: no registered kind {name!r} has options.{did_you_mean(name, kinds)} "
                                  f"Kinds with options: {sorted(kinds)}.")
            sections.setdefault(name, {})[field] = value
            explicit.add(name)
        elif isinstance(value, Mapping) and key in kinds:  # a JSON section
            sections.setdefault(key, {}).update(value)
            explicit.add(key)
        elif key in aliases:
            name, field = aliases[key]
            sections.setdefault(name, {})[field] = value
        else:
            plain[key] = value  # unknown: the config's own check names it
    return plain, sections, explicit


def apply(settings: KindSettings, sections: Mapping[str, Mapping[str, Any]],
          defaults: Mapping[str, Mapping[str, Any]]) -> KindSettings:
    """``settings`` with ``sections`` applied (values coerced to the option types); a kind
    without an entry starts from ``defaults`` (the family's) over the options class's own."""
    kinds = optioned_kinds()
    for name, values in sections.items():
        cls = kinds[name].options
        current = settings[name] if name in settings else make(name, defaults.get(name, {}))
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        coerced = {}
        for field, value in values.items():
            if field not in names:
                raise ConfigError(f"kind {name!r} has no option {field!r}.{did_you_mean(field, names)} "
                                  f"Its options: {', '.join(f'{name}.{n}' for n in names)}.")
            coerced[field] = _coerce(value, hints[field], f"{name}.{field}")
        settings = settings.set(name, dataclasses.replace(current, **coerced))
    return settings


def make(name: str, values: Mapping[str, Any]) -> KindOptions:
    cls = optioned_kinds()[name].options
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()})


def complete(settings: KindSettings, used: set[str], defaults: Mapping[str, Mapping[str, Any]]) -> KindSettings:
    """The options of exactly the kinds in ``used`` that have options (defaults where unset)."""
    kinds = optioned_kinds()
    out = {}
    for name in sorted(used):
        if name in kinds:
            out[name] = settings[name] if name in settings else make(name, defaults.get(name, {}))
    return KindSettings(out)
