"""Feed-forward kinds for decoder layers: ``mlp`` (dense; the activation is ``spec.mlp``).
Mixture-of-experts registers here the same way (see ``glocal.layers.spec``)."""

from __future__ import annotations

from flax import nnx

from glocal.layers.mlp import MLP
from glocal.layers.spec import LayerSpec, register_ffn


@register_ffn("mlp")
class DenseFFN(MLP):
    def __init__(self, spec: LayerSpec, *, rngs: nnx.Rngs):
        super().__init__(spec.d_model, spec.d_ff, activation=spec.mlp, dtype=spec.dtype,
                         param_dtype=spec.param_dtype, rngs=rngs)
