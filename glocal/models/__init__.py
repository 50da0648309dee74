"""Model families, registered by name; every one follows the contract in
``glocal.models.base`` (read it first).

    model = glocal.models.build("transformer", preset="tiny", d_model=128)
    logits_BTV, aux = model(tokens_BT)
"""

from glocal.models.base import DecoderConfig, LanguageModel, ModelBase, ModelCache
from glocal.models.registry import (
    build, build_from_config, config_class, get_config, list_models, list_presets, model_name,
    preset_train_defaults, register, split_config_name,
)
from glocal.models.based import Based, BasedConfig
from glocal.models.block_transformer import BlockTransformer, BlockTransformerCache, BlockTransformerConfig
from glocal.models.fit import FIT, FITCache, FITConfig
from glocal.models.moe import MoE, MoEConfig
from glocal.models.mor import MoR, MoRCache, MoRConfig
from glocal.models.transformer import Transformer, TransformerCache, TransformerConfig

register("transformer", TransformerConfig, Transformer)
register("fit", FITConfig, FIT)
register("block", BlockTransformerConfig, BlockTransformer)
register("based", BasedConfig, Based)
register("moe", MoEConfig, MoE)
register("mor", MoRConfig, MoR)

__all__ = [
    "Based", "BasedConfig", "BlockTransformer", "BlockTransformerCache", "BlockTransformerConfig", "DecoderConfig", "FIT", "FITCache",
    "FITConfig", "LanguageModel", "MoE", "MoEConfig", "MoR", "MoRCache", "MoRConfig", "ModelBase", "ModelCache", "Transformer", "TransformerCache",
    "TransformerConfig", "build", "build_from_config", "config_class", "preset_train_defaults", "get_config", "list_models",
    "list_presets", "model_name", "register", "split_config_name",
]
