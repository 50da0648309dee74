"""Rotary position embedding with explicit positions.

Positions are an argument, not implied by array index, so grouped models (FIT groups,
Block Transformer blocks) and caches can re-index tokens freely. Convention: the head
dimension is split in halves ``(x1, x2)`` and pair ``(x1[i], x2[i])`` is rotated by angle
``pos * theta ** (-2i / E)`` (the "rotate-half" layout used by Llama checkpoints).
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_angles(positions_BT, head_dim: int, theta: float = 10_000.0):
    """``[B, T, E/2]`` rotation angles in float32 (one per rotated pair)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return positions_BT.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x_BTHE, positions_BT, *, theta: float = 10_000.0):
    """Rotate ``x [B, T, H, E]`` by ``positions [B, T]`` (or ``[T]``); returns x's dtype."""
    if positions_BT.ndim == 1:
        positions_BT = positions_BT[None]
    E = x_BTHE.shape[-1]
    angles = rope_angles(positions_BT, E, theta)[:, :, None, :]  # [B, T, 1, E/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x = x_BTHE.astype(jnp.float32)
    x1, x2 = x[..., : E // 2], x[..., E // 2 :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTHE.dtype)
