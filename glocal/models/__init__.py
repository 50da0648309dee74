"""Model families, registered by name.

    model = glocal.models.build("transformer", preset="tiny", d_model=128)
    logits_BTV = model(tokens_BT)
"""

from glocal.models.registry import (
    build, build_from_config, config_class, get_config, list_models, list_presets, model_name, register,
    split_config_name,
)
from glocal.models.transformer import Transformer, TransformerCache, TransformerConfig

register("transformer", TransformerConfig, Transformer)

__all__ = [
    "Transformer", "TransformerCache", "TransformerConfig", "build", "build_from_config", "config_class",
    "get_config", "list_models", "list_presets", "model_name", "register", "split_config_name",
]
