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
    kv_heads_major: bool = False,
    rows_nonempty: bool = False,
):
    """Masked softmax attention computed densely; logits and softmax always in float32.

    ``kv_heads_major=True`` takes k/v as ``[B, K, S, E]`` (the KV cache layout).
    ``rows_nonempty=True`` promises every query sees at least one key (e.g. causal
    self-attention), which skips the pass that zeroes fully masked rows.
    """
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[1 if kv_heads_major else 2]
    kv = "bkse" if kv_heads_major else "bske"
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K}).")
    G = H // K
    S = k_BSKE.shape[2 if kv_heads_major else 1]
    scale = E**-0.5 if scale is None else scale
    # Fold the query heads that share a kv head into the row axis (X = G*T): every
    # contraction is then a plain batched matmul over (B, K), which XLA runs much faster
    # than a 5-D einsum with two free axes.
    q_BKXE = q_BTHE.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, E)
    logits_BKXS = jnp.einsum(f"bkxe,{kv}->bkxs", q_BKXE, k_BSKE, precision=precision,
                             preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits_BKXS = softcap * jnp.tanh(logits_BKXS / softcap)
    allowed_B11TS = allowed_BTS[:, None, None, :, :]
    logits_BKGTS = jnp.where(allowed_B11TS, logits_BKXS.reshape(B, K, G, T, S),
                             jnp.finfo(jnp.float32).min)
    # jax.nn.softmax has a cheap custom backward; rows with no allowed key come out
    # uniform and are zeroed here (our convention: a fully masked row outputs 0).
    any_B11T1 = jnp.any(allowed_B11TS, axis=-1, keepdims=True)
    p_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
    if not rows_nonempty:
        p_BKGTS = jnp.where(any_B11T1, p_BKGTS, 0.0)
    out_BKXE = jnp.einsum(f"bkxs,{kv}->bkxe", p_BKGTS.reshape(B, K, G * T, S).astype(v_BSKE.dtype),
                          v_BSKE, precision=precision, preferred_element_type=jnp.float32)
    out_BTHE = (out_BKXE.reshape(B, K, G, T, -1).transpose(0, 3, 1, 2, 4)
                .reshape(B, T, H, -1).astype(q_BTHE.dtype))
    if not return_lse:
        return out_BTHE
    lse_BKGT = jnp.where(any_B11T1[..., 0], jax.nn.logsumexp(logits_BKGTS, axis=-1), -jnp.inf)
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
