"""Gated DeltaNet, the linear-attention mixer of Qwen3-Next (``gated_delta``, letter ``d``).

A fixed-size state per value head, written by the gated delta rule (``glocal.kernels.delta``)::

    [q | k | v | z] = x W_in     (grouped per key head: q, k [K, F]; v, z [Y E] -> [H, E])
    [b | a]         = x W_ba     ([H] each)
    q, k, v  <- silu(causal depthwise conv_W([q, k, v]))           (no bias)
    beta = sigmoid(b),  g = -exp(A_log) softplus(a + dt_bias)      (log decay, float32)
    o = gated_delta_rule(l2(q) / sqrt(F), l2(k), v, g, beta)       (state S [H, F, E] in float32)
    y = (rmsnorm_E(o) * w_norm * silu(z)) W_out

Value head ``h`` reads the q/k of key head ``h // Y``. The decoding cache holds the last
``W - 1`` convolution inputs and ``S``: its size does not depend on the sequence length.
Letters as in the package legend: K key heads, H value (= output) heads, Y = H / K, F key head
width, E value head width, W convolution taps, I the convolution's channels (2 K F + H E).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glocal.kernels.delta import DELTA_IMPLEMENTATIONS, gated_delta_rule, gated_delta_step
from glocal.layers.cache import Cache
from glocal.layers.params import Bias, Scale, as_dtype, fan_in_init, param
from glocal.layers.spec import KindOptions, LayerSpec, register_mixer
from glocal.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GatedDeltaState(Cache):
    """The last ``W - 1`` convolution inputs (oldest first) and the delta-rule state (float32)."""

    conv_BWI: jax.Array
    S_BHFE: jax.Array

    def set(self, conv_BWI, S_BHFE, layer=None) -> "GatedDeltaState":
        conv_BWI = conv_BWI.astype(self.conv_BWI.dtype)
        if layer is None:
            return GatedDeltaState(conv_BWI, S_BHFE)
        return GatedDeltaState(self.conv_BWI.at[layer].set(conv_BWI), self.S_BHFE.at[layer].set(S_BHFE))

    def clear_rows(self, rows_B, layer=None) -> "GatedDeltaState":
        keep = ~rows_B
        conv = keep.astype(self.conv_BWI.dtype)[:, None, None]
        state = keep.astype(jnp.float32)[:, None, None, None]
        if layer is None:  # also right for a stack: [L, B, ...] broadcasts against [B, ...]
            return GatedDeltaState(self.conv_BWI * conv, self.S_BHFE * state)
        return GatedDeltaState(self.conv_BWI.at[layer].multiply(conv), self.S_BHFE.at[layer].multiply(state))


@dataclasses.dataclass(frozen=True)
class GatedDeltaOptions(KindOptions):
    key_heads: int | None = None  # K (None: the model's num_kv_heads)
    value_heads: int | None = None  # H, a multiple of K (None: the model's num_heads)
    key_dim: int | None = None  # F (None: the model's head size)
    value_dim: int | None = None  # E (None: the model's head size)
    conv_width: int = 4  # W: taps of the short convolution on q, k, v
    chunk_size: int = 64  # chunk length of the chunked form
    impl: str = "auto"  # auto (= chunked) | chunked | recurrent
    norm_eps: float = 1e-6  # of the gated output RMSNorm

    def validate(self, config=None) -> None:
        for name in ("key_heads", "value_heads", "key_dim", "value_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise self.error(name, "must be a positive integer (or None for the model's attention shape).")
        for name in ("conv_width", "chunk_size"):
            if getattr(self, name) < 1:
                raise self.error(name, "must be a positive integer.")
        if self.impl not in DELTA_IMPLEMENTATIONS:
            raise self.error("impl", f"is not one of {DELTA_IMPLEMENTATIONS}.")
        if self.key_heads and self.value_heads and self.value_heads % self.key_heads:
            raise self.error("value_heads", f"must be a multiple of gated_delta.key_heads={self.key_heads} "
                                            f"(each key head serves value_heads / key_heads value heads).")

    def shape(self, spec: LayerSpec) -> tuple[int, int, int, int]:
        """``(K, H, F, E)`` for a layer of ``spec``."""
        K = self.key_heads or spec.kv_heads
        H = self.value_heads or spec.num_heads
        if H % K:
            raise ValueError(f"gated_delta: value heads ({H}) must be a multiple of key heads ({K}); set "
                             f"gated_delta.key_heads / gated_delta.value_heads.")
        return K, H, self.key_dim or spec.head_size, self.value_dim or spec.head_size


def _a_log_init(key, shape, dtype):
    # Decay rates A ~ U(1, 16) (fla's Gated DeltaNet draws U(0, 16)); stored as log A.
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key, shape, dtype):
    # Time steps log-uniform in [1e-3, 0.1], stored through softplus^-1 (as fla initialises them).
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, np.log(1e-3), np.log(0.1)))
    return dt + jnp.log(-jnp.expm1(-dt))


@register_mixer("gated_delta", letter="d", options=GatedDeltaOptions)
class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet as Qwen3-Next defines it (``Qwen3NextGatedDeltaNet``); a fixed-size cache."""

    packs_documents = False  # the state runs across document boundaries
    bounded_cache = True  # a fixed-size state and convolution window

    def __init__(self, spec: LayerSpec, options: GatedDeltaOptions, *, mask=None, rngs: nnx.Rngs):
        if mask is not None:
            raise ValueError("a 'gated_delta' mixer is causal by construction; it takes no mask.")
        D = spec.d_model
        K, H, F, E = options.shape(spec)
        Y, W = H // K, options.conv_width
        self.K, self.H, self.F, self.E, self.Y, self.W = K, H, F, E, Y, W
        self.impl, self.chunk_size, self.norm_eps = options.impl, options.chunk_size, options.norm_eps
        self.dtype = as_dtype(spec.dtype)
        pd = spec.param_dtype
        # Projections grouped per key head (as Hugging Face stores them): sharding the key-head axis
        # hands a device whole groups, its q/k head with the Y value heads that read it.
        self.in_DKA = param(rngs, fan_in_init(D), (D, K, 2 * F + 2 * Y * E), ("embed", "kv_heads", None), pd)
        self.ba_DKA = param(rngs, fan_in_init(D), (D, K, 2 * Y), ("embed", "kv_heads", None), pd)
        self.conv_q_WKF = param(rngs, fan_in_init(W), (W, K, F), (None, "kv_heads", "feature"), pd)
        self.conv_k_WKF = param(rngs, fan_in_init(W), (W, K, F), (None, "kv_heads", "feature"), pd)
        self.conv_v_WHE = param(rngs, fan_in_init(W), (W, H, E), (None, "heads", "head_dim"), pd)
        # Decay parameters: rates, not weights, so no weight decay (the Bias type says so to the optimizer).
        self.A_log_H = param(rngs, _a_log_init, (H,), ("heads",), jnp.float32, Bias)
        self.dt_bias_H = param(rngs, _dt_bias_init, (H,), ("heads",), jnp.float32, Bias)
        self.norm_E = param(rngs, lambda k, s, d: jnp.ones(s, d), (E,), ("head_dim",), pd, Scale)
        self.o_HED = param(rngs, fan_in_init(H * E), (H, E, D), ("heads", "head_dim", "embed"), pd)

    @property
    def conv_channels(self) -> int:
        return 2 * self.K * self.F + self.H * self.E

    def _conv_kernel_WI(self):
        W = self.W
        parts = (self.conv_q_WKF, self.conv_k_WKF, self.conv_v_WHE)
        return jnp.concatenate([p[...].reshape(W, -1) for p in parts], axis=1).astype(self.dtype)

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, valid_BT=None):
        if segment_ids_BT is not None:
            raise ValueError("a 'gated_delta' mixer cannot keep packed documents apart (its state runs across "
                             "them); train such models on plain windows.")
        dt, (B, T, _) = self.dtype, x_BTD.shape
        K, H, F, E, Y, W = self.K, self.H, self.F, self.E, self.Y, self.W
        x = x_BTD.astype(dt)
        p_BTKA = jnp.einsum("btd,dka->btka", x, self.in_DKA[...].astype(dt))
        q_BTKF, k_BTKF = p_BTKA[..., :F], p_BTKA[..., F:2 * F]
        v_BTHE = p_BTKA[..., 2 * F:2 * F + Y * E].reshape(B, T, H, E)
        z_BTHE = p_BTKA[..., 2 * F + Y * E:].reshape(B, T, H, E)
        ba_BTKA = jnp.einsum("btd,dka->btka", x, self.ba_DKA[...].astype(dt)).astype(jnp.float32)
        b_BTH, a_BTH = ba_BTKA[..., :Y].reshape(B, T, H), ba_BTKA[..., Y:].reshape(B, T, H)

        # Short causal convolution over [all q heads | all k heads | all v heads] channels.
        u_BTI = jnp.concatenate([q_BTKF.reshape(B, T, K * F), k_BTKF.reshape(B, T, K * F),
                                 v_BTHE.reshape(B, T, H * E)], axis=-1)
        past_BWI = (jnp.zeros((B, W - 1, self.conv_channels), dt) if cache is None else cache.conv_BWI.astype(dt))
        seq_BSI = jnp.concatenate([past_BWI, u_BTI], axis=1)  # S = W - 1 + T
        kern_WI = self._conv_kernel_WI()
        c_BTI = jax.nn.silu(sum(seq_BSI[:, j:j + T] * kern_WI[j] for j in range(W)))
        q_BTKF = c_BTI[..., :K * F].reshape(B, T, K, F)
        k_BTKF = c_BTI[..., K * F:2 * K * F].reshape(B, T, K, F)
        v_BTHE = constrain(c_BTI[..., 2 * K * F:].reshape(B, T, H, E), ("batch", None, "heads_act", None))

        beta_BTH = jax.nn.sigmoid(b_BTH)
        g_BTH = -jnp.exp(self.A_log_H[...]) * jax.nn.softplus(a_BTH + self.dt_bias_H[...])
        if valid_BT is not None:  # padding neither writes (beta = 0) nor decays (g = 0) the state
            beta_BTH = jnp.where(valid_BT[..., None], beta_BTH, 0.0)
            g_BTH = jnp.where(valid_BT[..., None], g_BTH, 0.0)

        if cache is None:
            o_BTHE = gated_delta_rule(q_BTKF, k_BTKF, v_BTHE, g_BTH, beta_BTH, impl=self.impl,
                                      chunk_size=self.chunk_size)
            return self._out(o_BTHE, z_BTHE), None
        if T == 1:
            o_BHE, S_BHFE = gated_delta_step(q_BTKF[:, 0], k_BTKF[:, 0], v_BTHE[:, 0], g_BTH[:, 0], beta_BTH[:, 0],
                                             cache.S_BHFE)
            o_BTHE = o_BHE[:, None]
        else:
            o_BTHE, S_BHFE = gated_delta_rule(q_BTKF, k_BTKF, v_BTHE, g_BTH, beta_BTH, impl=self.impl,
                                              chunk_size=self.chunk_size, initial_state=cache.S_BHFE,
                                              return_state=True)
        # Keep the W - 1 convolution inputs ending at each row's last real token.
        n_B = jnp.full((B,), T, jnp.int32) if valid_BT is None else valid_BT.sum(1).astype(jnp.int32)
        idx_BW = n_B[:, None] + jnp.arange(W - 1)[None]
        window_BWI = jnp.take_along_axis(seq_BSI, idx_BW[:, :, None], axis=1)
        return self._out(o_BTHE, z_BTHE), cache.set(window_BWI, S_BHFE)

    def _out(self, o_BTHE, z_BTHE):
        """Gated RMSNorm per value head (plain scale, shared by the heads), then the output projection."""
        o = o_BTHE.astype(jnp.float32)
        o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + self.norm_eps)
        y_BTHE = (o * self.norm_E[...].astype(jnp.float32) * jax.nn.silu(z_BTHE.astype(jnp.float32))).astype(self.dtype)
        return jnp.einsum("bthe,hed->btd", y_BTHE, self.o_HED[...].astype(self.dtype))

    def init_cache(self, batch_size: int, max_len: int) -> GatedDeltaState:
        return GatedDeltaState(jnp.zeros((batch_size, self.W - 1, self.conv_channels), self.dtype),
                               jnp.zeros((batch_size, self.H, self.F, self.E), jnp.float32))

    def score_flops(self, seq_len: int) -> float:
        """Per token and value head in the chunked form (chunks of N): ``k k^T`` and ``q k^T``
        inside the chunk (2 N F each: the kernel computes the whole square), the triangular
        solve's products with values and keys (N (E + F)), the intra-chunk output (2 N E), the
        state read-out and correction (4 F E) and the state update (2 F E)."""
        N, F, E = self.chunk_size, self.F, self.E
        padded = -(-seq_len // N) * N / seq_len  # the kernel pads the sequence to whole chunks
        return padded * self.H * (4 * N * F + N * (E + F) + 2 * N * E + 6 * F * E)
