"""Build any model by name: ``build("transformer", preset="tiny", d_model=128)``.

A family registers ``(config class, model class)``; presets are Python files
``glocal/configs/<family>_<preset>.py`` defining ``FAMILY`` (the family's exact name) and
``CONFIG`` (a dict of field values), and optionally ``TRAIN``: training defaults that
``glocal train --config <family>_<preset>`` starts from on a new workdir (e.g. the learning
rate the architecture comparison found best for it; anything on the command line wins).
Presets are found by ``FAMILY``, not by file-name prefix, so a family ``transformer_moe`` and
the presets of ``transformer`` never mix.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import pkgutil
from typing import Any, Iterator

from flax import nnx

from glocal import configs as configs_pkg
from glocal.configs.base import ConfigError, ModelConfig

_REGISTRY: dict[str, tuple[type[ModelConfig], type[nnx.Module]]] = {}


def register(name: str, config_class: type[ModelConfig], model_class: type[nnx.Module]) -> None:
    if not (isinstance(config_class, type) and issubclass(config_class, ModelConfig)):
        raise ConfigError(f"model {name!r}: its config class {config_class!r} must derive from "
                          f"glocal.configs.base.ModelConfig.")
    _REGISTRY[name] = (config_class, model_class)


def unregister(name: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(f"cannot unregister {name!r}: it is not registered ({list_models()}).")
    del _REGISTRY[name]


@contextlib.contextmanager
def registered(name: str, config_class: type[ModelConfig], model_class: type[nnx.Module]) -> Iterator[None]:
    """``register`` for the duration of a ``with`` block (tests); what was there before returns."""
    previous = _REGISTRY.get(name)
    register(name, config_class, model_class)
    try:
        yield
    finally:
        if previous is None:
            unregister(name)
        else:
            _REGISTRY[name] = previous


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _preset_files() -> dict[str, tuple[str, str]]:
    """``{module name: (family, preset)}`` for every preset file in glocal/configs."""
    out = {}
    for info in pkgutil.iter_modules(configs_pkg.__path__):
        module = importlib.import_module(f"{configs_pkg.__name__}.{info.name}")
        if not hasattr(module, "CONFIG"):
            continue  # machinery (base.py), not a preset
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, str) or not info.name.startswith(f"{family}_"):
            raise ConfigError(f"preset file glocal/configs/{info.name}.py must define FAMILY, the exact name "
                              f"of its model family, and be named <FAMILY>_<preset>.py (got FAMILY={family!r}).")
        out[info.name] = (family, info.name[len(family) + 1:])
    return out


def list_presets(name: str) -> list[str]:
    return sorted(preset for family, preset in _preset_files().values() if family == name)

def _family(name: str):
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} Registered models: {list_models()}.")
    return _REGISTRY[name]


def config_class(name: str) -> type[ModelConfig]:
    return _family(name)[0]


def get_config(name: str, preset: str = "tiny", **overrides: Any) -> ModelConfig:
    """The preset's config with ``overrides`` applied (strings are coerced to field types)."""
    config_class, _ = _family(name)
    if preset not in list_presets(name):
        raise _unknown_preset(name, preset)
    module = importlib.import_module(f"glocal.configs.{name}_{preset}")
    values = dict(module.CONFIG)
    values.update(overrides)
    base = config_class()
    return base.replace(**values)


def preset_train_defaults(name: str, preset: str) -> dict[str, Any]:
    """The preset file's ``TRAIN`` dict (training-config field values), or ``{}``."""
    _family(name)
    if preset not in list_presets(name):
        raise _unknown_preset(name, preset)
    return dict(getattr(importlib.import_module(f"glocal.configs.{name}_{preset}"), "TRAIN", {}))


def _unknown_preset(name: str, preset: str) -> ConfigError:
    return ConfigError(f"unknown preset {preset!r} for model {name!r}; available: {list_presets(name)}.")


def build_from_config(config: ModelConfig, *, seed: int = 0, rngs: nnx.Rngs | None = None) -> nnx.Module:
    model_class = next((m for c, m in _REGISTRY.values() if type(config) is c), None)
    if model_class is None:
        raise ConfigError(f"no registered model uses config class {type(config).__name__}.")
    return model_class(config, rngs=rngs if rngs is not None else nnx.Rngs(seed))


def model_name(config: ModelConfig) -> str:
    return next(n for n, (c, _) in _REGISTRY.items() if type(config) is c)


def build(name: str, preset: str = "tiny", *, seed: int = 0, rngs: nnx.Rngs | None = None,
          **overrides: Any) -> nnx.Module:
    """A freshly initialised model of family ``name`` from ``preset`` plus ``overrides``."""
    return build_from_config(get_config(name, preset, **overrides), seed=seed, rngs=rngs)


def split_config_name(config_name: str) -> tuple[str, str]:
    """``"transformer_small"`` -> ``("transformer", "small")``: the preset file of that name
    says its family (model names may contain '_')."""
    family, preset = _preset_files().get(config_name, (None, None))
    if family in _REGISTRY:
        return family, preset
    for name in sorted(_REGISTRY, key=len, reverse=True):  # a known family, an unknown preset
        if config_name.startswith(f"{name}_"):
            raise _unknown_preset(name, config_name[len(name) + 1:])
    options = [f"{n}_{p}" for n in list_models() for p in list_presets(n)]
    close = difflib.get_close_matches(config_name, options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown config {config_name!r}.{hint} Available: {options}.")
