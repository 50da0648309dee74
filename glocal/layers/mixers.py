"""Attention mixers: ``global`` (causal over everything before) and ``window`` (causal
sliding window of ``window.size`` tokens, its one option). Both are grouped-query attention with
RoPE; the mask decides what a query sees, and the mask's look-back decides the cache: a
bounded look-back gets a ring buffer of that many slots, an unbounded one a slot per token.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from glocal.kernels.masks import Causal, ChunkCausal, Full, Mask, Sinks, SlidingWindow
from glocal.layers.attention import Attention
from glocal.layers.cache import KVCache, RingKVCache, SinkRingKVCache
from glocal.layers.streaming import ROPE_POSITIONS
from glocal.layers.spec import KindOptions, LayerSpec, register_mixer


class AttentionMixer(nnx.Module):
    packs_documents = True  # segment ids restrict the mask to each document

    def __init__(self, spec: LayerSpec, mask: Mask, *, rope_positions: str = "absolute", rngs: nnx.Rngs):
        self.mask = mask
        # Sinks are the first tokens of a row, not of each packed document: plain windows.
        self.packs_documents = mask.sink_window is None
        self.dtype = spec.dtype
        self.num_kv_heads, self.head_dim = spec.kv_heads, spec.head_size
        self.attn = Attention(
            spec.d_model, spec.num_heads, spec.kv_heads, spec.head_size, mask=mask,
            rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling, softcap=spec.attn_softcap,
            qk_norm=spec.qk_norm, qkv_bias=spec.qkv_bias, norm=spec.norm, norm_eps=spec.norm_eps,
            rope_fraction=spec.rope_fraction, output_gate=spec.attn_output_gate, rope_positions=rope_positions,
            impl=spec.attention_impl, sinks=spec.attn_sinks, out_bias=spec.attn_out_bias,
            dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs,
        )

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, valid_BT=None):
        return self.attn(x_BTD, positions_BT=positions_BT, segment_ids=segment_ids_BT, cache=cache,
                         valid_BT=valid_BT)

    @property
    def bounded_cache(self) -> bool:
        """Does the cache stay the same size however long the sequence (decoding past
        ``max_seq_len`` possible)? True for windows, with or without sinks."""
        return self.mask.lookback is not None or self.mask.sink_window is not None

    def _slots(self, length: int) -> int:
        """Cache slots for sequences of ``length`` tokens: the mask's look-back if bounded."""
        lookback = self.mask.lookback
        return length if lookback is None else min(lookback, length)

    def init_cache(self, batch_size: int, max_len: int, cache_class=None) -> KVCache:
        """``2 K E`` elements and one int32 position per slot: a ring of the mask's look-back
        when bounded, the sinks plus a ring of the window for a window-plus-sinks mask (always
        ``n + w`` slots, so it can decode past ``max_len``), a slot per token otherwise
        (``cache_class`` overrides, e.g. MoR's ``CompactKVCache`` of a recursion step's capacity)."""
        sink_window = self.mask.sink_window
        if cache_class is None and sink_window is not None:
            num_sinks, window = sink_window
            return SinkRingKVCache.create(batch_size, num_sinks + window, self.num_kv_heads, self.head_dim,
                                          self.dtype, num_sinks=num_sinks)
        if cache_class is None:
            cache_class = KVCache if self.mask.lookback is None else RingKVCache
        return cache_class.create(batch_size, self._slots(max_len), self.num_kv_heads, self.head_dim, self.dtype)

    def score_flops(self, seq_len: int) -> float:
        """QK^T and PV: ``2 * 2 * H * E`` FLOPs per visible key, averaged over the queries."""
        return 4 * self.attn.num_heads * self.attn.head_dim * mean_visible_keys(self.mask, seq_len)


@register_mixer("global", letter="g")
class GlobalAttention(AttentionMixer):
    """Causal attention over every earlier position (or ``mask`` if given)."""

    def __init__(self, spec: LayerSpec, options: None = None, *, mask: Mask | None = None, rngs: nnx.Rngs):
        super().__init__(spec, Causal() if mask is None else mask, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class WindowOptions(KindOptions):
    size: int | None = None  # tokens a query sees, itself included (a look-back of size - 1)
    sinks: int = 0  # also the first `sinks` tokens of the sequence (StreamingLLM attention sinks)
    rope_positions: str = "absolute"  # "cache": RoPE positions inside the sink + window cache (StreamingLLM)

    def validate(self, config=None) -> None:
        if self.size is not None and self.size < 1:
            raise self.error("size", "must be a positive number of tokens (e.g. window.size=128).")
        if self.sinks < 0:
            raise self.error("sinks", "must be >= 0 (the number of first tokens every query also sees; 0 = none).")
        if self.rope_positions not in ROPE_POSITIONS:
            raise self.error("rope_positions", f"must be one of {ROPE_POSITIONS}: 'absolute' (positions in the "
                                               f"text, as trained) or 'cache' (StreamingLLM re-positioning).")
        if self.rope_positions == "cache" and not self.sinks:
            raise self.error("rope_positions", "needs window.sinks > 0: without sinks a window's RoPE scores "
                                               "depend only on distances, so 'cache' would change nothing.")
        if config is None:
            return
        if self.size is None:
            raise self.error("size", "is not set, but the model has sliding-window layers; set window.size (or "
                                     "sliding_window) to a positive number of tokens (e.g. window.size=128).")
        if self.size > config.max_seq_len:
            raise self.error("size", f"is larger than the context max_seq_len={config.max_seq_len}: such a window "
                                     f"is just global attention. Use window.size <= {config.max_seq_len} or "
                                     f"global layers.")


@register_mixer("window", letter="s", options=WindowOptions, aliases={"sliding_window": "size"})
class WindowAttention(AttentionMixer):
    """Causal sliding window of ``options.size`` tokens, the query included, plus the first
    ``options.sinks`` tokens of the sequence when set (StreamingLLM; ``glocal.layers.streaming``)."""

    def __init__(self, spec: LayerSpec, options: WindowOptions, *, mask: Mask | None = None, rngs: nnx.Rngs):
        if mask is None and not options.size:
            raise ValueError("a 'window' mixer needs window.size (tokens seen, the query included).")
        if mask is None:
            mask = SlidingWindow(options.size) | Sinks(options.sinks) if options.sinks else SlidingWindow(options.size)
        super().__init__(spec, mask, rope_positions=options.rope_positions, rngs=rngs)


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
    if mask.sink_window is not None:  # the window, plus the sinks that have left it
        n, w = mask.sink_window
        t = np.arange(T)
        return float((np.minimum(t + 1, w) + np.minimum(n, np.maximum(0, t - w + 1))).mean())
    if isinstance(mask, ChunkCausal):
        return float(np.minimum((np.arange(T) // mask.size + 1) * mask.size, T).mean())
    keys = np.arange(T)[None]
    total = sum(int(np.asarray(mask(np.arange(i, min(i + 256, T))[:, None], keys)).sum()) for i in range(0, T, 256))
    return total / T
