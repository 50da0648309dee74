"""Feed-forward blocks: SwiGLU / GeGLU / clamped SwiGLU (gated) and GELU / ReLU (plain two-layer).

``swiglu_clamped`` (GPT-OSS's experts): with gate ``g`` and up ``u``, ``g = min(g, limit)``,
``u = clip(u, -limit, limit)``, ``h = (u + 1) g sigmoid(alpha g)`` (alpha 1.702, limit 7: the
sigmoid form of GELU on the gate, clamped, and a +1 on the linear branch).

Letters: I hidden width, A the fused input projections (gate and up: A = 2; plain: A = 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.sharding import constrain
from glocal.layers.params import as_dtype, fan_in_init, param
from glocal.layers.split import split_parts

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "swiglu_clamped")
GATED = ("swiglu", "geglu", "swiglu_clamped")  # two fused input projections (A = 2)


def activate(h_AI, activation: str, *, alpha: float = 1.702, limit: float = 7.0):
    """The hidden activations from the fused input projections ``[..., A, I]`` (gate and up
    for the gated forms): ``[..., I]``. Dense MLPs and experts share it. ``alpha`` and
    ``limit``: ``swiglu_clamped`` only."""
    if activation not in GATED:
        return (jax.nn.gelu if activation == "gelu" else jax.nn.relu)(h_AI[..., 0, :])
    # (split_parts: its gradient is one concatenation; slicing's pads both halves and adds them)
    g, u = (jnp.squeeze(p, -2) for p in split_parts(h_AI, -2, (1, 1)))
    if activation == "swiglu_clamped":
        g = jnp.minimum(g, limit)
        u = jnp.clip(u, -limit, limit)
        return (u + 1) * (g * jax.nn.sigmoid(alpha * g))
    return (jax.nn.silu(g) if activation == "swiglu" else jax.nn.gelu(g)) * u


class MLP(nnx.Module):
    """``swiglu``: ``(silu(x Wg) * x Wu) Wo``; ``gelu``/``relu``: ``act(x Wi) Wo``."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "swiglu", dtype=None,
                 param_dtype=jnp.float32, alpha: float = 1.702, limit: float = 7.0, rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown MLP activation {activation!r}; choose one of {ACTIVATIONS}.")
        self.activation, self.alpha, self.limit = activation, alpha, limit
        self.dtype = as_dtype(dtype)
        self.gated = activation in GATED
        n_in = 2 if self.gated else 1
        # Gate and up projections share one kernel [D, 2, I]: one matmul instead of two.
        self.wi_DAI = param(rngs, fan_in_init(d_model), (d_model, n_in, d_ff),
                            ("embed", None, "mlp"), param_dtype)
        self.wo_ID = param(rngs, fan_in_init(d_ff), (d_ff, d_model), ("mlp", "embed"), param_dtype)

    def __call__(self, x_BTD):
        B, T, D = x_BTD.shape
        A, I = self.wi_DAI.shape[1:]  # noqa: E741 - I is the legend's FFN width
        # Flattened 2-D matmuls: XLA:CPU runs these faster than the equivalent 4-D einsum.
        flat = x_BTD.astype(self.dtype).reshape(B * T, D)  # [(B T), D]
        h_BTAI = (flat @ self.wi_DAI[...].astype(self.dtype).reshape(D, A * I)).reshape(B, T, A, I)
        h_BTI = activate(h_BTAI, self.activation, alpha=self.alpha, limit=self.limit)
        h_BTI = constrain(h_BTI, ("batch", None, "mlp_act"))  # tensor parallel: hidden split
        return (h_BTI.reshape(B * T, I) @ self.wo_ID[...].astype(self.dtype)).reshape(B, T, D)
