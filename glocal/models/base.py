"""The model contract: what every language model in the zoo does, and the plumbing they share.

Read this file to know what a new family must provide (``docs/adding-a-model.md`` walks
through adding one). A family is a config dataclass deriving from ``DecoderConfig`` and a
model class deriving from ``ModelBase`` that satisfies ``LanguageModel``:

``model(tokens_BT, *, positions_BT=None, segment_ids_BT=None)``
    Logits ``[B, T, V]`` (float32) for every position, any ``T <= config.max_seq_len``; or
    ``(logits, aux)`` where ``aux = {name: (loss, weight)}`` holds auxiliary losses (routers)
    that the trainer adds as ``weight * loss``. Position ``t`` sees tokens ``<= t`` only.

Packed documents (``packed_documents``, a class attribute)
    True: ``segment_ids_BT`` keeps attention inside each document of a packed window and
    ``positions_BT`` restarts at each document, so a packed row gives the same logits as
    each document run alone. False: the architecture cannot isolate documents (e.g. FIT's
    and the Block Transformer's global paths summarise whole groups); passing either
    argument raises a ``ValueError`` (never silently ignored), and the trainer feeds such a
    model plain windows, in which a document sees the earlier documents of its window, and
    says so at start-up (the loss mask still skips cross-document targets).

``init_cache(batch_size, max_len=None)``
    An empty decoding cache (an explicit pytree with ``length_B``: tokens consumed per row)
    for sequences up to ``max_len <= max_seq_len`` tokens.

``prefill(tokens_BT, lengths_B, cache)``
    Takes a *fresh* cache from ``init_cache`` (every family; a concrete cache that already
    holds tokens is rejected with the same error; inside ``jit`` it cannot be checked) and
    right-padded prompts of ``lengths_B`` real tokens. Returns the next-token logits
    ``[B, V]`` at each prompt's last token and the filled cache.

``decode(tokens_B, cache)``
    One token per row -> next-token logits ``[B, V]`` and the updated cache. Prefill then
    decode reproduce the teacher-forced logits at every position (the conformance suite,
    ``tests/test_conformance.py``, checks this and the rest of this contract).

``cache_nbytes(batch_size, length)``
    The cache's size by formula; equals the bytes of ``init_cache(batch_size, length)``.

``flops_per_token(seq_len)``
    Training FLOPs per token (3x the forward's matmul FLOPs; attention counts the keys a
    query actually sees), used for MFU.

Bad input is a clear error: token ids outside ``[0, vocab_size)`` (when concrete), inputs or
caches longer than ``max_seq_len``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glocal.configs.base import ConfigError, ModelConfig
from glocal.kernels import IMPLEMENTATIONS
from glocal.layers import Embed, Unembed, make_norm
from glocal.layers.cache import tree_nbytes
from glocal.layers.decoder import merge_aux
from glocal.kernels.gmm import GMM_IMPLS
from glocal.layers.mlp import ACTIVATIONS
from glocal.layers.rope import RopeScaling
from glocal.layers.moe import MOE_IMPLS, ROUTER_WEIGHTS, ROUTERS, ROUTING_MODES, MoESpec
from glocal.layers.spec import FFNS, LayerSpec
from glocal.layers.stack import REMAT_POLICIES
from glocal.sharding import constrain

DTYPES = ("float32", "bfloat16", "float16")


@runtime_checkable
class LanguageModel(Protocol):
    """The interface (see the module docstring for what each method means)."""

    config: Any
    packed_documents: ClassVar[bool]

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None): ...

    def init_cache(self, batch_size: int, max_len: int | None = None): ...

    def prefill(self, tokens_BT, lengths_B, cache): ...

    def decode(self, tokens_B, cache): ...

    def cache_nbytes(self, batch_size: int, length: int) -> int: ...

    def flops_per_token(self, seq_len: int) -> float: ...


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ModelConfig):
    """Fields every family shares (vocabulary, context, layer numerics, output head, run
    options). A family adds its shape fields and calls ``require_heads`` for each stack."""

    vocab_size: int = 384
    max_seq_len: int = 256
    ffn: str = "mlp"  # FFN kind of every layer (glocal.layers.FFNS)
    mlp: str = "swiglu"  # dense FFN activation: swiglu | geglu | gelu | relu
    norm: str = "rms"  # rms | layer
    norm_eps: float = 1e-6
    rope_theta: float | None = 10_000.0  # None: no rotary positions
    rope_scaling: str | None = None  # None | linear | llama3 (glocal.layers.rope.RopeScaling)
    rope_factor: float = 1.0  # context extension factor of rope_scaling
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_context: int = 8192  # llama3 only: the pre-training context
    qk_norm: bool = False  # per-head RMSNorm on queries and keys
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    attn_softcap: float | None = None  # c * tanh(scores / c) before the softmax
    logit_softcap: float | None = None  # the same on the output logits
    tie_embeddings: bool = False  # output head = the token embedding table
    attention_impl: str = "auto"
    dtype: str = "float32"  # compute dtype; parameters are param_dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02
    # Mixture-of-experts FFNs (used where a layer's FFN is "moe"; see glocal.layers.moe).
    num_experts: int = 8
    top_k: int = 2
    d_expert: int | None = None  # each expert's hidden width; None = d_ff
    router: str = "token_choice"  # token_choice | expert_choice
    router_weights: str = "renorm"  # renorm: softmax over the k chosen (Mixtral) | softmax: full softmax (Switch)
    moe_impl: str = "dropless"  # dense (reference) | capacity (token dropping) | dropless (grouped matmul)
    capacity_factor: float = 1.25  # capacity dispatch; expert choice: C = T * capacity_factor / num_experts
    shared_experts: int = 0  # always-on experts beside the routed ones
    balance_weight: float = 1e-2  # Switch load-balance loss weight (alpha)
    router_z_weight: float = 1e-3
    router_bias_rate: float = 0.0  # > 0: DeepSeek-V3 auxiliary-loss-free balancing bias step
    predictor_weight: float = 1e-2  # expert choice: BCE weight of the causal predictor
    routing_mode: str = "topk"  # expert choice: topk (training; non-causal) | threshold (causal)
    moe_gmm_impl: str = "auto"  # dropless grouped matmul: auto (tiled on CPU, ragged_dot elsewhere) | ragged_dot | tiled | tokamax

    def validate(self) -> None:
        self.require_positive("vocab_size", "max_seq_len")
        for name, allowed in (("mlp", ACTIVATIONS), ("norm", ("rms", "layer")), ("dtype", DTYPES),
                              ("param_dtype", DTYPES), ("remat", tuple(REMAT_POLICIES)),
                              ("attention_impl", IMPLEMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.ffn not in FFNS:
            raise ConfigError(f"ffn={self.ffn!r} is not a registered FFN kind; choose one of {sorted(FFNS)}.")
        for name in ("attn_softcap", "logit_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (or None for no cap), got {getattr(self, name)}.")
        if self.rope_scaling is not None:
            if self.rope_theta is None:
                raise ConfigError("rope_scaling is set but rope_theta=None (no rotary positions); unset one.")
            try:
                self.rope_scaling_spec()
            except ValueError as e:
                raise ConfigError(f"rope_scaling={self.rope_scaling!r}: {e}") from None
        if self.uses_moe:
            self.validate_moe()

    @property
    def uses_moe(self) -> bool:
        return self.ffn == "moe"

    def routing_modes(self) -> tuple[str, ...]:
        """``("topk", "threshold")`` when a router is non-causal in training (expert choice):
        evaluation reports both; empty otherwise."""
        return ("topk", "threshold") if self.uses_moe and self.router == "expert_choice" else ()

    def validate_moe(self) -> None:
        for name, allowed in (("router", ROUTERS), ("router_weights", ROUTER_WEIGHTS), ("moe_impl", MOE_IMPLS),
                              ("routing_mode", ROUTING_MODES), ("moe_gmm_impl", GMM_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        self.require_positive("num_experts", "top_k")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}: a token cannot pick "
                              f"more experts than exist. Lower top_k or raise num_experts.")
        if self.d_expert is not None and self.d_expert < 1:
            raise ConfigError(f"d_expert must be a positive integer (or None for d_ff), got {self.d_expert}.")
        if self.capacity_factor <= 0:
            raise ConfigError(f"capacity_factor must be positive, got {self.capacity_factor}.")
        if self.shared_experts < 0 or self.router_bias_rate < 0:
            raise ConfigError("shared_experts and router_bias_rate must be >= 0.")

    def moe_spec(self) -> MoESpec:
        return MoESpec(num_experts=self.num_experts, top_k=self.top_k, d_expert=self.d_expert, router=self.router,
                       router_weights=self.router_weights, impl=self.moe_impl, capacity_factor=self.capacity_factor,
                       shared_experts=self.shared_experts, balance_weight=self.balance_weight,
                       z_weight=self.router_z_weight, bias_rate=self.router_bias_rate,
                       predictor_weight=self.predictor_weight, routing_mode=self.routing_mode,
                       gmm_impl=self.moe_gmm_impl)

    def require_heads(self, width: str, heads: str, kv_heads: str | None = None, head_dim: str | None = None,
                      *, width_value: int | None = None) -> None:
        """Check one stack's attention shape; errors name the fields the user sets.

        ``width_value`` overrides the width when the field defaults from another (FIT's
        ``d_latent=None`` means ``d_model``)."""
        D = getattr(self, width) if width_value is None else width_value
        H = getattr(self, heads)
        K = H if kv_heads is None or getattr(self, kv_heads) is None else getattr(self, kv_heads)
        E = None if head_dim is None else getattr(self, head_dim)
        if H < 1:
            raise ConfigError(f"{heads} must be a positive integer, got {H}.")
        if E is None and D % H:
            divisors = [h for h in range(1, D + 1) if D % h == 0 and h <= 64]
            fix = f" or set {head_dim} explicitly" if head_dim else ""
            raise ConfigError(f"{heads}={H} does not divide {width}={D}. Choose {heads} from {divisors}{fix}.")
        if K < 1 or H % K:
            ok = [k for k in range(1, H + 1) if H % k == 0]
            raise ConfigError(f"{kv_heads}={K} does not divide {heads}={H}. Choose {kv_heads} from {ok}.")
        size = D // H if E is None else E
        if size < 1 or (self.rope_theta is not None and size % 2):
            what = head_dim if E is not None else f"the head size {width} / {heads}"
            raise ConfigError(f"{what} must be even for RoPE (and positive), got {size}.")

    def rope_scaling_spec(self) -> RopeScaling | None:
        if self.rope_scaling is None:
            return None
        return RopeScaling(self.rope_scaling, self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                           self.rope_original_context)

    def layer(self, **shape) -> LayerSpec:
        """A ``LayerSpec`` of the given shape with this config's shared layer numerics."""
        return LayerSpec(**shape, mlp=self.mlp, norm=self.norm, norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                         rope_scaling=self.rope_scaling_spec(),
                         qk_norm=self.qk_norm, qkv_bias=self.qkv_bias, attn_softcap=self.attn_softcap,
                         attention_impl=self.attention_impl,
                         moe=self.moe_spec() if self.uses_moe else None, dtype=self.dtype,
                         param_dtype=self.param_dtype)


class ModelCache:
    """Base of a family's cache dataclass: it must have ``length_B`` (tokens per row)."""

    length_B: jax.Array

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)


class ModelBase(nnx.Module):
    """Plumbing shared by every family. A subclass sets ``self.config`` and, for the shared
    output head, ``self.embed`` (token embedding, the tied head), ``self.final_norm`` and
    ``self.head`` (None when tied), e.g. with ``self._init_output(width, rngs)``."""

    packed_documents: ClassVar[bool] = False
    packing_note: ClassVar[str] = ""  # why documents cannot be isolated (for the error)

    # -- inputs ---------------------------------------------------------------------------
    def _check_inputs(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> None:
        cfg = self.config
        name = type(self).__name__
        if not self.packed_documents and (positions_BT is not None or segment_ids_BT is not None):
            raise ValueError(
                f"{name} does not take positions_BT / segment_ids_BT: it cannot keep packed documents "
                f"apart ({self.packing_note}). Call it without them; the trainer feeds such models plain "
                f"windows and masks cross-document targets in the loss.")
        if tokens_BT.ndim != 2:
            raise ValueError(f"{name} expects tokens of shape [batch, length], got {tokens_BT.shape}.")
        T = tokens_BT.shape[1]
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}; raise max_seq_len"
                             f"{self._length_hint()} or feed shorter windows.")
        check_tokens(tokens_BT, cfg.vocab_size)

    def _length_hint(self) -> str:
        return ""

    def _positions(self, B: int, T: int):
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    # -- output head ------------------------------------------------------------------------
    def _init_output(self, width: int, rngs: nnx.Rngs) -> None:
        cfg = self.config
        self.final_norm = make_norm(cfg.norm, width, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else Unembed(
            width, cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def _make_embed(self, width: int, rngs: nnx.Rngs) -> Embed:
        cfg = self.config
        return Embed(cfg.vocab_size, width, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     rngs=rngs)

    def _logits(self, x_BTD):
        """Final norm, head (or the tied embedding), optional soft-cap; float32 logits."""
        x_BTD = self.final_norm(x_BTD)
        logits_BTV = self.embed.attend(x_BTD) if self.head is None else self.head(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", None, "vocab_act"))
        cap = self.config.logit_softcap
        return logits_BTV if cap is None else cap * jnp.tanh(logits_BTV / cap)

    @staticmethod
    def _output(logits_BTV, *auxes: dict):
        """``logits``, or ``(logits, aux)`` when any stack reported auxiliary losses."""
        aux = {}
        for a in auxes:
            aux = merge_aux(aux, a)
        return (logits_BTV, aux) if aux else logits_BTV

    def _head_flops(self) -> float:
        """Forward FLOPs per token of the final norm and the output matmul."""
        table = self.embed.table_VD if self.head is None else self.head.w_DV
        return 2.0 * (param_count(self.final_norm) + table.size)

    # -- caches -----------------------------------------------------------------------------
    def _cache_length(self, max_len: int | None) -> int:
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={cfg.max_seq_len}.")
        if max_len < 1:
            raise ValueError(f"cache length must be positive, got {max_len}.")
        return max_len

    def _check_fresh(self, cache) -> None:
        """``prefill`` takes a fresh cache (checked when the cache is concrete)."""
        if isinstance(cache.length_B, jax.core.Tracer):
            return
        if np.any(np.asarray(cache.length_B) != 0):
            raise ValueError(f"{type(self).__name__}.prefill needs an empty cache (from init_cache); this one "
                             f"already holds tokens. Continue a cached sequence with decode(), one token at a "
                             f"time.")


def param_count(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def active_param_count(module: nnx.Module) -> float:
    """Parameters one token uses: all of them, except that routed FFNs (modules with
    ``active_params()``, e.g. mixture-of-experts) count only the experts a token visits."""
    n = float(param_count(module))
    for _, node in nnx.iter_graph(module):
        if hasattr(node, "active_params") and isinstance(node, nnx.Module):
            n += node.active_params() - param_count(node)
    return n


def check_tokens(tokens_BT, vocab_size: int) -> None:
    """Reject out-of-range token ids when they are concrete (inside jit they are not)."""
    if isinstance(tokens_BT, jax.core.Tracer):
        return
    t = np.asarray(tokens_BT)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {t.dtype}.")
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = t.max() if t.max() >= vocab_size else t.min()
        raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size}); check the "
                         f"tokenizer matches the model or raise vocab_size.")
