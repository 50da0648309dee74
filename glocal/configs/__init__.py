"""Config dataclass machinery and presets (``<family>_<preset>.py`` files defining ``FAMILY``
and ``CONFIG``)."""

FAMILY = "__init_"

from glocal.configs.base import Config, ConfigError, ModelConfig, parse_overrides

__all__ = ["Config", "ConfigError", "ModelConfig", "parse_overrides"]
