"""Multi-head attention with grouped kv heads, for self- and cross-attention.

The layer owns the projections and RoPE; the attention itself is
``glocal.kernels.attention`` with a mask object, so a config switches implementations
(einsum, ``jax.nn.dot_product_attention``, block-sparse kernels) without touching models.

Three ways to call it, each returning ``(y_BTD, cache)`` (``cache`` None when none was given):
* ``attn(x_BTD)``: self-attention over the sequence (training / teacher forcing);
* ``attn(x_BTD, kv_BSD=memory)``: cross-attention, queries from x, keys/values from memory
  (a layer built with ``kv_dim=`` stores its query and key/value kernels apart; a
  self-attention layer stores one fused ``qkv`` kernel);
* ``attn(x_BTD, positions_BT=..., cache=c)``: attend to the cached tokens plus the new
  chunk and return the updated cache (prefill and decode).
The pieces (``project_q``, ``project_kv``, ``attend``, ``gate_output``, ``project_out``) are
public so models with their own cache layouts (FIT latents, block decoders) can reuse them.

Qwen3-Next options: ``rope_fraction`` (RoPE on the first ``int(E * fraction)`` dims of each
head), ``norm="rms_centered"`` (zero-centred qk-norm, gain ``1 + scale``) and ``output_gate``
(self-attention only: ``o * sigmoid(x gate_DHE)`` per head before the output projection).
GPT-OSS option: ``sinks`` (a learned logit per query head, ``sinks_H``, added to every
softmax denominator as ``exp(sink)``); GPT-OSS also has ``out_bias`` (``o_b_D``, a bias on the
output projection) beside the q/k/v biases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glocal import kernels
from glocal.kernels import masks as masks_lib
from glocal.kernels.dense import allowed_pairs, dense_attention
from glocal.layers.cache import KVCache
from glocal.layers.norms import make_head_norm
from glocal.sharding import constrain
from glocal.layers.params import Bias, as_dtype, fan_in_init, named_param, param
from glocal.layers.rope import RopeScaling, apply_rope, rotary_dim
from glocal.layers.split import split_parts
from glocal.layers.streaming import attend_moved_sinks, check_rope_positions, query_cache_positions


class Attention(nnx.Module):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        mask: masks_lib.Mask = masks_lib.Causal(),
        kv_dim: int | None = None,
        rope_theta: float | None = 10_000.0,
        rope_scaling: RopeScaling | None = None,
        softcap: float | None = None,
        qk_norm: bool = False,
        qkv_bias: bool = False,
        norm: str = "rms",
        norm_eps: float = 1e-6,
        rope_fraction: float = 1.0,
        output_gate: bool = False,
        out_bias: bool = False,
        sinks: bool = False,
        rope_positions: str = "absolute",
        impl: str = "auto",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(
                    f"d_model ({d_model}) is not divisible by num_heads ({num_heads}); pick "
                    f"num_heads dividing d_model or pass head_dim explicitly."
                )
            head_dim = d_model // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}); "
                f"e.g. use num_kv_heads in {[k for k in range(1, num_heads + 1) if num_heads % k == 0]}."
            )
        if impl not in kernels.IMPLEMENTATIONS:
            raise ValueError(f"unknown attention impl {impl!r}; choose one of {kernels.IMPLEMENTATIONS}.")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.mask, self.rope_theta, self.softcap, self.impl = mask, rope_theta, softcap, impl
        self.rope_scaling = rope_scaling
        check_rope_positions(rope_positions)
        if rope_positions == "cache" and (mask.sink_window is None or rope_theta is None or kv_dim is not None):
            raise ValueError("rope_positions='cache' (StreamingLLM re-positioning) is for self-attention with RoPE "
                             "and a window-plus-sinks mask (SlidingWindow(w) | Sinks(n)); this layer has "
                             f"mask={mask!r}, rope_theta={rope_theta}, kv_dim={kv_dim}.")
        self.rope_positions = rope_positions
        self.dtype = as_dtype(dtype)
        self.cross = kv_dim is not None
        if output_gate and self.cross:
            raise ValueError("output_gate (attn_output_gate) is for self-attention layers; this one has kv_dim.")
        # None = rotate the whole head (the original code path, bit for bit).
        self.rotary_dim = None if rope_fraction == 1.0 else rotary_dim(head_dim, rope_fraction)
        kv_dim = d_model if kv_dim is None else kv_dim
        H, K, E = num_heads, num_kv_heads, head_dim
        q = fan_in_init(d_model)(rngs.params(), (d_model, H, E), param_dtype)
        k = fan_in_init(kv_dim)(rngs.params(), (kv_dim, K, E), param_dtype)
        v = fan_in_init(kv_dim)(rngs.params(), (kv_dim, K, E), param_dtype)
        # Fused storage: one matmul per projection input, no per-call concatenation (which
        # would also reshard under tensor parallelism). Kernels are grouped by kv head
        # (A = the Y = H/K query heads that read kv head k, then k, then v), so sharding the
        # kv-head axis hands each device whole groups: its query heads with their keys.
        if self.cross:  # queries and keys/values come from different inputs
            self.q_DHE = named_param(q, ("embed", "heads", "head_dim"))
            self.kv_DKAE = named_param(jnp.stack([k, v], axis=2), ("embed", "kv_heads", None, "head_dim"))
        else:
            qkv = jnp.concatenate([q.reshape(d_model, K, H // K, E), k[:, :, None], v[:, :, None]], axis=2)
            self.qkv_DKAE = named_param(qkv, ("embed", "kv_heads", None, "head_dim"))
        # Optional q/k/v biases (Qwen2), laid out like the kernels' output axes (the output bias is
        # ``out_bias``, below).
        zeros = lambda k, shape, d: jnp.zeros(shape, d)
        if qkv_bias and self.cross:
            self.q_b_HE = param(rngs, zeros, (H, E), ("heads", "head_dim"), param_dtype, Bias)
            self.kv_b_KAE = param(rngs, zeros, (K, 2, E), ("kv_heads", None, "head_dim"), param_dtype, Bias)
        elif qkv_bias:
            self.qkv_b_KAE = param(rngs, zeros, (K, H // K + 2, E), ("kv_heads", None, "head_dim"), param_dtype, Bias)
        self.qkv_bias = qkv_bias
        self.o_HED = param(rngs, fan_in_init(H * E), (H, E, d_model), ("heads", "head_dim", "embed"), param_dtype)
        # Optional per-head RMSNorm on q and k (stabilises logits at scale; Gemma/OLMo style),
        # zero-centred when the model's norms are (``norm="rms_centered"``).
        head_norm = lambda: make_head_norm(norm, E, eps=norm_eps, dtype=dtype, rngs=rngs)
        self.q_norm = head_norm() if qk_norm else None
        self.k_norm = head_norm() if qk_norm else None
        # Output gate (Qwen3-Next): per-head gates from the query input, a kernel of its own so
        # the fused qkv layout stays as it is; drawn last so the other parameters do not move.
        if output_gate:
            self.gate_DHE = param(rngs, fan_in_init(d_model), (d_model, H, E), ("embed", "heads", "head_dim"),
                                  param_dtype)
        self.output_gate = output_gate
        # Output-projection bias (GPT-OSS); zeros made without a key, so no draw moves.
        if out_bias:
            self.o_b_D = named_param(jnp.zeros((d_model,), param_dtype), ("embed",), Bias)
        self.out_bias = out_bias
        # Learned sinks (GPT-OSS): one float32 logit per query head in the softmax denominator
        # (glocal.kernels.attention's ``sinks``); drawn last so the other parameters do not
        # move. Typed Bias: a logit offset, kept out of weight decay like the other biases.
        if sinks:
            self.sinks_H = param(rngs, lambda key, shape, d: 0.02 * jax.random.normal(key, shape, d), (H,),
                                 ("heads",), jnp.float32, Bias)

    # -- kernels as separate q / k / v (checkpoint conversion, tests) ------------------------
    def qkv_kernels(self):
        """``(q [D, H, E], k [D_kv, K, E], v [D_kv, K, E])`` as stored (parameter dtype)."""
        if self.cross:
            kv = self.kv_DKAE[...]
            return self.q_DHE[...], kv[:, :, 0], kv[:, :, 1]
        w = self.qkv_DKAE[...]
        Y = self.num_heads // self.num_kv_heads
        return w[:, :, :Y].reshape(w.shape[0], self.num_heads, -1), w[:, :, Y], w[:, :, Y + 1]

    def set_qkv_kernels(self, q_DHE, k_DKE, v_DKE) -> None:
        """Store separate q / k / v kernels in this layer's (fused) layout."""
        if self.cross:
            self.q_DHE[...] = q_DHE
            self.kv_DKAE[...] = jnp.stack([k_DKE, v_DKE], axis=2)
            return
        D, K = k_DKE.shape[:2]
        q = jnp.reshape(q_DHE, (D, K, self.num_heads // K, -1))
        self.qkv_DKAE[...] = jnp.concatenate([q, k_DKE[:, :, None], v_DKE[:, :, None]], axis=2)

    # -- pieces --------------------------------------------------------------------------
    def _kernels(self):
        """``(q [D, H, E], kv [D, K, 2, E])`` in the compute dtype, from either storage."""
        if self.cross:
            return self.q_DHE[...].astype(self.dtype), self.kv_DKAE[...].astype(self.dtype)
        w = self.qkv_DKAE[...].astype(self.dtype)
        Y = self.num_heads // self.num_kv_heads
        return w[:, :, :Y].reshape(w.shape[0], self.num_heads, -1), w[:, :, Y:]

    def _biases(self):
        """``(q [H, E], kv [K, 2, E])`` biases in the compute dtype (zeros when off: a
        constant XLA folds away)."""
        if not self.qkv_bias:
            return 0, 0
        if self.cross:
            return self.q_b_HE[...].astype(self.dtype), self.kv_b_KAE[...].astype(self.dtype)
        b = self.qkv_b_KAE[...].astype(self.dtype)
        Y = self.num_heads // self.num_kv_heads
        return b[:, :Y].reshape(self.num_heads, -1), b[:, Y:]

    def project_q(self, x_BTD, positions_BT=None):
        q_BTHE = _matmul(x_BTD.astype(self.dtype), self._kernels()[0]) + self._biases()[0]
        return self._norm_rope(q_BTHE, self.q_norm, positions_BT)

    def project_kv(self, kv_BSD, positions_BS=None):
        kv_BSKAE = _matmul(kv_BSD.astype(self.dtype), self._kernels()[1]) + self._biases()[1]
        return self._norm_rope(kv_BSKAE[..., 0, :], self.k_norm, positions_BS), kv_BSKAE[..., 1, :]

    def project_qkv(self, x_BTD, positions_BT=None):
        """Self-attention projections as one matmul against the fused kernel."""
        if self.cross:
            return self.project_q(x_BTD, positions_BT), *self.project_kv(x_BTD, positions_BT)
        B, T, _ = x_BTD.shape
        Y = self.num_heads // self.num_kv_heads
        qkv_BTKAE = _matmul(x_BTD.astype(self.dtype), self.qkv_DKAE[...].astype(self.dtype))
        if self.qkv_bias:
            qkv_BTKAE = qkv_BTKAE + self.qkv_b_KAE[...].astype(self.dtype)
        # (split_parts: its gradient is one concatenation; slicing's pads all three and adds them)
        q_BTKYE, k_BTK1E, v_BTK1E = split_parts(qkv_BTKAE, 3, (Y, 1, 1))
        k_BTKE, v_BTKE = jnp.squeeze(k_BTK1E, 3), jnp.squeeze(v_BTK1E, 3)
        q_BTHE = q_BTKYE.reshape(B, T, self.num_heads, self.head_dim)
        return (self._norm_rope(q_BTHE, self.q_norm, positions_BT),
                self._norm_rope(k_BTKE, self.k_norm, positions_BT), v_BTKE)

    def _norm_rope(self, x_BTHE, norm, positions_BT):
        """Optional per-head qk-norm, then RoPE at ``positions_BT`` (if RoPE is on); for
        queries (H heads) and keys (K heads) alike."""
        if norm is not None:
            x_BTHE = norm(x_BTHE)
        if self.rope_theta is not None and positions_BT is not None:
            x_BTHE = apply_rope(x_BTHE, positions_BT, theta=self.rope_theta, scaling=self.rope_scaling,
                                rotary_dim=self.rotary_dim)
        return x_BTHE

    def _project_moved_sinks(self, x_BTD, positions_BT):
        """``(q, k, v, qc)``: q and k rotated at their absolute positions and the queries also
        at their cache positions (StreamingLLM re-positioning, ``glocal.layers.streaming``)."""
        q_pre, k_pre, v = self.project_qkv(x_BTD, None)  # normed, not yet rotated
        num_sinks, window = self.mask.sink_window
        rope = lambda x, p: self._norm_rope(x, None, p)
        qc_positions_BT = query_cache_positions(positions_BT, num_sinks, window)
        return rope(q_pre, positions_BT), rope(k_pre, positions_BT), v, rope(q_pre, qc_positions_BT)

    def _attend_moved_sinks(self, q, qc, k, v, allowed_BTS, kv_positions_BS, *, kv_heads_major):
        return attend_moved_sinks(q, qc, k, v, allowed_BTS, kv_positions_BS, num_sinks=self.mask.sink_window[0],
                                  softcap=self.softcap, sinks_H=self.sink_logits(), kv_heads_major=kv_heads_major)

    def sink_logits(self):
        """The learned sinks ``[H]`` (float32), or None when the layer has none."""
        sinks_H = getattr(self, "sinks_H", None)
        return None if sinks_H is None else sinks_H[...]

    def attend(self, q_BTHE, k_BSKE, v_BSKE, *, mask=None, segment_ids=None,
               q_positions=None, kv_positions=None):
        return kernels.attention(
            q_BTHE, k_BSKE, v_BSKE, mask=self.mask if mask is None else mask,
            segment_ids=segment_ids, q_positions=q_positions, kv_positions=kv_positions,
            softcap=self.softcap, impl=self.impl, sinks=self.sink_logits(),
        )

    def gate_output(self, o_BTHE, x_BTD):
        """``o * sigmoid(x gate_DHE)`` (float32, cast back) with the output gate on; ``o`` otherwise.
        ``x_BTD`` is the query input the projections saw."""
        if not self.output_gate:
            return o_BTHE
        gate_BTHE = _matmul(x_BTD.astype(self.dtype), self.gate_DHE[...].astype(self.dtype))
        gate_BTHE = constrain(gate_BTHE, ("batch", None, "heads_act", None))  # sharded like the queries
        return (o_BTHE.astype(jnp.float32) * jax.nn.sigmoid(gate_BTHE.astype(jnp.float32))).astype(o_BTHE.dtype)

    def project_out(self, o_BTHE):
        B, T, H, E = o_BTHE.shape
        y_BTD = _matmul(o_BTHE.reshape(B, T, H * E).astype(self.dtype),
                        self.o_HED[...].astype(self.dtype).reshape(H * E, -1))
        return y_BTD + self.o_b_D[...].astype(self.dtype) if self.out_bias else y_BTD

    # -- whole layer -----------------------------------------------------------------------
    def __call__(self, x_BTD, *, kv_BSD=None, positions_BT=None, kv_positions_BS=None,
                 segment_ids=None, cache: KVCache | None = None, valid_BT=None):
        """See the module docstring. Without positions, RoPE uses 0..T-1 (0..S-1 for kv)."""
        B, T, _ = x_BTD.shape
        self_attn = kv_BSD is None
        if positions_BT is None and self.rope_theta is not None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if self_attn:
            kv_BSD, kv_positions_BS = x_BTD, positions_BT
        elif kv_positions_BS is None and self.rope_theta is not None:
            S = kv_BSD.shape[1]
            kv_positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        # Names let remat policies choose what to keep (glocal.layers.stack.REMAT_POLICIES).
        qc = None  # queries rotated at their cache positions (rope_positions="cache" only)
        if self_attn and self.rope_positions == "cache":
            q, k, v, qc = self._project_moved_sinks(x_BTD, positions_BT)
        elif self_attn:
            q, k, v = self.project_qkv(x_BTD, positions_BT)
        else:
            q = self.project_q(x_BTD, positions_BT)
            k, v = self.project_kv(kv_BSD, kv_positions_BS)
        q = checkpoint_name(constrain(q, ("batch", None, "heads_act", None)), "query_proj")
        k = checkpoint_name(constrain(k, ("batch", None, "kv_heads_act", None)), "key_proj")
        v = checkpoint_name(constrain(v, ("batch", None, "kv_heads_act", None)), "value_proj")
        if cache is None:
            # Structural path: masks index the arrays directly, so kernels can skip blocks.
            if qc is not None:
                allowed_BTS = allowed_pairs(self.mask, T, T, segment_ids=segment_ids, q_positions=positions_BT,
                                            kv_positions=positions_BT)
                o = self._attend_moved_sinks(q, qc, k, v, allowed_BTS, positions_BT, kv_heads_major=False)
            else:
                o = self.attend(q, k, v, segment_ids=segment_ids)
            o = checkpoint_name(o, "attn_out")
            return self.project_out(self.gate_output(o, x_BTD)), None
        if segment_ids is not None:
            raise ValueError("cached attention takes no segment_ids: a cache holds one sequence per row.")
        if not self_attn:
            raise ValueError("a KV cache is only supported for self-attention.")
        if positions_BT is None:
            raise ValueError("cached attention needs positions_BT (absolute token positions).")
        if T == 1:
            # One token per row (decoding): store it, then attend over the cache alone. The
            # slot it overwrites in a ring held position p - size, already outside any
            # window that fits the ring, so nothing the query needs is lost.
            cache = cache.update(k, v, positions_BT, valid_BT)
            k_all, v_all, pos_all = cache.k_BKSE, cache.v_BKSE, cache.pos_BS
        else:
            # A chunk (prefill): attend to what the cache held before plus the chunk itself,
            # then store the chunk. Exact even when a ring is shorter than the chunk.
            heads_major = lambda a: jnp.swapaxes(a, 1, 2)
            new_pos_BT = positions_BT if valid_BT is None else jnp.where(valid_BT, positions_BT, -1)
            k_all = jnp.concatenate([cache.k_BKSE.astype(k.dtype), heads_major(k)], axis=2)
            v_all = jnp.concatenate([cache.v_BKSE.astype(v.dtype), heads_major(v)], axis=2)
            pos_all = jnp.concatenate([cache.pos_BS, new_pos_BT.astype(jnp.int32)], axis=1)
            cache = cache.update(k, v, positions_BT, valid_BT)
        # Cached calls evaluate the mask on absolute positions (dense path, heads-major K/V).
        allowed_BTS = allowed_pairs(self.mask, T, pos_all.shape[1], q_positions=positions_BT,
                                    kv_positions=pos_all)
        if qc is not None:
            o = self._attend_moved_sinks(q, qc, k_all.astype(q.dtype), v_all.astype(q.dtype), allowed_BTS, pos_all,
                                         kv_heads_major=True)
        else:
            o = dense_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), allowed_BTS,
                                softcap=self.softcap, kv_heads_major=True, sinks_H=self.sink_logits())
        return self.project_out(self.gate_output(o, x_BTD)), cache


def _matmul(x_BTD, w):
    """``x [B, T, D] @ w [D, ...]`` as one flat 2-D matmul (fastest form on XLA:CPU)."""
    B, T, D = x_BTD.shape
    out_shape = w.shape[1:]
    y = x_BTD.reshape(B * T, D) @ w.reshape(D, -1)
    return y.reshape(B, T, *out_shape)
