"""glocal: efficient transformer architectures in JAX/Flax NNX.

Dimension letters used in tensor names across the package (``x_BTD``, ``q_BTHE``):

  B  batch                     T  tokens (query length)      S  key/value length
  D  model width               H  query heads                K  key/value heads
  E  head dimension            F  feed-forward width         V  vocabulary
  L  layers (stacked/scanned)  G  groups / blocks            M  latents per group
  X  experts                   R  recursions                 P  layer-pattern slots

Logical parameter/activation axis names, mapped onto mesh axes by rule tables
(mesh axes: ``data``, ``fsdp``, ``tensor``, ``expert``):

  ``batch``, ``length``, ``embed`` (D), ``heads`` (H), ``kv_heads`` (K), ``head_dim`` (E),
  ``mlp`` (F), ``vocab`` (V), ``layers`` (stacked layer axis), ``expert`` (X).
"""

__version__ = "0.1.0"

from glocal.generation import generate  # noqa: E402

__all__ = ["generate"]
