"""Block-sparse flash attention as Pallas TPU (Mosaic) kernels driven by a block schedule.

Forward and dQ kernels run on the grid ``(B, H, q tiles, W)`` where step ``j`` of query tile
``i`` loads kv tile ``kv_index[i, j]`` (scalar prefetch: the index maps read the schedule,
so skipped tiles are never copied in); steps past ``kv_count[i]`` repeat the last index (no
new copy) and do nothing. The dK/dV kernel runs on the transposed schedule with grid
``(B, K, kv tiles, Y, Wt)``, summing over the Y query heads that share a kv head. The
element mask is recomputed in-kernel from positions, only on partial tiles. Tied together
by ``jax.custom_vjp``. On CPU the kernels run in interpret mode (``interpret=True``, or
``pltpu.InterpretParams()`` for the TPU-semantics checker).

Supported: every mask whose predicate is plain arithmetic (all of ``glocal.kernels.masks``
except ``Explicit``), GQA, soft-cap, segment ids, T != S, learned sinks (a float32 ``[H]`` in
SMEM that seeds the forward's running max and sum; the backward kernels only read the
sink-inclusive lse).

Letters as in the package legend (Y: query heads per kv head, H / K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from glocal.kernels.schedule import build_schedule
from glocal.kernels.tiles import (NEG, call_tiled, custom_flash, positions as _positions, schedule_tables,
                                 tile_logits as _logits)

# -- forward ----------------------------------------------------------------------------------
def _fwd_kernel(cnt, idx, full, q_ref, k_ref, v_ref, qs_ref, ks_ref, *refs, cfg, bq, bkv, W, with_sinks):
    sink_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = (refs[0], refs[1:]) if with_sinks else (None, refs)
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        if sink_ref is None:
            m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        else:  # the sink as a key already seen: max = sink, sum = 1 (its value is 0)
            m_sc[...] = jnp.full(m_sc.shape, sink_ref[h], jnp.float32)
            l_sc[...] = jnp.ones(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < cnt[i])
    def _():
        qpos, kpos = _positions(i, idx[i, j], bq, bkv)
        s, allowed, _ = _logits(q_ref[...], k_ref[...], qpos, kpos, qs_ref[...], ks_ref[...],
                                full[i, j] == 1, cfg)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v_ref.dtype), v_ref[...],
                                                    preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(j == W - 1)
    def _():
        l = l_sc[...]
        ok = l > 0
        o_ref[...] = jnp.where(ok, acc_sc[...] / jnp.where(ok, l, 1.0), 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(ok, m_sc[...] + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)


def _specs(Y, E, bq, bkv):
    """BlockSpecs over q/o [B,H,T,E], k/v [B,K,S,E], segments [B,T,1]/[B,1,S] for the
    (B, H, nq, W) grid; index maps get the three prefetched schedule tables last."""
    qspec = pl.BlockSpec((None, None, bq, E), lambda b, h, i, j, cnt, idx, full: (b, h, i, 0))
    kvspec = pl.BlockSpec((None, None, bkv, E), lambda b, h, i, j, cnt, idx, full: (b, h // Y, idx[i, j], 0))
    qsspec = pl.BlockSpec((None, bq, 1), lambda b, h, i, j, cnt, idx, full: (b, i, 0))
    ksspec = pl.BlockSpec((None, 1, bkv), lambda b, h, i, j, cnt, idx, full: (b, 0, idx[i, j]))
    lspec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, cnt, idx, full: (b, h, i, 0))
    return qspec, kvspec, qsspec, ksspec, lspec


def _segments(qs, ks):
    """Segment ids as a query column ``[B, T, 1]`` and a key row ``[B, 1, S]``: Mosaic tiles
    the last two block dims by (8, 128) unless they span the array, and a ``(1, bq)`` block of
    a ``[B, T]`` array does not for B > 1 (rejected when lowered for a TPU)."""
    return qs[:, :, None], ks[:, None, :]


def _forward(q, k, v, qs, ks, sinks, statics):
    mask, S, scale, softcap, bq, bkv, interpret = statics
    qs, ks = _segments(qs, ks)
    B, H, Tp, E = q.shape
    K = k.shape[1]
    Y = H // K
    sch = build_schedule(mask, Tp, k.shape[2], bq, bkv)
    W = sch.kv_index.shape[1]
    qspec, kvspec, qsspec, ksspec, lspec = _specs(Y, E, bq, bkv)
    kernel = functools.partial(_fwd_kernel, cfg=(mask, S, scale, softcap), bq=bq, bkv=bkv, W=W,
                               with_sinks=sinks is not None)
    sink_args = () if sinks is None else (sinks,)
    sink_specs = [pl.BlockSpec(memory_space=pltpu.SMEM)] * len(sink_args)  # the whole [H]
    grid = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(B, H, Tp // bq, W),
        in_specs=[qspec, kvspec, kvspec, qsspec, ksspec, *sink_specs], out_specs=[qspec, lspec],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, E), jnp.float32)])
    out, lse = pl.pallas_call(
        kernel, grid_spec=grid, interpret=interpret,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(*schedule_tables(sch.kv_count, sch.kv_index, sch.kv_full), q, k, v, qs, ks, *sink_args)
    return out, lse


# -- backward ---------------------------------------------------------------------------------
def _dq_kernel(cnt, idx, full, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, dl_ref, dq_ref, acc_sc,
               *, cfg, bq, bkv, W):
    i, j = pl.program_id(2), pl.program_id(3)
    scale, softcap = cfg[2], cfg[3]

    @pl.when(j == 0)
    def _():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < cnt[i])
    def _():
        qpos, kpos = _positions(i, idx[i, j], bq, bkv)
        s, allowed, th = _logits(q_ref[...], k_ref[...], qpos, kpos, qs_ref[...], ks_ref[...],
                                 full[i, j] == 1, cfg)
        lse = lse_ref[...]
        p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
        dp = jax.lax.dot_general(do_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32),
                                 (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - dl_ref[...])
        if softcap is not None:
            ds = ds * (1.0 - th * th)
        acc_sc[...] += jnp.dot(ds * scale, k_ref[...].astype(jnp.float32), preferred_element_type=jnp.float32)

    @pl.when(j == W - 1)
    def _():
        dq_ref[...] = acc_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(cnt, idx, full, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, cfg, bq, bkv, Y, Wt):
    jk, g, t = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    scale, softcap = cfg[2], cfg[3]

    @pl.when((g == 0) & (t == 0))
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(t < cnt[jk])
    def _():
        qpos, kpos = _positions(idx[jk, t], jk, bq, bkv)
        s, allowed, th = _logits(q_ref[...], k_ref[...], qpos, kpos, qs_ref[...], ks_ref[...],
                                 full[jk, t] == 1, cfg)
        lse = lse_ref[...]
        p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)  # [bq, bkv]
        do = do_ref[...].astype(jnp.float32)
        dv_sc[...] += jax.lax.dot_general(p, do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...].astype(jnp.float32), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - dl_ref[...])
        if softcap is not None:
            ds = ds * (1.0 - th * th)
        dk_sc[...] += jax.lax.dot_general(ds * scale, q_ref[...].astype(jnp.float32), (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)

    @pl.when((g == Y - 1) & (t == Wt - 1))
    def _():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(statics, res, dout):
    mask, S, scale, softcap, bq, bkv, interpret = statics
    q, k, v, qs, ks, out, lse = res
    qs, ks = _segments(qs, ks)
    B, H, Tp, E = q.shape
    K, Sp = k.shape[1], k.shape[2]
    Y = H // K
    sch = build_schedule(mask, Tp, Sp, bq, bkv)
    cfg = (mask, S, scale, softcap)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    tables = schedule_tables(sch.kv_count, sch.kv_index, sch.kv_full)
    W = sch.kv_index.shape[1]
    qspec, kvspec, qsspec, ksspec, lspec = _specs(Y, E, bq, bkv)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, bq=bq, bkv=bkv, W=W),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(B, H, Tp // bq, W),
            in_specs=[qspec, kvspec, kvspec, qsspec, ksspec, qspec, lspec, lspec], out_specs=qspec,
            scratch_shapes=[pltpu.VMEM((bq, E), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(*tables, q, k, v, qs, ks, dout, lse, delta)

    # dK/dV: kv-major over the transposed schedule; q head = kv head * Y + g.
    Wt = sch.q_index.shape[1]
    ix = lambda f: (lambda b, kh, jk, g, t, cnt, idx, full: f(b, kh, jk, g, t, idx))
    q_spec = pl.BlockSpec((None, None, bq, E), ix(lambda b, kh, jk, g, t, idx: (b, kh * Y + g, idx[jk, t], 0)))
    kv_spec = pl.BlockSpec((None, None, bkv, E), ix(lambda b, kh, jk, g, t, idx: (b, kh, jk, 0)))
    qs_spec = pl.BlockSpec((None, bq, 1), ix(lambda b, kh, jk, g, t, idx: (b, idx[jk, t], 0)))
    ks_spec = pl.BlockSpec((None, 1, bkv), ix(lambda b, kh, jk, g, t, idx: (b, 0, jk)))
    l_spec = pl.BlockSpec((None, None, bq, 1), ix(lambda b, kh, jk, g, t, idx: (b, kh * Y + g, idx[jk, t], 0)))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bkv=bkv, Y=Y, Wt=Wt),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(B, K, Sp // bkv, Y, Wt),
            in_specs=[q_spec, kv_spec, kv_spec, qs_spec, ks_spec, q_spec, l_spec, l_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bkv, E), jnp.float32), pltpu.VMEM((bkv, E), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
    )(*schedule_tables(sch.q_count, sch.q_index, sch.q_full), q, k, v, qs, ks, dout, lse, delta)
    return dq, dk, dv


_flash = custom_flash(_forward, _backward)


def attention_pallas_tpu(q, k, v, *, mask, segment_ids=None, scale=None, softcap=None,
                         block_sizes=(128, 128), return_lse=False, interpret=None, sinks=None):
    """``q [B,T,H,E]``, ``k/v [B,S,K,E]`` (, ``sinks [H]``) -> ``[B,T,H,E]`` (and lse ``[B,T,H]``)."""
    return call_tiled(_flash, "pallas_tpu", "tpu", q, k, v, mask=mask, segment_ids=segment_ids,
                      scale=scale, softcap=softcap, block_sizes=block_sizes, return_lse=return_lse,
                      interpret=interpret, sinks=sinks)
