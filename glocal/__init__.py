"""glocal: efficient transformer architectures in JAX/Flax NNX.

Dimension letters used in tensor names across the package (``x_BTD``, ``q_BTHE``):

  B  batch                     T  tokens (query length)      S  key/value length
  D  model width               H  query heads                K  key/value heads
  E  head dimension            F  feed-forward width         V  vocabulary
  L  layers (stacked/scanned)  G  groups / blocks            M  latents per group
  X  experts                   R  recursions                 P  layer-pattern slots

A model file that needs more letters, or uses one differently, says so in its docstring
(FIT: C token width, N tokens per group, R group rows; Block Transformer: N blocks, L tokens
per block, R prefix vectors, X block rows).

Logical parameter/activation axis names, mapped onto mesh axes by the rule tables of
``glocal.sharding`` (mesh axes, outermost first: ``data``, ``fsdp``, ``expert``, ``tensor``):

  ``batch``, ``embed`` (D), ``heads`` (H), ``kv_heads`` (K), ``head_dim`` (E), ``mlp`` (F),
  ``vocab`` (V), ``layers`` (stacked layer axis), ``expert`` (X); activations use
  ``heads_act``, ``kv_heads_act``, ``mlp_act``, ``vocab_act`` (FSDP shards a parameter's
  ``embed`` dimension but never an activation's).
"""

__version__ = "0.1.0"

from glocal.generation import generate  # noqa: E402

__all__ = ["generate"]
