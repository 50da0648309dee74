"""Mixers whose decoding state does not grow with the sequence: ``linear`` (Based's Taylor
linear attention, letter ``l``) and ``conv`` (a gated short causal convolution, BaseConv,
letter ``c``). Each owns a fixed-size cache: the linear-attention state ``(S, z)`` per kv
head, and the last ``W - 1`` inputs of the convolution.

    linear:  q = x W_q [H, F], k = x W_k [K, F], v = x W_v [K, E]  (no positions)
             o = linear_attention(q, k, v)  ->  y = o W_o
    conv:    [u, g] = x W_in + b  (inner width I = conv.expand * D each)
             y = (silu(causal_depthwise_conv_W(u) + b_c) * g) W_out + b_out
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.kernels.linear import (FEATURE_MAPS, LINEAR_IMPLEMENTATIONS, feature_dim, features, linear_attention,
                                  linear_attention_step)
from glocal.layers.cache import Cache
from glocal.layers.params import Bias, as_dtype, fan_in_init, param
from glocal.layers.spec import KindOptions, LayerSpec, register_mixer
from glocal.sharding import constrain

_zeros = lambda k, s, d: jnp.zeros(s, d)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearState(Cache):
    """Running sums of a linear-attention layer (float32): ``S = sum phi(k) v^T``,
    ``z = sum phi(k)`` per kv head."""

    S_BKJE: jax.Array
    z_BKJ: jax.Array

    def add(self, dS_BKJE, dz_BKJ, layer=None) -> "LinearState":
        if layer is None:
            return LinearState(self.S_BKJE + dS_BKJE, self.z_BKJ + dz_BKJ)
        return LinearState(self.S_BKJE.at[layer].add(dS_BKJE), self.z_BKJ.at[layer].add(dz_BKJ))

    def clear_rows(self, rows_B, layer=None) -> "LinearState":
        keep = (~rows_B).astype(jnp.float32)
        if layer is None:  # also right for a stack: [L, B, ...] broadcasts against [B, ...]
            return LinearState(self.S_BKJE * keep[:, None, None, None], self.z_BKJ * keep[:, None, None])
        return LinearState(self.S_BKJE.at[layer].multiply(keep[:, None, None, None]),
                           self.z_BKJ.at[layer].multiply(keep[:, None, None]))


@dataclasses.dataclass(frozen=True)
class LinearOptions(KindOptions):
    feature_dim: int = 16  # F: q/k features per head (Taylor state: 1 + F + F(F+1)/2 per kv head)
    feature_map: str = "taylor"  # taylor | elu | relu
    impl: str = "auto"  # auto (= chunked) | quadratic | chunked | pallas_tpu | pallas_gpu
    chunk_size: int = 64  # chunk length of the chunked and Pallas forms

    def validate(self, config=None) -> None:
        for name in ("feature_dim", "chunk_size"):
            if getattr(self, name) < 1:
                raise self.error(name, "must be a positive integer.")
        if self.feature_map not in FEATURE_MAPS:
            raise self.error("feature_map", f"is not one of {FEATURE_MAPS}.")
        if self.impl not in LINEAR_IMPLEMENTATIONS:
            raise self.error("impl", f"is not one of {LINEAR_IMPLEMENTATIONS}.")
        c = self.chunk_size
        if self.impl == "pallas_gpu" and (c & (c - 1) or c < 16):
            raise self.error("chunk_size", "must be a power of two >= 16 for impl='pallas_gpu' (Triton tiles).")


@register_mixer("linear", letter="l", options=LinearOptions,
                aliases={"feature_dim": "feature_dim", "feature_map": "feature_map", "linear_impl": "impl",
                         "linear_chunk_size": "chunk_size"})
class LinearAttention(nnx.Module):
    """Causal normalised linear attention (``glocal.kernels.linear``); state in float32."""

    packs_documents = False  # the state sums every earlier token
    bounded_cache = True  # a fixed-size state

    def __init__(self, spec: LayerSpec, options: LinearOptions, *, mask=None, rngs: nnx.Rngs):
        if mask is not None:
            raise ValueError("a 'linear' mixer is causal by construction; it takes no mask.")
        D, H, K, E, F = spec.d_model, spec.num_heads, spec.kv_heads, spec.head_size, options.feature_dim
        feature_dim(options.feature_map, F)  # checks the map's name
        self.num_heads, self.num_kv_heads, self.head_dim, self.feature_dim = H, K, E, F
        self.feature_map, self.dtype = options.feature_map, as_dtype(spec.dtype)
        self.impl, self.chunk_size = options.impl, options.chunk_size
        pd = spec.param_dtype
        self.q_DHF = param(rngs, fan_in_init(D), (D, H, F), ("embed", "heads", "feature"), pd)
        self.k_DKF = param(rngs, fan_in_init(D), (D, K, F), ("embed", "kv_heads", "feature"), pd)
        self.v_DKE = param(rngs, fan_in_init(D), (D, K, E), ("embed", "kv_heads", "head_dim"), pd)
        self.o_HED = param(rngs, fan_in_init(H * E), (H, E, D), ("heads", "head_dim", "embed"), pd)

    def _project(self, x_BTD):
        x = x_BTD.astype(self.dtype)
        proj = lambda w: jnp.einsum("btd,d...->bt...", x, w[...].astype(self.dtype))
        q = constrain(proj(self.q_DHF), ("batch", None, "heads_act", None))
        return q, proj(self.k_DKF), proj(self.v_DKE)

    def _out(self, o_BTHE):
        return jnp.einsum("bthe,hed->btd", o_BTHE.astype(self.dtype), self.o_HED[...].astype(self.dtype))

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, valid_BT=None):
        if segment_ids_BT is not None:
            raise ValueError("a 'linear' mixer cannot keep packed documents apart (its state sums every "
                             "earlier token); train such models on plain windows.")
        q, k, v = self._project(x_BTD)
        kw = dict(feature_map=self.feature_map)
        if cache is None:
            return self._out(linear_attention(q, k, v, impl=self.impl, chunk_size=self.chunk_size, **kw)), None
        state = (cache.S_BKJE, cache.z_BKJ)
        if x_BTD.shape[1] == 1:
            o, _ = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, **kw)
            o = o[:, None]
        else:  # right padding comes after every real token, so it never reaches their outputs
            o = linear_attention(q, k, v, initial_state=state, impl=self.impl, chunk_size=self.chunk_size, **kw)
        # Only real tokens enter the state.
        phik_BTKJ = features(k, self.feature_map)
        if valid_BT is not None:
            phik_BTKJ = phik_BTKJ * valid_BT[:, :, None, None]
        cache = cache.add(jnp.einsum("btkd,btke->bkde", phik_BTKJ, v.astype(jnp.float32)), phik_BTKJ.sum(1))
        return self._out(o), cache

    def init_cache(self, batch_size: int, max_len: int) -> LinearState:
        J = feature_dim(self.feature_map, self.feature_dim)
        K, E = self.num_kv_heads, self.head_dim
        return LinearState(jnp.zeros((batch_size, K, J, E), jnp.float32), jnp.zeros((batch_size, K, J), jnp.float32))

    def score_flops(self, seq_len: int) -> float:
        """Per token: the intra-chunk kernel (raw q k^T, weights x values, ~N/2 keys) per query
        head, the state read-out per query head and the state update per kv head."""
        N = min(64, seq_len)
        J = feature_dim(self.feature_map, self.feature_dim)
        H, K, E, F = self.num_heads, self.num_kv_heads, self.head_dim, self.feature_dim
        return H * ((N + 1) / 2 * 2 * (F + E) + 2 * J * (E + 1)) + K * 2 * J * (E + 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConvWindow(Cache):
    """The last ``W - 1`` convolution inputs of each row (oldest first)."""

    window_BWI: jax.Array

    def set(self, window_BWI, layer=None) -> "ConvWindow":
        if layer is None:
            return ConvWindow(window_BWI.astype(self.window_BWI.dtype))
        return ConvWindow(self.window_BWI.at[layer].set(window_BWI.astype(self.window_BWI.dtype)))

    def clear_rows(self, rows_B, layer=None) -> "ConvWindow":
        keep = (~rows_B).astype(self.window_BWI.dtype)[:, None, None]
        if layer is None:
            return ConvWindow(self.window_BWI * keep)
        return ConvWindow(self.window_BWI.at[layer].multiply(keep))


@dataclasses.dataclass(frozen=True)
class ConvOptions(KindOptions):
    width: int = 3  # W: taps of the causal depthwise convolution
    expand: int = 2  # inner width I = expand * d_model

    def validate(self, config=None) -> None:
        for name in ("width", "expand"):
            if getattr(self, name) < 1:
                raise self.error(name, "must be a positive integer.")


@register_mixer("conv", letter="c", options=ConvOptions, aliases={"conv_width": "width", "conv_expand": "expand"})
class ShortConv(nnx.Module):
    """Gated short causal convolution (BaseConv): local token mixing with a state of
    ``W - 1`` inputs; gives linear-attention layers (which carry no positions) order."""

    packs_documents = False  # its taps reach across a document boundary
    bounded_cache = True  # the last taps only

    def __init__(self, spec: LayerSpec, options: ConvOptions, *, mask=None, rngs: nnx.Rngs):
        if mask is not None:
            raise ValueError("a 'conv' mixer is causal by construction; it takes no mask.")
        D, W, I = spec.d_model, options.width, options.expand * spec.d_model  # noqa: E741
        self.width, self.inner, self.dtype = W, I, as_dtype(spec.dtype)
        pd = spec.param_dtype
        self.w_in_DAI = param(rngs, fan_in_init(D), (D, 2, I), ("embed", None, "mlp"), pd)
        self.b_in_AI = param(rngs, _zeros, (2, I), (None, "mlp"), pd, Bias)
        self.conv_WI = param(rngs, fan_in_init(W), (W, I), (None, "mlp"), pd)
        self.b_conv_I = param(rngs, _zeros, (I,), ("mlp",), pd, Bias)
        self.w_out_ID = param(rngs, fan_in_init(I), (I, D), ("mlp", "embed"), pd)
        self.b_out_D = param(rngs, _zeros, (D,), ("embed",), pd, Bias)

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, valid_BT=None):
        if segment_ids_BT is not None:
            raise ValueError("a 'conv' mixer cannot keep packed documents apart; train such models on plain "
                             "windows.")
        dt = self.dtype
        B, T, _ = x_BTD.shape
        W = self.width
        h_BTAI = jnp.einsum("btd,dai->btai", x_BTD.astype(dt), self.w_in_DAI[...].astype(dt)) + self.b_in_AI[...].astype(dt)
        u_BTI, g_BTI = h_BTAI[:, :, 0], h_BTAI[:, :, 1]
        past = jnp.zeros((B, W - 1, self.inner), dt) if cache is None else cache.window_BWI.astype(dt)
        seq_BSI = jnp.concatenate([past, u_BTI], axis=1)  # S = W - 1 + T
        kern = self.conv_WI[...].astype(dt)
        c_BTI = sum(seq_BSI[:, j:j + T] * kern[j] for j in range(W)) + self.b_conv_I[...].astype(dt)
        y_BTI = constrain(jax.nn.silu(c_BTI) * g_BTI, ("batch", None, "mlp_act"))
        y_BTD = jnp.einsum("bti,id->btd", y_BTI, self.w_out_ID[...].astype(dt)) + self.b_out_D[...].astype(dt)
        if cache is None:
            return y_BTD, None
        # Keep the W - 1 inputs ending at each row's last real token.
        n_B = jnp.full((B,), T, jnp.int32) if valid_BT is None else valid_BT.sum(1).astype(jnp.int32)
        idx_BW = n_B[:, None] + jnp.arange(W - 1)[None]
        window = jnp.take_along_axis(seq_BSI, idx_BW[:, :, None], axis=1)
        return y_BTD, cache.set(window)

    def init_cache(self, batch_size: int, max_len: int) -> ConvWindow:
        return ConvWindow(jnp.zeros((batch_size, self.width - 1, self.inner), self.dtype))

    def score_flops(self, seq_len: int) -> float:
        return 0.0  # the convolution's taps are parameters, counted with them
