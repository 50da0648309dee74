"""Feed-forward kinds for decoder layers: ``mlp`` (dense; the activation is ``spec.mlp``) and
``none`` (no FFN: a mixer-only layer, as in the MQAR recall models). Mixture-of-experts
registers the same way (``glocal.layers.moe``). Every FFN returns ``(y_BTD, aux)``."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from glocal.layers.mlp import MLP
from glocal.layers.spec import LayerSpec, register_ffn


@register_ffn("mlp")
class DenseFFN(MLP):
    def __init__(self, spec: LayerSpec, options: None = None, *, rngs: nnx.Rngs):
        super().__init__(spec.d_model, spec.d_ff, activation=spec.mlp, dtype=spec.dtype,
                         param_dtype=spec.param_dtype, alpha=spec.swiglu_alpha, limit=spec.swiglu_limit, rngs=rngs)

    def __call__(self, x_BTD):
        return super().__call__(x_BTD), {}


@register_ffn("none")
class NoFFN(nnx.Module):
    """Adds nothing: the layer is ``x + mixer(norm(x))`` alone."""

    def __init__(self, spec: LayerSpec, options: None = None, *, rngs: nnx.Rngs):
        del spec, options, rngs

    def __call__(self, x_BTD):
        return jnp.zeros_like(x_BTD), {}
