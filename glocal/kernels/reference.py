"""The oracle every attention implementation is tested against: dense masked attention in
float32 at HIGHEST matmul precision, differentiated by plain autodiff (not the custom
backward of ``glocal.kernels.dense``). Conventions: see ``glocal.kernels.dense``. With learned
sinks it is a separate, literal form (``_with_sinks``) so that no sink code is shared with
what it checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glocal.kernels.dense import allowed_pairs, dense_attention


def attention_reference(
    q, k, v, *, mask, segment_ids=None, q_positions=None, kv_positions=None,
    scale=None, softcap=None, return_lse=False, sinks=None,
):
    """The oracle: dense float32 masked attention at HIGHEST matmul precision."""
    allowed = allowed_pairs(
        mask, q.shape[1], k.shape[1], segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions,
    )
    f32 = lambda x: x.astype(jnp.float32)
    if sinks is not None:
        return _with_sinks(f32(q), f32(k), f32(v), allowed, f32(jnp.asarray(sinks)), scale, softcap, return_lse)
    return dense_attention(
        f32(q), f32(k), f32(v), allowed, scale=scale, softcap=softcap,
        precision=jax.lax.Precision.HIGHEST, return_lse=return_lse, custom_grad=False,
    )


def _with_sinks(q_BTHE, k_BSKE, v_BSKE, allowed_BTS, sinks_H, scale, softcap, return_lse):
    """Learned sinks written independently of ``glocal.kernels.dense``: the sink logit as one
    more column of every row's logits (after scale, soft-cap and mask), softmax over all of
    them, the sink's column dropped before weighting the values. Autodiff gives every
    gradient, the sink's included."""
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    scale = E**-0.5 if scale is None else scale
    hi = jax.lax.Precision.HIGHEST
    kv_head_H = jnp.arange(H) // (H // K)  # query head h reads kv head h // Y
    k_BSHE, v_BSHE = k_BSKE[:, :, kv_head_H], v_BSKE[:, :, kv_head_H]
    s_BHTS = jnp.einsum("bthe,bshe->bhts", q_BTHE, k_BSHE, precision=hi) * scale
    if softcap is not None:
        s_BHTS = softcap * jnp.tanh(s_BHTS / softcap)
    s_BHTS = jnp.where(allowed_BTS[:, None], s_BHTS, jnp.finfo(jnp.float32).min)
    sink_BHT1 = jnp.broadcast_to(sinks_H[None, :, None, None], s_BHTS.shape[:3] + (1,))
    z_BHTS = jnp.concatenate([s_BHTS, sink_BHT1], axis=-1)  # S + 1 columns
    p_BHTS = jax.nn.softmax(z_BHTS, axis=-1)[..., :-1]
    out_BTHE = jnp.einsum("bhts,bshe->bthe", p_BHTS, v_BSHE, precision=hi)
    if not return_lse:
        return out_BTHE
    return out_BTHE, jnp.moveaxis(jax.nn.logsumexp(z_BHTS, axis=-1), 1, 2)
