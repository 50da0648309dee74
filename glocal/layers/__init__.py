"""Reusable Flax NNX layers; each is importable on its own.

    from glocal.layers import Attention, RMSNorm, MLP, Embed, KVCache, RingKVCache
"""

from glocal.kernels.masks import Causal, Full, SlidingWindow
from glocal.layers.attention import Attention
from glocal.layers.cache import KVCache, RingKVCache
from glocal.layers.cross import CrossAttention
from glocal.layers.embed import Embed, Unembed
from glocal.layers.mlp import MLP
from glocal.layers.norms import LayerNorm, RMSNorm, make_norm
from glocal.layers.params import param
from glocal.layers.rope import apply_rope

__all__ = [
    "Attention", "Causal", "CrossAttention", "Embed", "Full", "KVCache", "LayerNorm", "MLP", "RMSNorm",
    "RingKVCache", "SlidingWindow", "Unembed", "apply_rope", "make_norm", "param",
]
