"""Normalisation layers; statistics are always computed in float32."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from glocal.layers.params import Bias, Scale, as_dtype, param


NORMS = ("rms", "layer", "rms_centered")


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis (no mean subtraction, no bias).

    ``zero_centered``: the stored ``scale`` is an offset ``w`` initialised to 0 and the gain is
    ``1 + w`` (Qwen3-Next's norms): weight decay then pulls the gain toward 1, not 0, and
    checkpoints that store ``w`` import bit for bit."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis: str = "embed", zero_centered: bool = False,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # ``axis`` is the logical name of the normalised dimension: "embed" for the model
        # width, "head_dim" for per-head qk-norm (whose scale must not shard like a width).
        self.eps = eps
        self.dtype = as_dtype(dtype)
        self.zero_centered = zero_centered
        init = jnp.zeros if zero_centered else jnp.ones
        self.scale = param(rngs, lambda k, s, d: init(s, d), (dim,), (axis,), param_dtype, Scale)

    def __call__(self, x_BTD):
        x = x_BTD.astype(jnp.float32)
        x = x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))
        gain = self.scale[...].astype(jnp.float32)
        if self.zero_centered:
            gain = 1.0 + gain
        return (x * gain).astype(self.dtype)


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
    """``"rms"``, ``"layer"`` or ``"rms_centered"`` (RMSNorm with gain ``1 + scale``): the norm a config names."""
    if kind in ("rms", "rms_centered"):
        return RMSNorm(dim, eps=eps, zero_centered=kind == "rms_centered", dtype=dtype, rngs=rngs)
    if kind == "layer":
        return LayerNorm(dim, eps=eps, dtype=dtype, rngs=rngs)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}.")


def make_head_norm(kind: str, dim: int, *, eps: float, dtype, rngs: nnx.Rngs) -> RMSNorm:
    """Per-head qk-norm for a model whose norms are ``kind``: always an RMSNorm (sharded as
    ``head_dim``), zero-centred when the model's norms are (``"rms_centered"``)."""
    return RMSNorm(dim, eps=eps, axis="head_dim", zero_centered=kind == "rms_centered", dtype=dtype, rngs=rngs)
