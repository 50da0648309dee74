"""Dense masked attention in plain XLA: what ``impl="xla"`` runs, the cached-decoding path
of the attention layer, and the computation behind the float32 oracle
(``glocal.kernels.reference``).

Conventions shared by every implementation in ``glocal.kernels``:
* ``q [B, T, H, E]``, ``k/v [B, S, K, E]`` with ``H % K == 0``; query head ``h`` reads kv head
  ``h // (H // K)`` (consecutive query heads share a kv head).
* The scale (default ``E ** -0.5``) is applied inside; the optional soft-cap
  ``c * tanh(logits / c)`` is applied before the mask.
* A fully masked query row returns output 0 and log-sum-exp ``-inf``.

Letters added here (beyond the package legend): Y query heads per kv head (H / K), Z the
query rows folded with them (Y * T).
"""

from __future__ import annotations

import functools

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
        allowed = allowed & masks_lib.segment_mask(*split_segments(segment_ids))
    return allowed


def split_segments(segment_ids):
    """``ids [B, T]`` (self-attention) or ``(q_ids, kv_ids)`` -> ``(q_ids, kv_ids)``."""
    return segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)


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
    custom_grad: bool = True,
):
    """Masked softmax attention computed densely; logits and softmax always in float32.

    ``kv_heads_major=True`` takes k/v as ``[B, K, S, E]`` (the KV cache layout).
    ``rows_nonempty=True`` promises every query sees at least one key (e.g. causal
    self-attention), which skips the pass that zeroes fully masked rows.
    ``custom_grad=True`` differentiates with the FlashAttention-style backward
    (``_core_bwd``); False lets JAX differentiate the forward (the reference does this,
    so tests compare the two).
    """
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[1 if kv_heads_major else 2]
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K}).")
    Y = H // K
    scale = E**-0.5 if scale is None else scale
    # Fold the query heads that share a kv head into the row axis (Z = Y*T): every
    # contraction is then a plain batched matmul over (B, K), which XLA runs much faster
    # than a 5-D einsum with two free axes.
    q_BKZE = q_BTHE.reshape(B, T, K, Y, E).transpose(0, 2, 3, 1, 4).reshape(B, K, Y * T, E)
    k_BKSE, v_BKSE = (k_BSKE, v_BSKE) if kv_heads_major else (
        jnp.swapaxes(k_BSKE, 1, 2), jnp.swapaxes(v_BSKE, 1, 2))
    statics = (float(scale), None if softcap is None else float(softcap), Y, precision, rows_nonempty)
    if custom_grad and not return_lse:
        out_BKZE = _core(q_BKZE, k_BKSE, v_BKSE, allowed_BTS, statics)
    else:
        p_BKZS, _, lse_BKYT = _probs(q_BKZE, k_BKSE, allowed_BTS, statics, with_lse=return_lse)
        out_BKZE = _weighted_values(p_BKZS, v_BKSE, precision)
    out_BTHE = (out_BKZE.reshape(B, K, Y, T, -1).transpose(0, 3, 1, 2, 4)
                .reshape(B, T, H, -1).astype(q_BTHE.dtype))
    if not return_lse:
        return out_BTHE
    return out_BTHE, jnp.moveaxis(lse_BKYT.reshape(B, H, T), 1, 2)


# -- dense attention with a FlashAttention-style backward ------------------------------------
# Autodiff of softmax reduces dP * P over the key axis S; the identity
# sum_s dP_s P_s = sum_e dO_e O_e reduces over the head dim E instead (S/E times less data),
# and P is recomputed from the logits rather than stored, so nothing [T, S]-sized is saved.


def _probs(q_BKZE, k_BKSE, allowed_BTS, statics, with_lse=False):
    """Softmax probabilities ``[B, K, Z, S]`` (float32), tanh of the capped logits (for the
    backward) and, if asked, the log-sum-exp ``[B, K, Y, T]`` (-inf on fully masked rows)."""
    scale, softcap, Y, precision, rows_nonempty = statics
    B, K, Z, _ = q_BKZE.shape
    T, S = Z // Y, k_BKSE.shape[2]
    s_BKZS = jnp.einsum("bkxe,bkse->bkxs", q_BKZE, k_BKSE, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    tanh_BKZS = None
    if softcap is not None:
        tanh_BKZS = jnp.tanh(s_BKZS / softcap)
        s_BKZS = softcap * tanh_BKZS
    allowed_B11TS = allowed_BTS[:, None, None, :, :]
    s_BKYTS = jnp.where(allowed_B11TS, s_BKZS.reshape(B, K, Y, T, S), jnp.finfo(jnp.float32).min)
    max_BKYT1 = jnp.max(s_BKYTS, axis=-1, keepdims=True)
    p_BKYTS = jnp.exp(s_BKYTS - max_BKYT1)
    sum_BKYT1 = jnp.sum(p_BKYTS, axis=-1, keepdims=True)
    p_BKYTS = p_BKYTS / sum_BKYT1
    any_B11T1 = jnp.any(allowed_B11TS, axis=-1, keepdims=True)
    if not rows_nonempty:  # a fully masked row would come out uniform: zero it
        p_BKYTS = jnp.where(any_B11T1, p_BKYTS, 0.0)
    lse_BKYT = None
    if with_lse:
        lse_BKYT = jnp.where(any_B11T1, max_BKYT1 + jnp.log(sum_BKYT1), -jnp.inf)[..., 0]
    return p_BKYTS.reshape(B, K, Z, S), tanh_BKZS, lse_BKYT


def _weighted_values(p_BKZS, v_BKSE, precision):
    return jnp.einsum("bkxs,bkse->bkxe", p_BKZS.astype(v_BKSE.dtype), v_BKSE,
                      precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(q_BKZE, k_BKSE, v_BKSE, allowed_BTS, statics):
    return _core_fwd(q_BKZE, k_BKSE, v_BKSE, allowed_BTS, statics)[0]


def _core_fwd(q_BKZE, k_BKSE, v_BKSE, allowed_BTS, statics):
    p_BKZS, _, _ = _probs(q_BKZE, k_BKSE, allowed_BTS, statics)
    out_BKZE = _weighted_values(p_BKZS, v_BKSE, statics[3]).astype(q_BKZE.dtype)
    return out_BKZE, (q_BKZE, k_BKSE, v_BKSE, allowed_BTS, out_BKZE)


def _core_bwd(statics, residuals, dout_BKZE):
    scale, softcap, _, precision, _ = statics
    q_BKZE, k_BKSE, v_BKSE, allowed_BTS, out_BKZE = residuals
    p_BKZS, tanh_BKZS, _ = _probs(q_BKZE, k_BKSE, allowed_BTS, statics)
    mm = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)
    dv_BKSE = mm("bkxs,bkxe->bkse", p_BKZS.astype(dout_BKZE.dtype), dout_BKZE)
    dp_BKZS = mm("bkxe,bkse->bkxs", dout_BKZE, v_BKSE)
    d_BKZ1 = jnp.sum(dout_BKZE.astype(jnp.float32) * out_BKZE.astype(jnp.float32), axis=-1, keepdims=True)
    ds_BKZS = p_BKZS * (dp_BKZS - d_BKZ1)
    if softcap is not None:
        ds_BKZS = ds_BKZS * (1.0 - tanh_BKZS * tanh_BKZS)
    ds_BKZS = (ds_BKZS * scale).astype(q_BKZE.dtype)
    dq_BKZE = mm("bkxs,bkse->bkxe", ds_BKZS, k_BKSE)
    dk_BKSE = mm("bkxs,bkxe->bkse", ds_BKZS, q_BKZE)
    return (dq_BKZE.astype(q_BKZE.dtype), dk_BKSE.astype(k_BKSE.dtype),
            dv_BKSE.astype(v_BKSE.dtype), None)


_core.defvjp(_core_fwd, _core_bwd)
