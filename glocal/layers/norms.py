"""Normalisation layers; statistics are always computed in float32."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from glocal.layers.params import Bias, Scale, as_dtype, param


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis (no mean subtraction, no bias)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis: str = "embed", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        # ``axis`` is the logical name of the normalised dimension: "embed" for the model
        # width, "head_dim" for per-head qk-norm (whose scale must not shard like a width).
        self.eps = eps
        self.dtype = as_dtype(dtype)
        self.scale = param(rngs, lambda k, s, d: jnp.ones(s, d), (dim,), (axis,), param_dtype, Scale)

    def __call__(self, x_BTD):
        x = x_BTD.astype(jnp.float32)
        x = x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """``(x - mean) / std * scale + bias`` over the last axis."""

    def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = as_dtype(dtype)
        self.scale = param(rngs, lambda k, s, d: jnp.ones(s, d), (dim,), ("embed",), param_dtype, Scale)
        self.bias = (
            param(rngs, lambda k, s, d: jnp.zeros(s, d), (dim,), ("embed",), param_dtype, Bias)
            if use_bias else None
        )

    def __call__(self, x_BTD):
        x = x_BTD.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps)) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


def make_norm(kind: str, dim: int, *, eps: float, dtype, rngs: nnx.Rngs) -> nnx.Module:
    """``"rms"`` or ``"layer"``: the norm a config names."""
    if kind == "rms":
        return RMSNorm(dim, eps=eps, dtype=dtype, rngs=rngs)
    if kind == "layer":
        return LayerNorm(dim, eps=eps, dtype=dtype, rngs=rngs)
    raise ValueError(f"unknown norm {kind!r}; choose 'rms' or 'layer'.")
