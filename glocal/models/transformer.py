"""Dense Llama-style decoder LM: the baseline every efficient architecture is measured against.

    tokens_BT -> Embed -> [ x + Mixer(Norm(x)),  x + MLP(Norm(x)) ] x num_layers -> Norm -> head

Pre-norm, RoPE, grouped-query attention, SwiGLU. Layers follow ``layer_pattern``: one
character per layer of a repeating unit, ``g`` = global causal attention, ``s`` = causal
sliding window of ``window.size`` tokens (``"sssg"`` = three local layers per global
one); any mixer registered with a letter (``glocal.layers.register_mixer``) can appear, with
its options set as ``<kind>.<option>``. The unit is stacked ``num_layers / len(layer_pattern)``
times and scanned (``glocal.layers.DecoderStack``); each layer's cache is its mixer's (a ring
buffer of ``window.size`` slots for ``s`` layers). Packed documents are kept apart with
``segment_ids_BT`` when every mixer of the pattern can (attention can; linear attention and
convolutions cannot, and such a model takes plain windows).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.configs.base import ConfigError
from glocal.layers import DecoderStack, LayerSpec
from glocal.layers.spec import MIXER_LETTERS
from glocal.models.base import DecoderConfig, ModelBase, ModelCache


@dataclasses.dataclass(frozen=True)
class TransformerConfig(DecoderConfig):
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (plain multi-head attention)
    head_dim: int | None = None  # None = d_model // num_heads
    d_ff: int = 256
    layer_pattern: str = "g"  # g = global causal, s = sliding window (window.size); repeats over layers

    def validate(self) -> None:
        super().validate()
        self.require_positive("d_model", "num_layers", "d_ff")
        self.require_heads("d_model", "num_heads", "num_kv_heads", "head_dim")
        if not self.layer_pattern or set(self.layer_pattern) - set(MIXER_LETTERS):
            known = ", ".join(f"'{c}' ({name})" for c, name in sorted(MIXER_LETTERS.items()))
            raise ConfigError(
                f"layer_pattern={self.layer_pattern!r} may only contain {known}, one letter per layer, "
                f"e.g. 'g' or 'sssg'."
            )
        if self.num_layers % len(self.layer_pattern):
            raise ConfigError(
                f"num_layers={self.num_layers} is not a multiple of len(layer_pattern)="
                f"{len(self.layer_pattern)} ({self.layer_pattern!r}); the pattern repeats whole."
            )

    @property
    def mixers(self) -> list[str]:
        return [MIXER_LETTERS[c] for c in self.layer_pattern if c in MIXER_LETTERS]

    def used_kinds(self) -> set[str]:
        return set(self.mixers) | {self.ffn}

    def layer_spec(self) -> LayerSpec:
        return self.layer(d_model=self.d_model, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                          head_dim=self.head_dim, d_ff=self.d_ff)

    def decoder(self, rngs: nnx.Rngs) -> DecoderStack:
        pattern = [self.kind(mixer) for mixer in self.mixers]
        return DecoderStack(self.layer_spec(), pattern, self.num_layers // len(pattern), scan=self.scan_layers,
                            remat=self.remat, rngs=rngs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransformerCache(ModelCache):
    """Decoding state: per pattern slot P a cache stacked over units ``[L/P, B, K, S, E]``."""

    layers_P: tuple  # each slot's mixer cache: KVCache for 'g', RingKVCache for 's', ...
    length_B: jax.Array  # tokens consumed so far by each sequence


class Transformer(ModelBase):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = self._make_embed(cfg.d_model, rngs)
        self.decoder = cfg.decoder(rngs)
        self._init_output(cfg.d_model, rngs)

    @property
    def packed_documents(self) -> bool:
        return not self.decoder.crosses_documents

    @property
    def packing_note(self) -> str:
        return f"its {', '.join(repr(m) for m in self.decoder.crosses_documents)} layers read across documents"

    @property
    def growing_caches(self) -> list[str]:
        return [f"its {m!r} layers" for m in self.decoder.growing_caches]

    # -- teacher forcing ------------------------------------------------------------------
    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None):
        """Logits ``[B, T, V]`` (float32) for every position. ``segment_ids_BT`` keeps
        attention inside packed documents; ``positions_BT`` defaults to 0..T-1."""
        self._check_inputs(tokens_BT, positions_BT, segment_ids_BT)
        B, T = tokens_BT.shape
        positions_BT = self._positions(B, T) if positions_BT is None else positions_BT
        x_BTD, _, aux = self.decoder(self.embed(tokens_BT), positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)
        return self._output(self._logits(x_BTD), aux)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward; matmuls only).

        6 x (matmul parameters, head included, embedding lookup excluded) plus attention:
        QK^T and PV cost 2 * 2 * H * E per visible key in the forward, and a causal query
        sees (T + 1) / 2 keys on average (a window layer at most its window).
        """
        return 3 * (self.decoder.flops_per_row(seq_len) + self._head_flops())

    # -- cached decoding ------------------------------------------------------------------
    def _empty_cache(self, batch_size: int, length: int) -> TransformerCache:
        return TransformerCache(self.decoder.init_cache(batch_size, length), jnp.zeros((batch_size,), jnp.int32))

    def _extend(self, tokens_BT, lengths_B, cache: TransformerCache):
        """Consume a chunk after what the cache holds (positions continue per row)."""
        positions_BT, valid_BT = self._chunk(tokens_BT, lengths_B, cache)
        x_BTD, layers, _ = self.decoder(self.embed(tokens_BT), positions_BT=positions_BT, caches=cache.layers_P,
                                        valid_BT=valid_BT)
        return self._last_logits(x_BTD, lengths_B), TransformerCache(layers, cache.length_B + lengths_B)


__all__ = ["Transformer", "TransformerCache", "TransformerConfig"]
