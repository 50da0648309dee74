"""Based: a linear + sliding-window hybrid (Arora et al., "Simple linear attention language
models balance the recall-throughput tradeoff").

    tokens -> Embed -> [ x + Mixer_l(Norm(x)),  x + SwiGLU(Norm(x)) ] x num_layers -> Norm -> head

The mixer of each layer follows ``layer_pattern`` (repeated): ``c`` gated short convolution
(BaseConv; gives the model word order), ``l`` Taylor linear attention (global recall from a
fixed-size state, no positions), ``s`` sliding-window softmax attention with RoPE (local
precision; ``sliding_window`` counts the query itself, so a window of w sees the w - 1
previous tokens; the reference's ``window_size: w`` means a look-back of w / 2), ``g``
global attention. The paper's models use ``"clscc"``. Every layer's decoding state is
constant in the sequence length unless the pattern contains ``g``: linear-attention sums,
ring buffers of ``sliding_window`` slots, ``conv_width - 1`` convolution inputs.

It is the baseline's decoder (``glocal.models.transformer``) with these mixers registered in
``glocal.layers.recurrent``; only the config's extra fields are new. Packed documents cannot be
kept apart (the linear state and the convolution see across them), so the trainer feeds plain
windows.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from glocal.configs.base import ConfigError
from glocal.kernels.linear import FEATURE_MAPS, LINEAR_IMPLEMENTATIONS
from glocal.layers import DecoderStack, LayerKind
from glocal.models.transformer import Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class BasedConfig(TransformerConfig):
    num_layers: int = 5
    layer_pattern: str = "clscc"
    sliding_window: int | None = 64  # tokens an 's' layer sees, the query included
    feature_dim: int = 16  # F: q/k features per linear-attention head (Taylor state: 1 + F + F(F+1)/2)
    feature_map: str = "taylor"
    conv_width: int = 3
    conv_expand: int = 2  # BaseConv inner width / d_model
    linear_impl: str = "auto"  # linear-attention kernel: auto (= chunked) | quadratic | chunked | pallas_tpu | pallas_gpu
    linear_chunk_size: int = 64

    def validate(self) -> None:
        super().validate()
        self.require_positive("feature_dim", "conv_width", "conv_expand", "linear_chunk_size")
        if self.feature_map not in FEATURE_MAPS:
            raise ConfigError(f"feature_map={self.feature_map!r} is not one of {FEATURE_MAPS}.")
        if self.linear_impl not in LINEAR_IMPLEMENTATIONS:
            raise ConfigError(f"linear_impl={self.linear_impl!r} is not one of {LINEAR_IMPLEMENTATIONS}.")
        c = self.linear_chunk_size
        if self.linear_impl == "pallas_gpu" and (c & (c - 1) or c < 16):
            raise ConfigError(f"linear_impl='pallas_gpu' needs linear_chunk_size a power of two >= 16 (Triton "
                              f"tiles); got {c}.")

    def decoder(self, rngs: nnx.Rngs) -> DecoderStack:
        spec = self.layer(d_model=self.d_model, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                          head_dim=self.head_dim, d_ff=self.d_ff, sliding_window=self.sliding_window,
                          feature_dim=self.feature_dim, feature_map=self.feature_map, conv_width=self.conv_width,
                          conv_expand=self.conv_expand, linear_impl=self.linear_impl,
                          linear_chunk_size=self.linear_chunk_size)
        pattern = [LayerKind(mixer, self.ffn) for mixer in self.mixers]
        return DecoderStack(spec, pattern, self.num_layers // len(pattern), scan=self.scan_layers,
                            remat=self.remat, rngs=rngs)


class Based(Transformer):
    packed_documents = False
    packing_note = "its linear-attention state and short convolutions read across document boundaries"
