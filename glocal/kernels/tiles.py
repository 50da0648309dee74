"""Tile math shared by the Pallas kernels (TPU and GPU): one tile's masked logits.

The element mask is recomputed from absolute positions with the mask's own predicate, so
structured masks need no stored tiles; ``full`` tiles skip it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
