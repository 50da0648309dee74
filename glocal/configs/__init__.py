"""Config dataclass machinery and presets (``<family>_<preset>.py`` files defining ``CONFIG``)."""

from glocal.configs.base import ConfigError, ModelConfig, parse_overrides

__all__ = ["ConfigError", "ModelConfig", "parse_overrides"]
