"""Mixture-of-experts decoder LM: the baseline with routed FFNs (Switch / GShard / Mixtral).

    tokens -> Embed -> [ x + Attn(Norm(x)),  x + FFN_l(Norm(x)) ] x num_layers -> Norm -> head
    FFN_l = dense SwiGLU for the first ``first_dense_layers`` layers, then MoE every
            ``moe_every``-th layer (the others dense): X experts, top-k routing

The MoE FFN (``glocal.layers.moe``) holds the routers, the three dispatch implementations and
the auxiliary losses; its options are its own (``moe.num_experts``, ``moe.top_k``,
``moe.router``, ``moe.impl``, ...; the older flat names ``num_experts``, ``moe_impl``, ... still
work), so any family can use the same FFN with ``ffn="moe"``. This file only lays the layers out: a prefix stack of
dense layers and a repeating unit of ``lcm(len(layer_pattern), moe_every)`` layers whose last
layer of every ``moe_every`` is routed. Routing needs no decoding state: the cache is the
baseline's.

Token-choice routing is causal (each token's experts depend on that token alone, and the
``capacity`` dispatch counts slots per sequence in token order). Expert choice is not: train it
with ``moe.routing_mode="topk"``, evaluate and decode with ``moe.routing_mode="threshold"`` (the same
weights; ``glocal eval`` reports both).
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from glocal.configs.base import ConfigError
from glocal.layers import DecoderStack, LayerKind
from glocal.layers.decoder import DecoderChain
from glocal.models.transformer import Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class MoEConfig(TransformerConfig):
    ffn: str = "moe"  # the routed layers' FFN kind
    moe_every: int = 1  # every moe_every-th layer (after the dense prefix) is routed
    first_dense_layers: int = 0  # dense layers before the first routed one

    def validate(self) -> None:
        super().validate()
        self.require_positive("moe_every")
        if not 0 <= self.first_dense_layers < self.num_layers:
            raise ConfigError(f"first_dense_layers={self.first_dense_layers} must be in [0, num_layers="
                              f"{self.num_layers}): at least one layer must be routed.")
        unit = self.unit_length
        body = self.num_layers - self.first_dense_layers
        if body % unit:
            raise ConfigError(f"num_layers - first_dense_layers = {body} is not a multiple of {unit} (the least "
                              f"common multiple of moe_every={self.moe_every} and len(layer_pattern)="
                              f"{len(self.layer_pattern)}); the dense/MoE unit repeats whole.")

    @property
    def unit_length(self) -> int:
        return math.lcm(len(self.layer_pattern), self.moe_every)

    def used_kinds(self) -> set[str]:
        return super().used_kinds() | {"mlp"}

    def layer_kinds(self) -> list[LayerKind]:
        """Every layer's (mixer, FFN), first to last."""
        mixers = self.mixers
        kinds = []
        for i in range(self.num_layers):
            j = i - self.first_dense_layers
            routed = j >= 0 and (j + 1) % self.moe_every == 0
            kinds.append(self.kind(mixers[i % len(mixers)], self.ffn if routed else "mlp"))
        return kinds

    def decoder(self, rngs: nnx.Rngs):
        spec = self.layer_spec()
        kinds, f, unit = self.layer_kinds(), self.first_dense_layers, self.unit_length
        body = DecoderStack(spec, kinds[f:f + unit], (self.num_layers - f) // unit, scan=self.scan_layers,
                            remat=self.remat, rngs=rngs)
        if not f:
            return body
        prefix = DecoderStack(spec, kinds[:f], 1, scan=self.scan_layers, remat=self.remat, rngs=rngs)
        return DecoderChain([prefix, body])


class MoE(Transformer):
    """The baseline's model with the layout above (same cache, prefill, decode)."""


__all__ = ["MoE", "MoEConfig"]
