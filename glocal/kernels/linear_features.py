"""The feature maps of linear attention, shared by the pure-JAX forms (``glocal.kernels.linear``)
and the Pallas kernels (``glocal.kernels.linear_pallas_common``); see ``glocal.kernels.linear``
for what each map computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FEATURE_MAPS = ("taylor", "elu", "relu")


def feature_dim(feature_map: str, F: int) -> int:
    """Features per head in the state: ``1 + F + F (F + 1) / 2`` for taylor, else F."""
    check_map(feature_map)
    return 1 + F + F * (F + 1) // 2 if feature_map == "taylor" else F


def features(x_F, feature_map: str):
    """``phi(x)`` over the last axis (float32): ``phi(q) . phi(k) = w(q, k)``."""
    check_map(feature_map)
    x = x_F.astype(jnp.float32)
    if feature_map == "elu":
        return jax.nn.elu(x) + 1.0
    if feature_map == "relu":
        return jax.nn.relu(x)
    F = x.shape[-1]
    i, j = np.triu_indices(F)
    pair_scale = np.where(i == j, 1.0, np.sqrt(2.0)) / np.sqrt(2.0 * F)
    pairs = x[..., i] * x[..., j] * pair_scale.astype(np.float32)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x / F**0.25, pairs], axis=-1)


def full_taylor_features(x_F):
    """The uncompressed expansion ``[1, x / F^(1/4), vec(x x^T) / sqrt(2 F)]`` (1 + F + F^2
    features); only to test that the symmetric one gives the same inner products."""
    x = x_F.astype(jnp.float32)
    F = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], F * F)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x / F**0.25, outer / np.sqrt(2.0 * F)], axis=-1)


def check_map(feature_map: str) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; choose one of {FEATURE_MAPS}.")
