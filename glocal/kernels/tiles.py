"""What the Pallas kernels (TPU and GPU) share: one tile's masked logits, the custom_vjp
wiring, and the public wrapper (padding to whole tiles, heads-major layout, segment ids).

The element mask is recomputed from absolute positions with the mask's own predicate, so
structured masks need no stored tiles; ``full`` tiles skip it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from glocal.kernels import masks as masks_lib
from glocal.kernels.platforms import native_or_interpreted
from glocal.sharding import per_shard, same_split

NEG = float(jnp.finfo(jnp.float32).min)


def supports(mask) -> bool:
    def walk(m):
        if isinstance(m, masks_lib.Explicit):
            return False
        return all(walk(c) for c in (getattr(m, "a", None), getattr(m, "b", None)) if c is not None)
    return walk(mask)


def tile_logits(q, k, qpos, kpos, qseg, kseg, full, cfg):
    """Scaled (capped) float32 logits of one tile, masked to NEG; also the mask and tanh."""
    mask, S, scale, softcap = cfg
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    th = None
    if softcap is not None:
        th = jnp.tanh(s / softcap)
        s = softcap * th
    # Segment ids arrive as vectors (GPU) or as a [bq, 1] column and a [1, bkv] row (TPU).
    qcol = qseg if qseg.ndim == 2 else qseg[:, None]
    krow = kseg if kseg.ndim == 2 else kseg[None, :]
    allowed = (mask(qpos[:, None], kpos[None, :]) | full) & (kpos[None, :] < S) & (qcol == krow)
    return jnp.where(allowed, s, NEG), allowed, th


def positions(i, j_tile, bq, bkv):
    return (i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq,), 0),
            j_tile * bkv + jax.lax.broadcasted_iota(jnp.int32, (bkv,), 0))


def schedule_tables(count, index, full):
    """A schedule's (count, index, full) lists as device arrays for a kernel (flags as int32)."""
    return jnp.asarray(count), jnp.asarray(index), jnp.asarray(full.astype(np.int32))


def custom_flash(forward, backward):
    """``flash(q, k, v, q_seg, kv_seg, sinks, statics) -> (out, lse)`` differentiable in q, k,
    v and the learned sinks ``[H]`` (None: none).

    ``forward(q, k, v, qs, ks, sinks, statics) -> (out, lse)``; ``backward(statics, residuals,
    dout) -> (dq, dk, dv)`` with residuals ``(q, k, v, qs, ks, out, lse)``: with sinks the
    lse includes them, so the backward kernels need nothing else, and the sinks' gradient
    ``-sum_{b,t} exp(sink - lse) sum_e dO O`` is reduced here in plain JAX."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def flash(q, k, v, qs, ks, sinks, statics):
        return forward(q, k, v, qs, ks, sinks, statics)

    def fwd(q, k, v, qs, ks, sinks, statics):
        out, lse = forward(q, k, v, qs, ks, sinks, statics)
        return (out, lse), (q, k, v, qs, ks, out, lse, sinks)

    def bwd(statics, res, cts):
        dout, sinks = cts[0], res[7]
        dq, dk, dv = backward(statics, res[:7], dout)  # the lse cotangent is ignored
        no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
        dsinks = None
        if sinks is not None:  # padded rows have dO = 0
            delta = jnp.sum(dout.astype(jnp.float32) * res[5].astype(jnp.float32), axis=-1)  # [B, H, Tp]
            lse = res[6].reshape(delta.shape)
            dsinks = -jnp.sum(jnp.exp(sinks[None, :, None] - lse) * delta, axis=(0, 2))
        return dq, dk, dv, no_grad(res[3]), no_grad(res[4]), dsinks

    flash.defvjp(fwd, bwd)
    return flash


def call_tiled(flash, impl: str, backend: str, q, k, v, *, mask, segment_ids, scale, softcap,
               block_sizes, return_lse, interpret, pow2_tiles=False, sinks=None):
    """``q [B,T,H,E]``, ``k/v [B,S,K,E]`` (, learned ``sinks [H]``) -> ``[B,T,H,E]`` (and lse
    ``[B,T,H]``) through a kernel that takes heads-major arrays padded to whole tiles
    (the sinks as float32 ``[H]``, split over heads like the queries). ``interpret=None``: native
    when lowered for ``backend``'s platform, interpreted on CPU (``glocal.kernels.platforms``).
    ``pow2_tiles`` (Triton): tiles and the head dim are powers of two, at least 16 (what
    ``tl.dot`` takes); short sequences and odd head dims are zero-padded up to them."""
    if not supports(mask):
        raise ValueError(f"impl={impl!r} needs a mask with an arithmetic predicate; Explicit "
                         f"masks run with impl='blockwise'.")
    B, T, H, E = q.shape
    S = k.shape[1]
    if pow2_tiles:
        p2 = lambda n: max(16, 1 << (int(n) - 1).bit_length())
        bq, bkv, Ep = min(p2(block_sizes[0]), p2(T)), min(p2(block_sizes[1]), p2(S)), p2(E)
    else:
        bq, bkv, Ep = min(block_sizes[0], T), min(block_sizes[1], S), E
    Tp, Sp = -(-T // bq) * bq, -(-S // bkv) * bkv
    if segment_ids is None:
        q_seg, kv_seg = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    else:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    # Zero head-dim padding changes no logit (the scale below uses the true E) and gives zero
    # output columns, sliced off.
    heads_major = lambda x, n: jnp.swapaxes(jnp.pad(pad(x, n), [(0, 0)] * 3 + [(0, Ep - E)]), 1, 2)

    def run(interpret_mode, *operands):
        statics = (mask, S, E**-0.5 if scale is None else float(scale),
                   None if softcap is None else float(softcap), bq, bkv, interpret_mode)
        return flash(*operands[:5], operands[5] if len(operands) > 5 else None, statics)

    # Rows and heads are independent: under a mesh the kernel runs per shard (shard_map),
    # since XLA cannot partition a Mosaic or Triton call itself.
    # Query and kv heads split over the same axes, or not at all (GQA pairs them locally).
    heads = "heads_act" if same_split("heads_act", H, k.shape[2]) else None
    qn, kn, sn = ("batch", heads), ("batch", heads), ("batch",)
    operands = (heads_major(q, Tp), heads_major(k, Sp), heads_major(v, Sp),
                pad(q_seg.astype(jnp.int32), Tp), pad(kv_seg.astype(jnp.int32), Sp))
    names = (qn, kn, kn, sn, sn)
    if sinks is not None:
        operands, names = operands + (jnp.asarray(sinks, jnp.float32),), names + ((heads,),)
    out, lse = per_shard(
        lambda *ops: native_or_interpreted(backend, run, *ops, interpret=interpret),
        operands, names, (qn, qn))
    out = jnp.swapaxes(out, 1, 2)[:, :T, :, :E]
    if not return_lse:
        return out
    lse = lse.reshape(lse.shape[:3])  # [B, H, Tp] (the TPU kernel keeps a trailing 1)
    return out, jnp.swapaxes(lse, 1, 2)[:, :T]
