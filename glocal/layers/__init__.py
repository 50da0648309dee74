"""Reusable Flax NNX layers; each is importable on its own.

    from glocal.layers import Attention, RMSNorm, MLP, Embed, KVCache, RingKVCache
    from glocal.layers import DecoderStack, LayerKind, LayerSpec   # the decoder skeleton
    from glocal.layers import KindOptions, register_mixer         # a new mixer / FFN kind
"""

from glocal.kernels.masks import Causal, Full, SlidingWindow
from glocal.layers.attention import Attention
from glocal.layers.cache import Cache, CompactKVCache, KVCache, LayerView, RingKVCache, SinkRingKVCache
from glocal.layers.cross import CrossAttention
from glocal.layers.embed import Embed, Unembed
from glocal.layers.mlp import MLP
from glocal.layers.norms import LayerNorm, RMSNorm, make_norm
from glocal.layers.params import param
from glocal.layers.rope import apply_rope
from glocal.layers.spec import (FFNS, KINDS, MIXER_LETTERS, MIXERS, KindOptions, LayerKind, LayerSpec, register_ffn,
                                register_mixer)
from glocal.layers.decoder import DecoderChain, DecoderLayer, DecoderStack
from glocal.layers.moe import MoEFFN, MoEOptions

__all__ = [
    "FFNS", "MIXERS", "MIXER_LETTERS", "Attention", "Cache", "Causal", "CompactKVCache", "CrossAttention",
    "DecoderChain", "DecoderLayer", "KINDS", "KindOptions", "MoEFFN", "MoEOptions",
    "DecoderStack", "Embed", "Full", "KVCache", "LayerKind", "LayerNorm", "LayerSpec", "LayerView", "MLP",
    "RMSNorm", "RingKVCache", "SinkRingKVCache", "SlidingWindow", "Unembed", "apply_rope", "make_norm", "param", "register_ffn",
    "register_mixer",
]

from glocal.layers.spec import load_builtin_kinds  # noqa: E402

load_builtin_kinds()  # every kind in a module of this package registers itself
