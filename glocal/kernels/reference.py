"""The oracle every attention implementation is tested against: dense masked attention in
float32 at HIGHEST matmul precision, differentiated by plain autodiff (not the custom
backward of ``glocal.kernels.dense``). Conventions: see ``glocal.kernels.dense``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glocal.kernels.dense import allowed_pairs, dense_attention


def attention_reference(
    q, k, v, *, mask, segment_ids=None, q_positions=None, kv_positions=None,
    scale=None, softcap=None, return_lse=False,
):
    """The oracle: dense float32 masked attention at HIGHEST matmul precision."""
    allowed = allowed_pairs(
        mask, q.shape[1], k.shape[1], segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions,
    )
    f32 = lambda x: x.astype(jnp.float32)
    return dense_attention(
        f32(q), f32(k), f32(v), allowed, scale=scale, softcap=softcap,
        precision=jax.lax.Precision.HIGHEST, return_lse=return_lse, custom_grad=False,
    )
