"""Feed-forward blocks: SwiGLU (gated) and GELU (plain two-layer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.sharding import constrain
from glocal.layers.params import as_dtype, fan_in_init, param

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")


class MLP(nnx.Module):
    """``swiglu``: ``(silu(x Wg) * x Wu) Wo``; ``gelu``/``relu``: ``act(x Wi) Wo``."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "swiglu", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown MLP activation {activation!r}; choose one of {ACTIVATIONS}.")
        self.activation = activation
        self.dtype = as_dtype(dtype)
        self.gated = activation in ("swiglu", "geglu")
        n_in = 2 if self.gated else 1
        # Gate and up projections share one kernel [D, 2, F]: one matmul instead of two.
        self.wi_DCF = param(rngs, fan_in_init(d_model), (d_model, n_in, d_ff),
                            ("embed", None, "mlp"), param_dtype)
        self.wo_FD = param(rngs, fan_in_init(d_ff), (d_ff, d_model), ("mlp", "embed"), param_dtype)

    def __call__(self, x_BTD):
        B, T, D = x_BTD.shape
        C, F = self.wi_DCF.shape[1:]
        # Flattened 2-D matmuls: XLA:CPU runs these faster than the equivalent 4-D einsum.
        x_ND = x_BTD.astype(self.dtype).reshape(B * T, D)
        h_BTCF = (x_ND @ self.wi_DCF[...].astype(self.dtype).reshape(D, C * F)).reshape(B, T, C, F)
        if self.activation == "swiglu":
            h_BTF = jax.nn.silu(h_BTCF[:, :, 0]) * h_BTCF[:, :, 1]
        elif self.activation == "geglu":
            h_BTF = jax.nn.gelu(h_BTCF[:, :, 0]) * h_BTCF[:, :, 1]
        elif self.activation == "gelu":
            h_BTF = jax.nn.gelu(h_BTCF[:, :, 0])
        else:
            h_BTF = jax.nn.relu(h_BTCF[:, :, 0])
        h_BTF = constrain(h_BTF, ("batch", None, "mlp_act"))  # tensor parallel: hidden split
        return (h_BTF.reshape(B * T, F) @ self.wo_FD[...].astype(self.dtype)).reshape(B, T, D)
