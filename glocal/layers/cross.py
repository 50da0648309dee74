"""Residual cross-attention with pre-norm on both sides and no MLP (FIT's latent<->token links).

    y = x + Attn(q = Norm_q(x), kv = Norm_kv(memory))

Queries of width ``d_q`` read memory of width ``d_kv``; the attention runs at width
``min(d_q, d_kv)`` with ``num_heads`` heads and projects back to ``d_q``. No positions and no
mask by default: the caller groups rows so each query sees exactly the memory it may see.
``kv(memory)`` and ``with_kv(x, k, v)`` split the layer so a decoder can project a memory
once and reuse its keys/values for many queries.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from glocal.kernels.masks import Full, Mask
from glocal.layers.attention import Attention
from glocal.layers.norms import make_norm


class CrossAttention(nnx.Module):
    def __init__(self, d_q: int, d_kv: int, num_heads: int, *, mask: Mask = Full(), norm: str = "rms",
                 norm_eps: float = 1e-6, impl: str = "auto", dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        width = min(d_q, d_kv)
        if width % num_heads:
            raise ValueError(f"cross-attention width min({d_q}, {d_kv}) = {width} is not divisible by "
                             f"num_heads={num_heads}; choose heads dividing {width}.")
        self.norm_q = make_norm(norm, d_q, eps=norm_eps, dtype=dtype, rngs=rngs)
        self.norm_kv = make_norm(norm, d_kv, eps=norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(d_q, num_heads, num_heads, width // num_heads, mask=mask, kv_dim=d_kv,
                              rope_theta=None, impl=impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BTD, mem_BSD):
        y_BTD, _ = self.attn(self.norm_q(x_BTD), kv_BSD=self.norm_kv(mem_BSD))
        return x_BTD + y_BTD.astype(x_BTD.dtype)

    def flops(self, q_rate: float, kv_rate: float, keys: float) -> float:
        """Forward FLOPs per position of a stream with ``q_rate`` queries and ``kv_rate``
        keys/values per position, each query seeing ``keys`` keys: the projections
        (2 per parameter use) and ``QK^T`` and ``PV`` (``2 * 2 * H * E`` per key)."""
        at = self.attn
        fwd = 2 * (at.q_DHE.size + at.o_HED.size) * q_rate + 2 * at.kv_DKAE.size * kv_rate
        return fwd + 4 * at.num_heads * at.head_dim * keys * q_rate

    def kv(self, mem_BSD):
        """Keys and values ``[B, S, K, E]`` of a memory (normalised, projected)."""
        return self.attn.project_kv(self.norm_kv(mem_BSD))

    def with_kv(self, x_BTD, k_BSKE, v_BSKE):
        """Same as ``__call__`` with the memory's keys/values precomputed by ``kv``."""
        q = self.attn.project_q(self.norm_q(x_BTD))
        o = self.attn.attend(q, k_BSKE.astype(q.dtype), v_BSKE.astype(q.dtype))
        return x_BTD + self.attn.project_out(o).astype(x_BTD.dtype)
