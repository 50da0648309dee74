"""Dense masked attention in plain XLA: what ``impl="xla"`` runs, the cached-decoding path
of the attention layer, and the computation behind the float32 oracle
(``glocal.kernels.reference``).

Conventions shared by every implementation in ``glocal.kernels``:
* ``q [B, T, H, E]``, ``k/v [B, S, K, E]`` with ``H % K == 0``; query head ``h`` reads kv head
  ``h // (H // K)`` (consecutive query heads share a kv head).
* The scale (default ``E ** -0.5``) is applied inside; the optional soft-cap
  ``c * tanh(logits / c)`` is applied before the mask.
* A fully masked query row returns output 0 and log-sum-exp ``-inf``.
* Optional learned sinks (GPT-OSS), one float32 logit per *query* head ``sinks [H]``: an extra
  key every query sees, with that logit as is (not scaled, capped or masked) and value 0, so
  ``o = sum_j e^{s_j} v_j / (e^{sink} + sum_j e^{s_j})``. The log-sum-exp then includes it,
  ``lse' = logaddexp(lse, sink)``, and is finite everywhere (a row that sees no key gives
  output 0 and ``lse' = sink``); the sink's gradient is ``-sum_{b,t} e^{sink - lse'} D`` with
  ``D = sum_e dO O``, and dq/dk/dv are the usual ones with ``P = exp(s - lse')``. Here the
  keys are attended alone, with the lse as a differentiable output (``_core_lse``), and the
  sink is folded in afterwards (``fold_sinks``: ``o' = o exp(lse - lse')``), once per call,
  or once over all the query chunks of ``impl="xla"``'s causal path.

Letters as in the package legend; O is the query rows with the Y query heads of a kv head
folded in (O = Y * T).
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
    sinks_H=None,
    lse_grad: bool = False,
):
    """Masked softmax attention computed densely; logits and softmax always in float32.

    ``kv_heads_major=True`` takes k/v as ``[B, K, S, E]`` (the KV cache layout).
    ``rows_nonempty=True`` promises every query sees at least one key (e.g. causal
    self-attention), which skips the pass that zeroes fully masked rows.
    ``custom_grad=True`` differentiates with the FlashAttention-style backward
    (``_core_bwd``); False lets JAX differentiate the forward (the reference does this,
    so tests compare the two).
    ``sinks_H``: optional learned sink logits ``[H]`` (used as float32; see the module
    docstring), folded in after the keys' attention (``fold_sinks``).
    ``lse_grad=True`` (with ``return_lse``) differentiates the lse too, with the custom
    backward, and returns the output in float32 (what ``fold_sinks`` takes).
    """
    if sinks_H is not None:  # the keys alone, with a differentiable lse, then the sinks folded in
        out_BTHE, lse_BTH = dense_attention(
            q_BTHE, k_BSKE, v_BSKE, allowed_BTS, scale=scale, softcap=softcap, precision=precision,
            return_lse=True, kv_heads_major=kv_heads_major, rows_nonempty=rows_nonempty,
            custom_grad=custom_grad, lse_grad=True)
        out_BTHE, lse_BTH = fold_sinks(out_BTHE, lse_BTH, sinks_H)
        out_BTHE = out_BTHE.astype(q_BTHE.dtype)
        return (out_BTHE, lse_BTH) if return_lse else out_BTHE
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[1 if kv_heads_major else 2]
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K}).")
    Y = H // K
    scale = E**-0.5 if scale is None else scale
    # Fold the query heads that share a kv head into the row axis (O = Y*T): every
    # contraction is then a plain batched matmul over (B, K), which XLA runs much faster
    # than a 5-D einsum with two free axes.
    q_BKOE = q_BTHE.reshape(B, T, K, Y, E).transpose(0, 2, 3, 1, 4).reshape(B, K, Y * T, E)
    k_BKSE, v_BKSE = (k_BSKE, v_BSKE) if kv_heads_major else (
        jnp.swapaxes(k_BSKE, 1, 2), jnp.swapaxes(v_BSKE, 1, 2))
    statics = (float(scale), None if softcap is None else float(softcap), Y, precision, rows_nonempty)
    if custom_grad and not return_lse:
        out_BKOE = _core(q_BKOE, k_BKSE, v_BKSE, allowed_BTS, statics)
    elif custom_grad and lse_grad:
        out_BKOE, lse_BKYT = _core_lse(q_BKOE, k_BKSE, v_BKSE, allowed_BTS, statics)
    else:
        p_BKOS, _, lse_BKYT = _probs(q_BKOE, k_BKSE, allowed_BTS, statics, with_lse=return_lse)
        out_BKOE = _weighted_values(p_BKOS, v_BKSE, precision)
    out_BTHE = out_BKOE.reshape(B, K, Y, T, -1).transpose(0, 3, 1, 2, 4).reshape(B, T, H, -1)
    out_BTHE = out_BTHE if lse_grad else out_BTHE.astype(q_BTHE.dtype)
    if not return_lse:
        return out_BTHE
    return out_BTHE, jnp.moveaxis(lse_BKYT.reshape(B, H, T), 1, 2)


# -- dense attention with a FlashAttention-style backward ------------------------------------
# Autodiff of softmax reduces dP * P over the key axis S; the identity
# sum_s dP_s P_s = sum_e dO_e O_e reduces over the head dim E instead (S/E times less data),
# and P is recomputed from the logits rather than stored, so nothing [T, S]-sized is saved.


def _probs(q_BKOE, k_BKSE, allowed_BTS, statics, with_lse=False, lse_guard=True):
    """Softmax probabilities ``[B, K, O, S]`` (float32), tanh of the capped logits (for the
    backward) and, if asked, the log-sum-exp ``[B, K, Y, T]`` (-inf on fully masked rows)."""
    scale, softcap, Y, precision, rows_nonempty = statics
    B, K, O, _ = q_BKOE.shape
    T, S = O // Y, k_BKSE.shape[2]
    s_BKOS = jnp.einsum("bkxe,bkse->bkxs", q_BKOE, k_BKSE, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    tanh_BKOS = None
    if softcap is not None:
        tanh_BKOS = jnp.tanh(s_BKOS / softcap)
        s_BKOS = softcap * tanh_BKOS
    allowed_B11TS = allowed_BTS[:, None, None, :, :]
    s_BKYTS = jnp.where(allowed_B11TS, s_BKOS.reshape(B, K, Y, T, S), jnp.finfo(jnp.float32).min)
    max_BKYT1 = jnp.max(s_BKYTS, axis=-1, keepdims=True)
    p_BKYTS = jnp.exp(s_BKYTS - max_BKYT1)
    sum_BKYT1 = jnp.sum(p_BKYTS, axis=-1, keepdims=True)
    p_BKYTS = p_BKYTS / sum_BKYT1
    any_B11T1 = jnp.any(allowed_B11TS, axis=-1, keepdims=True)
    if not rows_nonempty:  # a fully masked row would come out uniform: zero it
        p_BKYTS = jnp.where(any_B11T1, p_BKYTS, 0.0)
    lse_BKYT = None
    if with_lse:
        lse_BKYT = max_BKYT1 + jnp.log(sum_BKYT1)
        if lse_guard:  # (lse_guard=False: rows are known nonempty; each op costs on CPU at small sizes)
            lse_BKYT = jnp.where(any_B11T1, lse_BKYT, -jnp.inf)
        lse_BKYT = lse_BKYT[..., 0]
    return p_BKYTS.reshape(B, K, O, S), tanh_BKOS, lse_BKYT


def _weighted_values(p_BKOS, v_BKSE, precision):
    return jnp.einsum("bkxs,bkse->bkxe", p_BKOS.astype(v_BKSE.dtype), v_BKSE,
                      precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(q_BKOE, k_BKSE, v_BKSE, allowed_BTS, statics):
    return _core_fwd(q_BKOE, k_BKSE, v_BKSE, allowed_BTS, statics)[0]


def _core_fwd(q_BKOE, k_BKSE, v_BKSE, allowed_BTS, statics):
    p_BKOS, _, _ = _probs(q_BKOE, k_BKSE, allowed_BTS, statics)
    out_BKOE = _weighted_values(p_BKOS, v_BKSE, statics[3]).astype(q_BKOE.dtype)
    return out_BKOE, (q_BKOE, k_BKSE, v_BKSE, allowed_BTS, out_BKOE)


def _core_bwd(statics, residuals, dout_BKOE):
    precision = statics[3]
    q_BKOE, k_BKSE, v_BKSE, allowed_BTS, out_BKOE = residuals
    p_BKOS, tanh_BKOS, _ = _probs(q_BKOE, k_BKSE, allowed_BTS, statics)
    mm = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)
    dv_BKSE = mm("bkxs,bkxe->bkse", p_BKOS.astype(dout_BKOE.dtype), dout_BKOE)
    dp_BKOS = mm("bkxe,bkse->bkxs", dout_BKOE, v_BKSE)
    d_BKO1 = jnp.sum(dout_BKOE.astype(jnp.float32) * out_BKOE.astype(jnp.float32), axis=-1, keepdims=True)
    dq_BKOE, dk_BKSE = _dq_dk(p_BKOS * (dp_BKOS - d_BKO1), tanh_BKOS, q_BKOE, k_BKSE, statics)
    return (dq_BKOE.astype(q_BKOE.dtype), dk_BKSE.astype(k_BKSE.dtype),
            dv_BKSE.astype(v_BKSE.dtype), None)


def _dq_dk(ds_BKOS, tanh_BKOS, q_BKOE, k_BKSE, statics):
    """dQ and dK from the logits' gradient ``dS = P (dP - D)`` (through the soft-cap, scaled)."""
    scale, softcap, _, precision, _ = statics
    if softcap is not None:
        ds_BKOS = ds_BKOS * (1.0 - tanh_BKOS * tanh_BKOS)
    ds_BKOS = (ds_BKOS * scale).astype(q_BKOE.dtype)
    mm = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)
    return mm("bkxs,bkse->bkxe", ds_BKOS, k_BKSE), mm("bkxs,bkxe->bkse", ds_BKOS, q_BKOE)


_core.defvjp(_core_fwd, _core_bwd)


# -- the same with the log-sum-exp as a differentiable output (what learned sinks fold into) ---
# The lse's cotangent adds to dS: d lse / d s = p, so dS = p (dP - D + dlse).


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core_lse(q_BKOE, k_BKSE, v_BKSE, allowed_BTS, statics):
    return _core_lse_fwd(q_BKOE, k_BKSE, v_BKSE, allowed_BTS, statics)[0]


def _core_lse_fwd(q_BKOE, k_BKSE, v_BKSE, allowed_BTS, statics):
    p_BKOS, _, lse_BKYT = _probs(q_BKOE, k_BKSE, allowed_BTS, statics, with_lse=True, lse_guard=not statics[4])
    out_BKOE = _weighted_values(p_BKOS, v_BKSE, statics[3])  # float32: folded before the cast
    return (out_BKOE, lse_BKYT), (q_BKOE, k_BKSE, v_BKSE, allowed_BTS, out_BKOE)


def _core_lse_bwd(statics, residuals, cotangents):
    precision = statics[3]
    q_BKOE, k_BKSE, v_BKSE, allowed_BTS, out_BKOE = residuals
    dout_BKOE, dlse_BKYT = cotangents
    # with_lse as in the forward, so that XLA computes the probabilities once for both
    p_BKOS, tanh_BKOS, _ = _probs(q_BKOE, k_BKSE, allowed_BTS, statics, with_lse=True, lse_guard=not statics[4])
    mm = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)
    dv_BKSE = mm("bkxs,bkxe->bkse", p_BKOS.astype(v_BKSE.dtype), dout_BKOE.astype(v_BKSE.dtype))
    dp_BKOS = mm("bkxe,bkse->bkxs", dout_BKOE.astype(v_BKSE.dtype), v_BKSE)
    B, K, O, _ = out_BKOE.shape
    d_BKO1 = jnp.sum(dout_BKOE * out_BKOE, axis=-1, keepdims=True) - dlse_BKYT.reshape(B, K, O, 1)
    dq_BKOE, dk_BKSE = _dq_dk(p_BKOS * (dp_BKOS - d_BKO1), tanh_BKOS, q_BKOE, k_BKSE, statics)
    return (dq_BKOE.astype(q_BKOE.dtype), dk_BKSE.astype(k_BKSE.dtype),
            dv_BKSE.astype(v_BKSE.dtype), None)


_core_lse.defvjp(_core_lse_fwd, _core_lse_bwd)


def fold_sinks(out_BTHE, lse_BTH, sinks_H):
    """Attention over the keys alone -> the same with learned sinks ``[H]``: ``lse' =
    logaddexp(lse, sink)`` and ``o' = o exp(lse - lse')`` (the keys' share of the softmax;
    0 on a row that saw no key, whose lse is -inf). Differentiable in all three: the sinks'
    gradient comes out as ``-sum_{b,t} exp(sink - lse') D``. Apply it to one attention only,
    never to parts that are merged later (the sink would count twice)."""
    z_BTH = lse_BTH - jnp.asarray(sinks_H, jnp.float32)
    keep_BTH = jax.nn.sigmoid(z_BTH)
    out_BTHE = (out_BTHE.astype(jnp.float32) * keep_BTH[..., None]).astype(out_BTHE.dtype)
    return out_BTHE, jnp.logaddexp(lse_BTH, jnp.asarray(sinks_H, jnp.float32))
