"""Dense masked attention: the float32 oracle and the plain-XLA einsum implementation.

Conventions shared by every implementation in ``glocal.kernels``:
* ``q [B, T, H, E]``, ``k/v [B, S, K, E]`` with ``H % K == 0``; query head ``h`` reads kv head
  ``h // (H // K)`` (consecutive query heads share a kv head).
* The scale (default ``E ** -0.5``) is applied inside; the optional soft-cap
  ``c * tanh(logits / c)`` is applied before the mask.
* A fully masked query row returns output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glocal.kernels import masks as masks_lib


def allowed_pairs(
    mask: masks_lib.Mask,
    T: int,
    S: int,
    *,
    segment_ids=None,
    q_positions=None,
    kv_positions=None,
) -> jax.Array:
    """Boolean ``[B or 1, T, S]``: which (query, key) pairs may interact.

    Without positions, queries and keys are indexed 0..T-1 and 0..S-1. With positions
    (cached decoding, re-indexed groups), the mask predicate is evaluated on them and key
    slots whose position is negative (empty cache slots) are excluded.
    """
    q_pos = jnp.arange(T, dtype=jnp.int32)[None] if q_positions is None else q_positions
    k_pos = jnp.arange(S, dtype=jnp.int32)[None] if kv_positions is None else kv_positions
    allowed = mask(q_pos[:, :, None], k_pos[:, None, :])
    if kv_positions is not None:
        allowed = allowed & (k_pos[:, None, :] >= 0)
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
        allowed = allowed & masks_lib.segment_mask(q_seg, kv_seg)
    return allowed


def dense_attention(
    q_BTHE,
    k_BSKE,
    v_BSKE,
    allowed_BTS,
    *,
    scale=None,
    softcap=None,
    precision=None,
    return_lse: bool = False,
):
    """Masked softmax attention computed densely; logits and softmax always in float32."""
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K}).")
    G = H // K
    scale = E**-0.5 if scale is None else scale
    q_BTKGE = q_BTHE.reshape(B, T, K, G, E)
    logits_BKGTS = jnp.einsum(
        "btkge,bske->bkgts", q_BTKGE, k_BSKE,
        precision=precision, preferred_element_type=jnp.float32,
    ) * scale
    if softcap is not None:
        logits_BKGTS = softcap * jnp.tanh(logits_BKGTS / softcap)
    allowed = allowed_BTS[:, None, None, :, :]
    logits_BKGTS = jnp.where(allowed, logits_BKGTS, -jnp.inf)
    row_max = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
    # A fully masked row has max -inf; shifting by 0 instead keeps exp() at exactly 0.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p_BKGTS = jnp.exp(logits_BKGTS - row_max)
    denom = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = p_BKGTS / jnp.where(denom > 0, denom, 1.0)
    out_BTKGE = jnp.einsum(
        "bkgts,bske->btkge", p_BKGTS.astype(v_BSKE.dtype), v_BSKE,
        precision=precision, preferred_element_type=jnp.float32,
    )
    out_BTHE = out_BTKGE.reshape(B, T, H, -1).astype(q_BTHE.dtype)
    if not return_lse:
        return out_BTHE
    lse_BKGT = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + row_max[..., 0], -jnp.inf)
    lse_BTH = jnp.moveaxis(lse_BKGT.reshape(B, H, T), 1, 2)
    return out_BTHE, lse_BTH


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
        precision=jax.lax.Precision.HIGHEST, return_lse=return_lse,
    )
