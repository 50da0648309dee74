"""Block-sparse attention in pure JAX: compute only the tiles a mask's schedule visits.

The schedule's visited (query tile, kv tile) pairs are processed in chunks of ``PAIRS``
by a ``lax.scan``; each chunk computes its tiles' logits, and an online softmax folds them
into per-query-tile running (max, sum, accumulator) with scatter updates. Work is
proportional to the visited tiles and memory to ``T`` (no ``T x S`` array ever exists).
The backward (``custom_vjp``) recomputes each tile's probabilities from the saved
log-sum-exp, FlashAttention-style, and scatters dQ into query tiles and dK/dV into kv tiles.

Conventions as everywhere in ``glocal.kernels``: scale inside, soft-cap before the mask,
fully masked rows give output 0 and lse ``-inf``; query head ``h`` reads kv head
``h // (H // K)``. Learned sinks seed each row's online softmax with the sink as if it were
a key already seen (running max ``sink``, sum 1, accumulator 0: its value is 0); the
backward is unchanged given the sink-inclusive lse, and the sinks' gradient is a plain-JAX
reduction after the scan.

Letters as in the package legend (Y: query heads per kv head, H / K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from glocal.kernels.schedule import build_schedule

PAIRS = 16  # tiles per scan step
NEG = float(jnp.finfo(jnp.float32).min)


def _pairs(mask, T, S, bq, bkv):
    """Visited (q tile, kv tile) pairs in row order, padded to a multiple of PAIRS with
    pairs flagged invalid."""
    sch = build_schedule(mask, T, S, bq, bkv)
    rows = np.repeat(np.arange(sch.num_q_blocks), sch.kv_count)
    cols = np.concatenate([sch.kv_index[i, :c] for i, c in enumerate(sch.kv_count)] or [np.zeros(0, int)])
    n = len(rows)
    pad = (-n) % PAIRS if n else PAIRS
    valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    rows = np.concatenate([rows, np.zeros(pad, int)]).astype(np.int32)
    cols = np.concatenate([cols, np.zeros(pad, int)]).astype(np.int32)
    shape = (-1, PAIRS)
    return rows.reshape(shape), cols.reshape(shape), valid.reshape(shape)


def attention_blockwise(q, k, v, *, mask, segment_ids=None, scale=None, softcap=None,
                        block_sizes=(128, 128), return_lse=False, sinks=None):
    """``q [B,T,H,E]``, ``k/v [B,S,K,E]`` (, ``sinks [H]``) -> ``[B,T,H,E]`` (and lse ``[B,T,H]``)."""
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    bq, bkv = min(block_sizes[0], T), min(block_sizes[1], S)
    nq, nk = -(-T // bq), -(-S // bkv)
    Y = H // K
    scale = E**-0.5 if scale is None else float(scale)
    if segment_ids is None:
        q_seg = jnp.zeros((B, T), jnp.int32)
        kv_seg = jnp.zeros((B, S), jnp.int32)
    else:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    # tiles: q [B, K, nq, Y, bq, E], k/v [B, K, nk, bkv, E], segments [B, n, b]
    pad_t = lambda x, n, b: jnp.pad(x, [(0, 0), (0, n * b - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    q_t = pad_t(q, nq, bq).reshape(B, nq, bq, K, Y, E).transpose(0, 3, 1, 4, 2, 5)
    k_t = pad_t(k, nk, bkv).reshape(B, nk, bkv, K, E).transpose(0, 3, 1, 2, 4)
    v_t = pad_t(v, nk, bkv).reshape(B, nk, bkv, K, E).transpose(0, 3, 1, 2, 4)
    qs_t = pad_t(q_seg.astype(jnp.int32), nq, bq).reshape(B, nq, bq)
    ks_t = pad_t(kv_seg.astype(jnp.int32), nk, bkv).reshape(B, nk, bkv)
    rows, cols, valid = _pairs(mask, T, S, bq, bkv)
    statics = (mask, T, S, bq, bkv, scale, None if softcap is None else float(softcap))
    sinks_KY = None if sinks is None else jnp.asarray(sinks, jnp.float32).reshape(K, Y)
    out_t, lse_t = _blockwise(q_t, k_t, v_t, qs_t, ks_t, jnp.asarray(rows), jnp.asarray(cols),
                              jnp.asarray(valid), sinks_KY, statics)
    out = out_t.transpose(0, 2, 4, 1, 3, 5).reshape(B, nq * bq, H, E)[:, :T].astype(q.dtype)
    if not return_lse:
        return out
    lse = lse_t.transpose(0, 2, 4, 1, 3).reshape(B, nq * bq, H)[:, :T]
    return out, lse


def _tile_logits(q_t, k_t, qs_t, ks_t, r, c, ok, statics):
    """Logits of a chunk of pairs ``[B, K, pairs, Y, bq, bkv]`` (float32, masked to NEG), the
    mask, and tanh of the capped logits (for the backward)."""
    mask, T, S, bq, bkv, scale, softcap = statics
    qb, kb = q_t[:, :, r], k_t[:, :, c]  # [B,K,pairs,Y,bq,E], [B,K,pairs,bkv,E]
    s = jnp.einsum("bkpgqe,bkpse->bkpgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    th = None
    if softcap is not None:
        th = jnp.tanh(s / softcap)
        s = softcap * th
    qpos = r[:, None] * bq + jnp.arange(bq)[None]  # [pairs, bq]
    kpos = c[:, None] * bkv + jnp.arange(bkv)[None]  # [pairs, bkv]
    allowed = mask(qpos[:, :, None], kpos[:, None, :]) & (kpos[:, None, :] < S) & ok[:, None, None]
    same_doc = qs_t[:, r][:, :, :, None] == ks_t[:, c][:, :, None, :]  # [B, pairs, bq, bkv]
    allowed = (allowed[None] & same_doc)[:, None, :, None]  # [B, 1, pairs, 1, bq, bkv]
    return jnp.where(allowed, s, NEG), allowed, th


def _forward(q_t, k_t, v_t, qs_t, ks_t, rows, cols, valid, sinks_KY, statics):
    B, K, nq, Y, bq, E = q_t.shape
    m0 = jnp.full((B, K, nq, Y, bq), NEG, jnp.float32)
    l0 = jnp.zeros_like(m0)
    if sinks_KY is not None:  # the sink as a key already seen: max = sink, sum = e^0 = 1
        m0 = jnp.broadcast_to(sinks_KY[None, :, None, :, None], m0.shape)
        l0 = jnp.ones_like(m0)
    carry0 = (m0, l0, jnp.zeros((B, K, nq, Y, bq, v_t.shape[-1]), jnp.float32))

    def body(carry, chunk):
        m, l, acc = carry
        r, c, ok = chunk
        s, allowed, _ = _tile_logits(q_t, k_t, qs_t, ks_t, r, c, ok, statics)
        m_p = s.max(-1)  # [B,K,pairs,Y,bq]
        # rows of this chunk may repeat: combine per query tile with scatter-max
        m_new = m.at[:, :, r].max(m_p)
        p = jnp.where(allowed, jnp.exp(s - m_new[:, :, r][..., None]), 0.0)
        l_p = p.sum(-1)
        acc_p = jnp.einsum("bkpgqs,bkpse->bkpgqe", p.astype(v_t.dtype), v_t[:, :, c],
                           preferred_element_type=jnp.float32)
        alpha = jnp.exp(m - m_new)
        l = (l * alpha).at[:, :, r].add(l_p)
        acc = (acc * alpha[..., None]).at[:, :, r].add(acc_p)
        return (m_new, l, acc), None

    (m, l, acc), _ = jax.lax.scan(body, carry0, (rows, cols, valid))
    nonempty = l > 0
    out = jnp.where(nonempty[..., None], acc / jnp.where(nonempty, l, 1.0)[..., None], 0.0)
    lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _blockwise(q_t, k_t, v_t, qs_t, ks_t, rows, cols, valid, sinks_KY, statics):
    return _forward(q_t, k_t, v_t, qs_t, ks_t, rows, cols, valid, sinks_KY, statics)


def _fwd(q_t, k_t, v_t, qs_t, ks_t, rows, cols, valid, sinks_KY, statics):
    out, lse = _forward(q_t, k_t, v_t, qs_t, ks_t, rows, cols, valid, sinks_KY, statics)
    return (out, lse), (q_t, k_t, v_t, qs_t, ks_t, rows, cols, valid, sinks_KY, out, lse)


def _bwd(statics, res, cotangents):
    q_t, k_t, v_t, qs_t, ks_t, rows, cols, valid, sinks_KY, out, lse = res
    dout, _ = cotangents  # the lse output is for inspection; its cotangent is ignored
    scale, softcap = statics[5], statics[6]
    dout = dout.astype(jnp.float32)
    delta = jnp.sum(dout * out, axis=-1)  # [B,K,nq,Y,bq]: sum_s dP P = sum_e dO O
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)

    def body(carry, chunk):
        dq, dk, dv = carry
        r, c, ok = chunk
        s, allowed, th = _tile_logits(q_t, k_t, qs_t, ks_t, r, c, ok, statics)
        p = jnp.where(allowed, jnp.exp(s - lse_safe[:, :, r][..., None]), 0.0)
        do = dout[:, :, r]  # [B,K,pairs,Y,bq,E]
        dv = dv.at[:, :, c].add(jnp.einsum("bkpgqs,bkpgqe->bkpse", p, do))
        dp = jnp.einsum("bkpgqe,bkpse->bkpgqs", do, v_t[:, :, c].astype(jnp.float32))
        ds = p * (dp - delta[:, :, r][..., None])
        if softcap is not None:
            ds = ds * (1.0 - th * th)
        ds = ds * scale
        dq = dq.at[:, :, r].add(jnp.einsum("bkpgqs,bkpse->bkpgqe", ds, k_t[:, :, c].astype(jnp.float32)))
        dk = dk.at[:, :, c].add(jnp.einsum("bkpgqs,bkpgqe->bkpse", ds, q_t[:, :, r].astype(jnp.float32)))
        return (dq, dk, dv), None

    (dq, dk, dv), _ = jax.lax.scan(body, (zeros(q_t), zeros(k_t), zeros(v_t)), (rows, cols, valid))
    none = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    dsinks_KY = None
    if sinks_KY is not None:  # d sink = -sum over rows of exp(sink - lse') * delta (0 on padded rows)
        dsinks_KY = -jnp.sum(jnp.exp(sinks_KY[None, :, None, :, None] - lse) * delta, axis=(0, 2, 4))
    return (dq.astype(q_t.dtype), dk.astype(k_t.dtype), dv.astype(v_t.dtype),
            none(qs_t), none(ks_t), none(rows), none(cols), none(valid), dsinks_KY)


_blockwise.defvjp(_fwd, _bwd)
