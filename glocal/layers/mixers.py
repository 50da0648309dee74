"""Attention mixers: ``global`` (causal over everything before) and ``window`` (causal
sliding window of ``spec.sliding_window`` tokens). Both are grouped-query attention with
RoPE; the mask decides what a query sees, and the mask's look-back decides the cache: a
bounded look-back gets a ring buffer of that many slots, an unbounded one a slot per token.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from glocal.kernels.masks import Causal, ChunkCausal, Full, Mask, SlidingWindow
from glocal.layers.attention import Attention
from glocal.layers.cache import KVCache, RingKVCache
from glocal.layers.spec import LayerSpec, register_mixer


class AttentionMixer(nnx.Module):
    def __init__(self, spec: LayerSpec, mask: Mask, *, rngs: nnx.Rngs):
        self.mask = mask
        self.dtype = spec.dtype
        self.attn = Attention(
            spec.d_model, spec.num_heads, spec.kv_heads, spec.head_size, mask=mask,
            rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling, softcap=spec.attn_softcap,
            qk_norm=spec.qk_norm, qkv_bias=spec.qkv_bias, norm_eps=spec.norm_eps, impl=spec.attention_impl, dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs,
        )

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, valid_BT=None):
        if cache is None:
            return self.attn(x_BTD, positions_BT=positions_BT, segment_ids=segment_ids_BT), None
        return self.attn(x_BTD, positions_BT=positions_BT, cache=cache, valid_BT=valid_BT)

    def _slots(self, length: int) -> int:
        """Cache slots for sequences of ``length`` tokens: the mask's look-back if bounded."""
        lookback = self.mask.lookback
        return length if lookback is None else min(lookback, length)

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        kind = KVCache if self.mask.lookback is None else RingKVCache
        return kind.create(batch_size, self._slots(max_len), self.attn.num_kv_heads, self.attn.head_dim,
                           self.dtype)

    def cache_nbytes(self, batch_size: int, length: int) -> int:
        """``2 K E`` elements and one int32 position per slot."""
        item = jnp.dtype(self.dtype).itemsize
        return batch_size * self._slots(length) * (2 * self.attn.num_kv_heads * self.attn.head_dim * item + 4)

    def score_flops(self, seq_len: int) -> float:
        """QK^T and PV: ``2 * 2 * H * E`` FLOPs per visible key, averaged over the queries."""
        return 4 * self.attn.num_heads * self.attn.head_dim * mean_visible_keys(self.mask, seq_len)


@register_mixer("global", letter="g")
class GlobalAttention(AttentionMixer):
    """Causal attention over every earlier position (or ``mask`` if given)."""

    def __init__(self, spec: LayerSpec, *, mask: Mask | None = None, rngs: nnx.Rngs):
        super().__init__(spec, Causal() if mask is None else mask, rngs=rngs)


@register_mixer("window", letter="s")
class WindowAttention(AttentionMixer):
    """Causal sliding window of ``spec.sliding_window`` tokens, the query included."""

    def __init__(self, spec: LayerSpec, *, mask: Mask | None = None, rngs: nnx.Rngs):
        if mask is None and not spec.sliding_window:
            raise ValueError("a 'window' mixer needs spec.sliding_window (tokens seen, the query included).")
        super().__init__(spec, SlidingWindow(spec.sliding_window) if mask is None else mask, rngs=rngs)


def mean_visible_keys(mask: Mask, T: int) -> float:
    """Keys a query sees under ``mask`` in self-attention over ``T`` positions, on average
    (closed forms for the common masks, a row count otherwise)."""
    rows = np.arange(1, T + 1)
    if isinstance(mask, Full):
        return float(T)
    if mask == Causal():
        return float(rows.mean())
    if isinstance(mask, SlidingWindow) and mask.causal:
        return float(np.minimum(rows, mask.size).mean())
    if isinstance(mask, ChunkCausal):
        return float(np.minimum((np.arange(T) // mask.size + 1) * mask.size, T).mean())
    keys = np.arange(T)[None]
    total = sum(int(np.asarray(mask(np.arange(i, min(i + 256, T))[:, None], keys)).sum()) for i in range(0, T, 256))
    return total / T
