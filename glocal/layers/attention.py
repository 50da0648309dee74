"""Multi-head attention with grouped kv heads, for self- and cross-attention.

The layer owns the projections and RoPE; the attention itself is
``glocal.kernels.attention`` with a mask object, so a config switches implementations
(einsum, ``jax.nn.dot_product_attention``, block-sparse kernels) without touching models.

Three ways to call it:
* ``attn(x_BTD)``: self-attention over the sequence (training / teacher forcing);
* ``attn(x_BTD, kv_BSD=memory)``: cross-attention, queries from x, keys/values from memory;
* ``attn(x_BTD, positions_BT=..., cache=c)``: attend to the cached tokens plus the new
  chunk, returning ``(y, updated_cache)`` (prefill and decode).
The pieces (``project_q``, ``project_kv``, ``attend``, ``project_out``) are public so
models with their own cache layouts (FIT latents, block decoders) can reuse them.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glocal import kernels
from glocal.kernels import masks as masks_lib
from glocal.kernels.dense import allowed_pairs, dense_attention
from glocal.layers.cache import KVCache
from glocal.layers.norms import RMSNorm
from glocal.sharding import constrain
from glocal.layers.params import as_dtype, fan_in_init, param
from glocal.layers.rope import apply_rope


class Attention(nnx.Module):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        mask: masks_lib.Mask = masks_lib.Causal(),
        kv_dim: int | None = None,
        rope_theta: float | None = 10_000.0,
        softcap: float | None = None,
        qk_norm: bool = False,
        impl: str = "auto",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(
                    f"d_model ({d_model}) is not divisible by num_heads ({num_heads}); pick "
                    f"num_heads dividing d_model or pass head_dim explicitly."
                )
            head_dim = d_model // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}); "
                f"e.g. use num_kv_heads in {[k for k in range(1, num_heads + 1) if num_heads % k == 0]}."
            )
        if impl not in kernels.IMPLEMENTATIONS:
            raise ValueError(f"unknown attention impl {impl!r}; choose one of {kernels.IMPLEMENTATIONS}.")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.mask, self.rope_theta, self.softcap, self.impl = mask, rope_theta, softcap, impl
        self.dtype = as_dtype(dtype)
        kv_dim = d_model if kv_dim is None else kv_dim
        H, K, E = num_heads, num_kv_heads, head_dim
        self.q_DHE = param(rngs, fan_in_init(d_model), (d_model, H, E), ("embed", "heads", "head_dim"), param_dtype)
        self.k_DKE = param(rngs, fan_in_init(kv_dim), (kv_dim, K, E), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_DKE = param(rngs, fan_in_init(kv_dim), (kv_dim, K, E), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_HED = param(rngs, fan_in_init(H * E), (H, E, d_model), ("heads", "head_dim", "embed"), param_dtype)
        # Optional per-head RMSNorm on q and k (stabilises logits at scale; Gemma/OLMo style).
        self.q_norm = RMSNorm(E, dtype=dtype, rngs=rngs) if qk_norm else None
        self.k_norm = RMSNorm(E, dtype=dtype, rngs=rngs) if qk_norm else None

    # -- pieces --------------------------------------------------------------------------
    def project_q(self, x_BTD, positions_BT=None):
        q_BTHE = _matmul(x_BTD.astype(self.dtype), self.q_DHE[...].astype(self.dtype))
        return self._norm_rope(q_BTHE, self.q_norm, positions_BT)

    def project_kv(self, kv_BSD, positions_BS=None):
        kv = kv_BSD.astype(self.dtype)
        k_BSKE = _matmul(kv, self.k_DKE[...].astype(self.dtype))
        v_BSKE = _matmul(kv, self.v_DKE[...].astype(self.dtype))
        return self._norm_rope(k_BSKE, self.k_norm, positions_BS), v_BSKE

    def project_qkv(self, x_BTD, positions_BT=None):
        """Self-attention projections as one matmul against the concatenated kernels
        (one large matmul runs faster than three small ones); same math as project_q/kv."""
        H, K, E = self.num_heads, self.num_kv_heads, self.head_dim
        D = x_BTD.shape[-1]
        w = jnp.concatenate([self.q_DHE[...].reshape(D, H * E), self.k_DKE[...].reshape(D, K * E),
                             self.v_DKE[...].reshape(D, K * E)], axis=1).astype(self.dtype)
        qkv = _matmul(x_BTD.astype(self.dtype), w)
        q_BTHE = qkv[..., : H * E].reshape(*qkv.shape[:2], H, E)
        k_BTKE = qkv[..., H * E : (H + K) * E].reshape(*qkv.shape[:2], K, E)
        v_BTKE = qkv[..., (H + K) * E :].reshape(*qkv.shape[:2], K, E)
        return (self._norm_rope(q_BTHE, self.q_norm, positions_BT),
                self._norm_rope(k_BTKE, self.k_norm, positions_BT), v_BTKE)

    def _norm_rope(self, x_BTNE, norm, positions_BT):
        """Optional per-head qk-norm, then RoPE at ``positions_BT`` (if RoPE is on)."""
        if norm is not None:
            x_BTNE = norm(x_BTNE)
        if self.rope_theta is not None and positions_BT is not None:
            x_BTNE = apply_rope(x_BTNE, positions_BT, theta=self.rope_theta)
        return x_BTNE

    def attend(self, q_BTHE, k_BSKE, v_BSKE, *, mask=None, segment_ids=None,
               q_positions=None, kv_positions=None):
        return kernels.attention(
            q_BTHE, k_BSKE, v_BSKE, mask=self.mask if mask is None else mask,
            segment_ids=segment_ids, q_positions=q_positions, kv_positions=kv_positions,
            softcap=self.softcap, impl=self.impl,
        )

    def project_out(self, o_BTHE):
        B, T, H, E = o_BTHE.shape
        return _matmul(o_BTHE.reshape(B, T, H * E).astype(self.dtype),
                       self.o_HED[...].astype(self.dtype).reshape(H * E, -1))

    # -- whole layer -----------------------------------------------------------------------
    def __call__(self, x_BTD, *, kv_BSD=None, positions_BT=None, kv_positions_BS=None,
                 segment_ids=None, cache: KVCache | None = None, valid_BT=None):
        """See the module docstring. Without positions, RoPE uses 0..T-1 (0..S-1 for kv)."""
        B, T, _ = x_BTD.shape
        self_attn = kv_BSD is None
        if positions_BT is None and self.rope_theta is not None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if self_attn:
            kv_BSD, kv_positions_BS = x_BTD, positions_BT
        elif kv_positions_BS is None and self.rope_theta is not None:
            S = kv_BSD.shape[1]
            kv_positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        # Names let remat policies choose what to keep (glocal.models.stack.REMAT_POLICIES).
        if self_attn:
            q, k, v = self.project_qkv(x_BTD, positions_BT)
        else:
            q = self.project_q(x_BTD, positions_BT)
            k, v = self.project_kv(kv_BSD, kv_positions_BS)
        q = checkpoint_name(constrain(q, ("batch", None, "heads_act", None)), "query_proj")
        k = checkpoint_name(constrain(k, ("batch", None, "kv_heads_act", None)), "key_proj")
        v = checkpoint_name(constrain(v, ("batch", None, "kv_heads_act", None)), "value_proj")
        if cache is None:
            # Structural path: masks index the arrays directly, so kernels can skip blocks.
            o = checkpoint_name(self.attend(q, k, v, segment_ids=segment_ids), "attn_out")
            return self.project_out(o)
        if not self_attn:
            raise ValueError("a KV cache is only supported for self-attention.")
        if positions_BT is None:
            raise ValueError("cached attention needs positions_BT (absolute token positions).")
        if T == 1:
            # One token per row (decoding): store it, then attend over the cache alone. The
            # slot it overwrites in a ring held position p - size, already outside any
            # window that fits the ring, so nothing the query needs is lost.
            cache = cache.update(k, v, positions_BT, valid_BT)
            k_all, v_all, pos_all = cache.k_BKSE, cache.v_BKSE, cache.pos_BS
        else:
            # A chunk (prefill): attend to what the cache held before plus the chunk itself,
            # then store the chunk. Exact even when a ring is shorter than the chunk.
            heads_major = lambda a: jnp.swapaxes(a, 1, 2)
            new_pos_BT = positions_BT if valid_BT is None else jnp.where(valid_BT, positions_BT, -1)
            k_all = jnp.concatenate([cache.k_BKSE.astype(k.dtype), heads_major(k)], axis=2)
            v_all = jnp.concatenate([cache.v_BKSE.astype(v.dtype), heads_major(v)], axis=2)
            pos_all = jnp.concatenate([cache.pos_BS, new_pos_BT.astype(jnp.int32)], axis=1)
            cache = cache.update(k, v, positions_BT, valid_BT)
        # Cached calls evaluate the mask on absolute positions (dense path, heads-major K/V).
        allowed_BTS = allowed_pairs(self.mask, T, pos_all.shape[1], q_positions=positions_BT,
                                    kv_positions=pos_all)
        o = dense_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), allowed_BTS,
                            softcap=self.softcap, kv_heads_major=True)
        return self.project_out(o), cache


def _matmul(x_BTD, w_D__):
    """``x [B, T, D] @ w [D, ...]`` as one flat 2-D matmul (fastest form on XLA:CPU)."""
    B, T, D = x_BTD.shape
    out_shape = w_D__.shape[1:]
    y = x_BTD.reshape(B * T, D) @ w_D__.reshape(D, -1)
    return y.reshape(B, T, *out_shape)
