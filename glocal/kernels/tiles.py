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
    allowed = (mask(qpos[:, None], kpos[None, :]) | full) & (kpos[None, :] < S) & (qseg[:, None] == kseg[None, :])
    return jnp.where(allowed, s, NEG), allowed, th


def positions(i, j_tile, bq, bkv):
    return (i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq,), 0),
            j_tile * bkv + jax.lax.broadcasted_iota(jnp.int32, (bkv,), 0))


def schedule_tables(count, index, full):
    """A schedule's (count, index, full) lists as device arrays for a kernel (flags as int32)."""
    return jnp.asarray(count), jnp.asarray(index), jnp.asarray(full.astype(np.int32))


def custom_flash(forward, backward):
    """``flash(q, k, v, q_seg, kv_seg, statics) -> (out, lse)`` differentiable in q, k, v.

    ``forward(q, k, v, qs, ks, statics) -> (out, lse)``; ``backward(statics, residuals,
    dout) -> (dq, dk, dv)`` with residuals ``(q, k, v, qs, ks, out, lse)``."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def flash(q, k, v, qs, ks, statics):
        return forward(q, k, v, qs, ks, statics)

    def fwd(q, k, v, qs, ks, statics):
        out, lse = forward(q, k, v, qs, ks, statics)
        return (out, lse), (q, k, v, qs, ks, out, lse)

    def bwd(statics, res, cts):
        dq, dk, dv = backward(statics, res, cts[0])  # the lse cotangent is ignored
        no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
        return dq, dk, dv, no_grad(res[3]), no_grad(res[4])

    flash.defvjp(fwd, bwd)
    return flash


def call_tiled(flash, impl: str, backend: str, q, k, v, *, mask, segment_ids, scale, softcap,
               block_sizes, return_lse, interpret, check=None):
    """``q [B,T,H,E]``, ``k/v [B,S,K,E]`` -> ``[B,T,H,E]`` (and lse ``[B,T,H]``) through a
    kernel that takes heads-major arrays padded to whole tiles. ``interpret=None`` runs the
    kernel natively only on ``backend``."""
    if not supports(mask):
        raise ValueError(f"impl={impl!r} needs a mask with an arithmetic predicate; Explicit "
                         f"masks run with impl='blockwise'.")
    B, T, H, E = q.shape
    S = k.shape[1]
    bq, bkv = min(block_sizes[0], T), min(block_sizes[1], S)
    if interpret is None:
        interpret = jax.default_backend() != backend
    if check is not None:
        check(bq, bkv, E, interpret)
    Tp, Sp = -(-T // bq) * bq, -(-S // bkv) * bkv
    if segment_ids is None:
        q_seg, kv_seg = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    else:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    heads_major = lambda x, n: jnp.swapaxes(pad(x, n), 1, 2)
    statics = (mask, S, E**-0.5 if scale is None else float(scale),
               None if softcap is None else float(softcap), bq, bkv, interpret)
    out, lse = flash(heads_major(q, Tp), heads_major(k, Sp), heads_major(v, Sp),
                     pad(q_seg.astype(jnp.int32), Tp), pad(kv_seg.astype(jnp.int32), Sp), statics)
    out = jnp.swapaxes(out, 1, 2)[:, :T]
    if not return_lse:
        return out
    lse = lse.reshape(lse.shape[:3])  # [B, H, Tp] (the TPU kernel keeps a trailing 1)
    return out, jnp.swapaxes(lse, 1, 2)[:, :T]
