"""Based: a linear + sliding-window hybrid (Arora et al., "Simple linear attention language
models balance the recall-throughput tradeoff").

    tokens -> Embed -> [ x + Mixer_l(Norm(x)),  x + SwiGLU(Norm(x)) ] x num_layers -> Norm -> head

The mixer of each layer follows ``layer_pattern`` (repeated): ``c`` gated short convolution
(BaseConv; gives the model word order), ``l`` Taylor linear attention (global recall from a
fixed-size state, no positions), ``s`` sliding-window softmax attention with RoPE (local
precision; ``window.size`` counts the query itself, so a window of w sees the w - 1
previous tokens; the reference's ``window_size: w`` means a look-back of w / 2), ``g``
global attention. The paper's models use ``"clscc"``. Every layer's decoding state is
constant in the sequence length unless the pattern contains ``g``: linear-attention sums,
ring buffers of ``window.size`` slots, ``conv.width - 1`` convolution inputs.

It is the baseline (``glocal.models.transformer``) with these mixers (registered in
``glocal.layers.recurrent`` with their options ``linear.*`` and ``conv.*``) in its pattern;
only the defaults are new. Packed documents cannot be kept apart (the linear state and the
convolution see across them), so the trainer feeds plain windows.
"""

from __future__ import annotations

import dataclasses

from glocal.models.transformer import Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class BasedConfig(TransformerConfig):
    num_layers: int = 5
    layer_pattern: str = "clscc"
    # The kinds' options (window.size, linear.feature_dim, conv.width, ...) at Based's defaults.
    kind_defaults = {"window": {"size": 64}}


class Based(Transformer):
    """The baseline's model: what differs is the pattern's mixers and their options."""
