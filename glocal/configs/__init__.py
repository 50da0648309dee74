"""Config dataclass machinery and presets (``<family>_<preset>.py`` files defining ``FAMILY``
and ``CONFIG``)."""

FAMILY = "__init_"

from glocal.configs.base import ConfigError, ModelConfig, parse_overrides

__all__ = ["ConfigError", "ModelConfig", "parse_overrides"]
