"""glocal: efficient transformer architectures in JAX/Flax NNX.

Dimension letters for tensor names across the whole zoo (``x_BTD``, ``q_BTHE``, ``z_BGMC``).
A file may add letters it needs (its docstring says so); none gives these another meaning.

  B  batch                            T  tokens, the query length
  S  key/value length, cache slots    V  vocabulary
  D  model width (the token stream)   C  coarse width: FIT latents, Block Transformer blocks
  H  query heads                      K  key/value heads
  E  head dimension                   I  FFN hidden width
  F  feature dimension (linear-attention query/key features)
  A  projections fused into one matmul (gate + up of a gated MLP; q heads + k + v per kv head)
  L  layers (a stacked / scanned axis)   P  layer-pattern slots (layers in a repeating unit)
  G  groups (FIT) or blocks (Block Transformer)
  N  tokens per group or block        M  latents per group (FIT)
  Q  prefix vectors per block (Block Transformer)
  J  rows of a batch flattened with its groups or blocks (B*G)
  U  units of a FIT layer spec        X  experts
  R  recursions                       W  convolution width (short convolutions)

Logical parameter/activation axis names, mapped onto mesh axes by the rule tables of
``glocal.sharding`` (mesh axes, outermost first: ``data``, ``fsdp``, ``expert``, ``tensor``);
a name the table does not list is an error:

  ``batch``, ``embed`` (D, C), ``heads`` (H), ``kv_heads`` (K), ``head_dim`` (E), ``mlp`` (I),
  ``vocab`` (V), ``layers`` (L), ``expert`` (X), ``norm``; activations use ``heads_act``,
  ``kv_heads_act``, ``mlp_act``, ``vocab_act`` (FSDP shards a parameter's ``embed``
  dimension but never an activation's).
"""

__version__ = "0.1.0"

from glocal.generation import generate  # noqa: E402

__all__ = ["generate"]
