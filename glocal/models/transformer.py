"""Dense Llama-style decoder LM: the baseline every efficient architecture is measured against.

    tokens_BT -> Embed -> [ (x + Attn(Norm(x))) -> (x + MLP(Norm(x))) ] x num_layers -> Norm -> head

Pre-norm, RoPE, grouped-query attention, SwiGLU. Layers follow ``layer_pattern``: one
character per layer of a repeating unit, ``g`` = global causal attention, ``s`` = causal
sliding window of ``sliding_window`` tokens (``"sssg"`` = three local layers per global
one). The unit is stacked ``num_layers / len(layer_pattern)`` times and scanned.

Three paths share the parameters:
* ``model(tokens_BT)`` -> logits ``[B, T, V]`` (teacher forcing);
* ``model.prefill(tokens_BT, lengths_B, cache)`` / ``model.decode(tokens_B, cache)`` with an
  explicit ``TransformerCache`` (a KV cache per global layer, a ring buffer per window layer);
* ``glocal.generate(model, prompts, ...)``, built on the two above.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glocal.configs.base import ConfigError, ModelConfig
from glocal.kernels import IMPLEMENTATIONS
from glocal.kernels.masks import Causal, Mask, SlidingWindow
from glocal.layers import MLP, Attention, Embed, KVCache, RingKVCache, Unembed, make_norm
from glocal.layers.cache import tree_nbytes
from glocal.layers.mlp import ACTIVATIONS
from glocal.sharding import constrain
from glocal.models.stack import REMAT_POLICIES, run_cached_stack, run_stack, stack_modules

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    vocab_size: int = 384
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (plain multi-head attention)
    head_dim: int | None = None  # None = d_model // num_heads
    d_ff: int = 256
    max_seq_len: int = 256
    mlp: str = "swiglu"
    norm: str = "rms"
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    layer_pattern: str = "g"  # g = global causal, s = sliding window; repeats over layers
    sliding_window: int | None = None  # tokens seen by an 's' layer, including the query
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    tie_embeddings: bool = False
    qk_norm: bool = False
    attention_impl: str = "auto"
    dtype: str = "float32"  # compute dtype; parameters are param_dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02

    def validate(self) -> None:
        self.require_positive("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len")
        if self.head_dim is None and self.d_model % self.num_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and h <= 64]
            raise ConfigError(
                f"num_heads={self.num_heads} does not divide d_model={self.d_model}. Choose "
                f"num_heads from {divisors} or set head_dim explicitly."
            )
        kv = self.kv_heads
        if kv < 1 or self.num_heads % kv:
            ok = [k for k in range(1, self.num_heads + 1) if self.num_heads % k == 0]
            raise ConfigError(
                f"num_kv_heads={kv} does not divide num_heads={self.num_heads}. "
                f"Choose num_kv_heads from {ok}."
            )
        if self.head_size % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_size}.")
        if not self.layer_pattern or set(self.layer_pattern) - {"g", "s"}:
            raise ConfigError(
                f"layer_pattern={self.layer_pattern!r} may only contain 'g' (global attention) "
                f"and 's' (sliding window), e.g. 'g' or 'sssg'."
            )
        if self.num_layers % len(self.layer_pattern):
            raise ConfigError(
                f"num_layers={self.num_layers} is not a multiple of len(layer_pattern)="
                f"{len(self.layer_pattern)} ({self.layer_pattern!r}); the pattern repeats whole."
            )
        if "s" in self.layer_pattern:
            if self.sliding_window is None or self.sliding_window < 1:
                raise ConfigError(
                    f"layer_pattern={self.layer_pattern!r} has sliding-window layers; set "
                    f"sliding_window to a positive number of tokens (e.g. sliding_window=128)."
                )
            if self.sliding_window > self.max_seq_len:
                raise ConfigError(
                    f"sliding_window={self.sliding_window} is larger than the context "
                    f"max_seq_len={self.max_seq_len}: such a window is just global attention. "
                    f"Use sliding_window <= {self.max_seq_len} or layer_pattern='g'."
                )
        check_layer_choices(self)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    def layer_mask(self, kind: str) -> Mask:
        return Causal() if kind == "g" else SlidingWindow(self.sliding_window)


class Block(nnx.Module):
    """One pre-norm decoder layer."""

    def __init__(self, cfg: TransformerConfig, mask: Mask, *, rngs: nnx.Rngs):
        norm = lambda: make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.attn_norm = norm()
        self.attn = Attention(
            cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, mask=mask,
            rope_theta=cfg.rope_theta, softcap=cfg.attn_softcap, qk_norm=cfg.qk_norm,
            impl=cfg.attention_impl, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        )
        self.mlp_norm = norm()
        self.mlp = MLP(cfg.d_model, cfg.d_ff, activation=cfg.mlp, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x_BTD, *, positions_BT, segment_ids=None, cache=None, valid_BT=None):
        h_BTD = self.attn_norm(x_BTD)
        if cache is None:
            a_BTD = self.attn(h_BTD, positions_BT=positions_BT, segment_ids=segment_ids)
        else:
            a_BTD, cache = self.attn(h_BTD, positions_BT=positions_BT, cache=cache, valid_BT=valid_BT)
        x_BTD = x_BTD + a_BTD
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return constrain(x_BTD, ("batch", None, None)), cache


class Unit(nnx.Module):
    """One repeat of ``layer_pattern``: the unit that is stacked and scanned."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, cfg.layer_mask(kind), rngs=rngs) for kind in cfg.layer_pattern])

    def __call__(self, x_BTD, caches_P, **kw):
        new_caches = []
        for p, block in enumerate(self.blocks):
            x_BTD, c = block(x_BTD, cache=None if caches_P is None else caches_P[p], **kw)
            new_caches.append(c)
        return x_BTD, (None if caches_P is None else tuple(new_caches))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransformerCache:
    """Decoding state: per pattern slot P a cache stacked over units ``[L/P, B, S, K, E]``."""

    layers_P: tuple  # KVCache for 'g' slots, RingKVCache for 's' slots
    length_B: jax.Array  # tokens consumed so far by each sequence

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)


class Transformer(nnx.Module):
    config_class = TransformerConfig

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, rngs=rngs)
        self.units = stack_modules(lambda r: Unit(cfg, rngs=r), cfg.num_layers // len(cfg.layer_pattern), rngs)
        self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else Unembed(
            cfg.d_model, cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    # -- shared trunk -------------------------------------------------------------------
    def _trunk(self, tokens_BT, positions_BT, segment_ids=None, caches_P=None, valid_BT=None):
        cfg = self.config
        check_tokens(tokens_BT, cfg.vocab_size)
        x_BTD = self.embed(tokens_BT)

        kw = dict(positions_BT=positions_BT, segment_ids=segment_ids, valid_BT=valid_BT)
        if caches_P is None:
            x_BTD, _ = run_stack(self.units, x_BTD, None, lambda unit, x, _: unit(x, None, **kw),
                                 scan=cfg.scan_layers, remat=cfg.remat)
            return self.final_norm(x_BTD), None

        x_BTD, caches_P = run_cached_stack(self.units, x_BTD, caches_P, lambda unit, x, views: unit(x, views, **kw),
                                           scan=cfg.scan_layers, remat=cfg.remat)
        return self.final_norm(x_BTD), caches_P

    def _logits(self, x_BTD):
        logits_BTV = self.embed.attend(x_BTD) if self.head is None else self.head(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", None, "vocab_act"))
        cap = self.config.logit_softcap
        return logits_BTV if cap is None else cap * jnp.tanh(logits_BTV / cap)

    # -- teacher forcing ------------------------------------------------------------------
    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None):
        """Logits ``[B, T, V]`` (float32) for every position. ``segment_ids_BT`` keeps
        attention inside packed documents; ``positions_BT`` defaults to 0..T-1."""
        B, T = tokens_BT.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}; "
                             f"raise max_seq_len or feed shorter windows.")
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD, _ = self._trunk(tokens_BT, positions_BT, segment_ids=segment_ids_BT)
        return self._logits(x_BTD)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward; matmuls only).

        6 x (matmul parameters, head included, embedding lookup excluded) plus attention:
        QK^T and PV cost 2 * 2 * H * E per visible key in the forward, and a causal query
        sees (T + 1) / 2 keys on average (a window layer at most its window).
        """
        cfg = self.config
        n = sum(x.size for path, x in nnx.to_flat_state(nnx.state(self, nnx.Param))
                if path[-1] != "table_VD" or cfg.tie_embeddings)
        per_layer = []
        for kind in cfg.layer_pattern:
            ctx = np.arange(1, seq_len + 1)
            if kind == "s":
                ctx = np.minimum(ctx, cfg.sliding_window)
            per_layer.append(ctx.mean())
        keys = sum(per_layer) * cfg.num_layers / len(cfg.layer_pattern)
        return 6.0 * n + 3 * 4 * cfg.num_heads * cfg.head_size * keys

    # -- cached decoding ------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int | None = None) -> TransformerCache:
        """Empty cache for sequences up to ``max_len`` tokens (default ``max_seq_len``)."""
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={cfg.max_seq_len}.")
        n_units = cfg.num_layers // len(cfg.layer_pattern)
        layers = []
        for kind in cfg.layer_pattern:
            if kind == "g":
                one = KVCache.create(batch_size, max_len, cfg.kv_heads, cfg.head_size, cfg.dtype)
            else:  # a window layer never needs more than its look-back
                one = RingKVCache.create(batch_size, min(cfg.sliding_window, max_len),
                                         cfg.kv_heads, cfg.head_size, cfg.dtype)
            layers.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (n_units,) + a.shape), one))
        return TransformerCache(layers_P=tuple(layers), length_B=jnp.zeros((batch_size,), jnp.int32))

    def cache_nbytes(self, batch_size: int, length: int) -> int:
        """The cache size by formula: ``2 K E`` elements and one int32 position per slot, one
        slot per token for global layers and per window token for window layers."""
        cfg = self.config
        item = jnp.dtype(cfg.dtype).itemsize
        slots = sum(length if kind == "g" else min(cfg.sliding_window, length) for kind in cfg.layer_pattern)
        slots *= cfg.num_layers // len(cfg.layer_pattern)
        return batch_size * (slots * (2 * cfg.kv_heads * cfg.head_size * item + 4) + 4)

    def prefill(self, tokens_BT, lengths_B, cache: TransformerCache):
        """Consume right-padded prompts (``lengths_B`` real tokens each) after what the cache
        already holds. Returns next-token logits ``[B, V]`` at each prompt's last token."""
        B, T = tokens_BT.shape
        positions_BT = cache.length_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        valid_BT = jnp.arange(T)[None] < lengths_B[:, None]
        x_BTD, layers = self._trunk(tokens_BT, positions_BT, caches_P=cache.layers_P, valid_BT=valid_BT)
        last_B = jnp.maximum(lengths_B - 1, 0)
        x_B1D = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
        logits_BV = self._logits(x_B1D)[:, 0]
        return logits_BV, TransformerCache(layers_P=layers, length_B=cache.length_B + lengths_B)

    def decode(self, tokens_B, cache: TransformerCache):
        """One new token per sequence -> next-token logits ``[B, V]`` and the updated cache."""
        return self.prefill(tokens_B[:, None], jnp.ones_like(cache.length_B), cache)


def check_layer_choices(cfg) -> None:
    """The layer options every family shares (activation, norm, dtypes, remat, attention)."""
    for name, allowed in (("mlp", ACTIVATIONS), ("norm", ("rms", "layer")), ("dtype", DTYPES),
                          ("param_dtype", DTYPES), ("remat", tuple(REMAT_POLICIES)),
                          ("attention_impl", IMPLEMENTATIONS)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not one of {allowed}.")


def check_empty_cache(cache, model_name: str) -> None:
    """Models whose prefill assumes a fresh cache reject a used one (when it is concrete)."""
    if isinstance(cache.length_B, jax.core.Tracer):
        return
    if np.any(np.asarray(cache.length_B) != 0):
        raise ValueError(f"{model_name}.prefill needs an empty cache (from init_cache); this one already "
                         f"holds tokens. Continue a cached sequence with decode(), one token at a time.")


def check_tokens(tokens_BT, vocab_size: int) -> None:
    """Reject out-of-range token ids when they are concrete (inside jit they are not)."""
    if isinstance(tokens_BT, jax.core.Tracer):
        return
    t = np.asarray(tokens_BT)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {t.dtype}.")
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = t.max() if t.max() >= vocab_size else t.min()
        raise ValueError(
            f"token id {int(bad)} is outside the vocabulary [0, {vocab_size}); check the "
            f"tokenizer matches the model or raise vocab_size."
        )
