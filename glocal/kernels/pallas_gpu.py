"""Block-sparse flash attention as Pallas Triton (GPU) kernels on the same block schedule.

One program per (batch, query head, query tile) holds its query tile and loops over its
``kv_count[i]`` scheduled kv tiles (a loop with a traced trip count: skipped tiles are never
loaded); K/V stay in global memory and are sliced per tile. Backward: a dQ kernel on the
forward schedule and a dK/dV kernel per (batch, kv head, kv tile) that loops over the
transposed schedule for each of the Y query heads sharing that kv head (no atomics, so
the result is deterministic). Tied together by ``jax.custom_vjp``; interpret mode off-GPU.
Learned sinks (float32 ``[H]``, read whole like the schedule tables) seed the forward's
running max and sum; the backward kernels only read the sink-inclusive lse.

Triton needs power-of-two tiles and head dimension of at least 16: the wrapper
(``tiles.call_tiled(pow2_tiles=True)``) zero-pads short sequences and odd head dims up to
them, so any shape runs.

Letters as in the package legend (Y: query heads per kv head, H / K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from glocal.kernels.schedule import build_schedule
from glocal.kernels.tiles import NEG, call_tiled, custom_flash, positions, schedule_tables, tile_logits


def _compiler_params(E):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4 if E <= 64 else 8, num_stages=2)


def _full_spec(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


# -- forward ----------------------------------------------------------------------------------
def _fwd_kernel(cnt_ref, idx_ref, full_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, *refs, cfg, bq, bkv, with_sinks):
    sink_ref, (o_ref, lse_ref) = (refs[0], refs[1:]) if with_sinks else (None, refs)
    h, i = pl.program_id(1), pl.program_id(2)
    q, qs = q_ref[...], qs_ref[...]
    E = v_ref.shape[-1]

    def body(j, carry):
        m, l, acc = carry
        t = idx_ref[i, j]
        sl = pl.ds(pl.multiple_of(t * bkv, bkv), bkv)
        qpos, kpos = positions(i, t, bq, bkv)
        s, allowed, _ = tile_logits(q, k_ref[sl, :], qpos, kpos, qs, ks_ref[sl], full_ref[i, j] == 1, cfg)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v_ref.dtype), v_ref[sl, :],
                                             preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(axis=1), acc

    init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, E), jnp.float32))
    if sink_ref is not None:  # the sink as a key already seen: max = sink, sum = 1 (its value is 0)
        init = (jnp.full((bq,), sink_ref[h], jnp.float32), jnp.ones((bq,), jnp.float32), init[2])
    m, l, acc = jax.lax.fori_loop(0, cnt_ref[i], body, init)
    ok = l > 0
    o_ref[...] = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)


def _forward(q, k, v, qs, ks, sinks, statics):
    mask, S, scale, softcap, bq, bkv, interpret = statics
    B, H, Tp, E = q.shape
    K, Sp = k.shape[1], k.shape[2]
    Y = H // K
    sch = build_schedule(mask, Tp, Sp, bq, bkv)
    tables = schedule_tables(sch.kv_count, sch.kv_index, sch.kv_full)
    qspec = pl.BlockSpec((None, None, bq, E), lambda b, h, i: (b, h, i, 0))
    kvspec = pl.BlockSpec((None, None, Sp, E), lambda b, h, i: (b, h // Y, 0, 0))
    sink_args = () if sinks is None else (sinks,)
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=(mask, S, scale, softcap), bq=bq, bkv=bkv, with_sinks=bool(sink_args)),
        grid=(B, H, Tp // bq),
        in_specs=[_full_spec(t.shape) for t in tables] + [
            qspec, kvspec, kvspec, pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0))] + [_full_spec(a.shape) for a in sink_args],
        out_specs=[qspec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
        interpret=interpret, compiler_params=None if interpret else _compiler_params(E),
    )(*tables, q, k, v, qs, ks, *sink_args)
    return out, lse


# -- backward ---------------------------------------------------------------------------------
def _dq_kernel(cnt_ref, idx_ref, full_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, dl_ref,
               dq_ref, *, cfg, bq, bkv):
    i = pl.program_id(2)
    scale, softcap = cfg[2], cfg[3]
    q, qs, do = q_ref[...], qs_ref[...], do_ref[...].astype(jnp.float32)
    lse, delta = lse_ref[...], dl_ref[...]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def body(j, dq):
        t = idx_ref[i, j]
        sl = pl.ds(pl.multiple_of(t * bkv, bkv), bkv)
        qpos, kpos = positions(i, t, bq, bkv)
        k = k_ref[sl, :]
        s, allowed, th = tile_logits(q, k, qpos, kpos, qs, ks_ref[sl], full_ref[i, j] == 1, cfg)
        p = jnp.where(allowed, jnp.exp(s - lse[:, None]), 0.0)
        dp = jax.lax.dot_general(do, v_ref[sl, :].astype(jnp.float32), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        if softcap is not None:
            ds = ds * (1.0 - th * th)
        return dq + jnp.dot(ds * scale, k.astype(jnp.float32), preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, cnt_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(cnt_ref, idx_ref, full_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, dl_ref,
                dk_ref, dv_ref, *, cfg, bq, bkv, Y):
    jk = pl.program_id(2)
    scale, softcap = cfg[2], cfg[3]
    k, v, ks = k_ref[...], v_ref[...].astype(jnp.float32), ks_ref[...]

    def body(t_slot, carry, g):
        dk, dv = carry
        t = idx_ref[jk, t_slot]
        sl = pl.ds(pl.multiple_of(t * bq, bq), bq)
        qpos, kpos = positions(t, jk, bq, bkv)
        q = q_ref[g, sl, :]
        s, allowed, th = tile_logits(q, k, qpos, kpos, qs_ref[sl], ks, full_ref[jk, t_slot] == 1, cfg)
        lse = lse_ref[g, sl]
        p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[:, None]), 0.0)
        do = do_ref[g, sl, :].astype(jnp.float32)
        dv = dv + jax.lax.dot_general(p, do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - dl_ref[g, sl][:, None])
        if softcap is not None:
            ds = ds * (1.0 - th * th)
        dk = dk + jax.lax.dot_general(ds * scale, q.astype(jnp.float32), (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32))
    for g in range(Y):  # the query heads that share this kv head
        carry = jax.lax.fori_loop(0, cnt_ref[jk], functools.partial(body, g=g), carry)
    dk_ref[...] = carry[0].astype(dk_ref.dtype)
    dv_ref[...] = carry[1].astype(dv_ref.dtype)


def _backward(statics, res, dout):
    mask, S, scale, softcap, bq, bkv, interpret = statics
    q, k, v, qs, ks, out, lse = res
    B, H, Tp, E = q.shape
    K, Sp = k.shape[1], k.shape[2]
    Y = H // K
    sch = build_schedule(mask, Tp, Sp, bq, bkv)
    cfg = (mask, S, scale, softcap)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    params = None if interpret else _compiler_params(E)

    fwd_tables = schedule_tables(sch.kv_count, sch.kv_index, sch.kv_full)
    qspec = pl.BlockSpec((None, None, bq, E), lambda b, h, i: (b, h, i, 0))
    kvspec = pl.BlockSpec((None, None, Sp, E), lambda b, h, i: (b, h // Y, 0, 0))
    rowspec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, bq=bq, bkv=bkv), grid=(B, H, Tp // bq),
        in_specs=[_full_spec(t.shape) for t in fwd_tables] + [
            qspec, kvspec, kvspec, pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0)), qspec, rowspec, rowspec],
        out_specs=qspec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, compiler_params=params,
    )(*fwd_tables, q, k, v, qs, ks, dout, lse, delta)

    bwd_tables = schedule_tables(sch.q_count, sch.q_index, sch.q_full)
    heads = pl.BlockSpec((None, Y, Tp, E), lambda b, kh, j: (b, kh, 0, 0))  # the Y heads of kv head kh
    head_rows = pl.BlockSpec((None, Y, Tp), lambda b, kh, j: (b, kh, 0))
    kv_tile = pl.BlockSpec((None, None, bkv, E), lambda b, kh, j: (b, kh, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bkv=bkv, Y=Y), grid=(B, K, Sp // bkv),
        in_specs=[_full_spec(t.shape) for t in bwd_tables] + [
            heads, kv_tile, kv_tile, pl.BlockSpec((None, Tp), lambda b, kh, j: (b, 0)),
            pl.BlockSpec((None, bkv), lambda b, kh, j: (b, j)), heads, head_rows, head_rows],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret, compiler_params=params,
    )(*bwd_tables, q, k, v, qs, ks, dout, lse, delta)
    return dq, dk, dv


_flash = custom_flash(_forward, _backward)


def attention_pallas_gpu(q, k, v, *, mask, segment_ids=None, scale=None, softcap=None,
                         block_sizes=(64, 64), return_lse=False, interpret=None, sinks=None):
    """``q [B,T,H,E]``, ``k/v [B,S,K,E]`` (, ``sinks [H]``) -> ``[B,T,H,E]`` (and lse ``[B,T,H]``)."""
    return call_tiled(_flash, "pallas_gpu", "gpu", q, k, v, mask=mask, segment_ids=segment_ids,
                      scale=scale, softcap=softcap, block_sizes=block_sizes, return_lse=return_lse,
                      interpret=interpret, pow2_tiles=True, sinks=sinks)
