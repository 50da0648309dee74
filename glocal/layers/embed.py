"""Token embedding and the output head (optionally tied to the embedding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.layers.params import Embedding, as_dtype, fan_in_init, param


class Embed(nnx.Module):
    """Lookup ``tokens [B, T] -> [B, T, D]``; ``attend`` gives tied logits ``[B, T, V]``."""

    def __init__(self, vocab_size: int, d_model: int, *, init_std: float = 0.02, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        self.dtype = as_dtype(dtype)
        init = lambda k, s, d: init_std * jax.random.normal(k, s, d)
        self.table_VD = param(rngs, init, (vocab_size, d_model), ("vocab", "embed"), param_dtype, Embedding)

    def __call__(self, tokens_BT):
        return jnp.take(self.table_VD[...], tokens_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD):
        """Tied output head: logits = x @ table^T (float32 accumulation)."""
        table = self.table_VD[...].astype(self.dtype)
        return jnp.einsum("btd,vd->btv", x_BTD, table, preferred_element_type=jnp.float32)


class Unembed(nnx.Module):
    """Untied output head ``[B, T, D] -> [B, T, V]`` with float32 logits."""

    def __init__(self, d_model: int, vocab_size: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = as_dtype(dtype)
        self.w_DV = param(rngs, fan_in_init(d_model), (d_model, vocab_size), ("embed", "vocab"),
                          param_dtype)

    def __call__(self, x_BTD):
        w = self.w_DV[...].astype(self.dtype)
        return jnp.einsum("btd,dv->btv", x_BTD, w, preferred_element_type=jnp.float32)
