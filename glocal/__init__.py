"""glocal: efficient transformer architectures in JAX/Flax NNX.

Dimension letters for tensor names across the whole zoo (``x_BTD``, ``q_BTHE``, ``z_BGMC``).
Each letter means one thing everywhere. A file may add letters this legend lacks, in a line
"Letters added here (beyond the package legend): ..." of its docstring, but never gives these
another meaning (``tests/test_legend.py`` checks every suffixed name under ``glocal/``).

  B  batch                            T  tokens, the query length
  S  key/value length; slots (KV-cache slots, an expert's or a recursion step's capacity)
  V  vocabulary                       D  model width (the token stream)
  C  coarse width: FIT latents, Block Transformer blocks
  H  query heads                      K  key/value heads
  Y  query heads per key/value head (H / K)
  E  head dimension                   I  hidden width (FFN, short convolution)
  F  feature dimension (linear-attention query/key features)
  J  features of linear attention's feature map phi (its state: 1 + F + F(F+1)/2 for Taylor)
  A  projections fused into one matmul (gate + up of a gated MLP; q heads + k + v per kv head)
  L  layers (a stacked / scanned axis)   P  layer-pattern slots (layers in a repeating unit)
  G  groups or blocks: FIT groups, Block Transformer blocks, linear-attention chunks,
     a grouped matmul's row tiles
  N  tokens (rows) per group or block
  M  latents per group (FIT)          Q  prefix vectors per block (Block Transformer)
  O  rows: axes flattened into one (B*G group or block rows of FIT and the Block Transformer,
     B*T token rows of an MoE layer, Y*T query rows of dense attention, a grouped matmul's rows)
  U  units of a FIT layer spec        X  experts (a grouped matmul's groups)
  Z  experts chosen per token (top-k)  R  recursions
  W  width of a window: a short convolution's taps, a tile schedule's kv tiles per query tile

Logical parameter/activation axis names, mapped onto mesh axes by the rule tables of
``glocal.sharding`` (mesh axes, outermost first: ``data``, ``fsdp``, ``expert``, ``tensor``);
a name the table does not list is an error:

  ``batch``, ``embed`` (D, C), ``heads`` (H), ``kv_heads`` (K), ``head_dim`` (E), ``feature`` (F),
  ``mlp`` (I), ``vocab`` (V), ``layers`` (L), ``expert`` (X), ``norm``; activations use
  ``heads_act``, ``kv_heads_act``, ``mlp_act``, ``vocab_act`` (FSDP shards a parameter's
  ``embed`` dimension but never an activation's).
"""

__version__ = "0.1.0"

import os as _os


def _avoid_xla_cpu_reduce_fusion_bug() -> None:
    """jaxlib 0.10.x's XLA:CPU (fixed in 0.12.1) fuses some reductions into YNNPACK kernels that return wrong
    numbers: a jitted Based forward at 64 x 64 tokens (``clscc`` layers scanned) differs from
    the same computation run op by op by O(1) (tests/test_based.py keeps a guard). Turning off
    just the ``reduce`` YNN fusion fixes it. Set before JAX creates its CPU backend (importing
    glocal first is enough); a user's own ``xla_cpu_experimental_ynn_fusion_type`` wins."""
    flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return
    from glocal.compat import needs_ynn_reduce_workaround

    if not needs_ynn_reduce_workaround():
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        import warnings

        warnings.warn("glocal was imported after JAX initialised its backends, so XLA:CPU's YNN reduce fusions "
                      "(wrong results for some models in jaxlib 0.10.x) stay on; import glocal first or set "
                      "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce.", stacklevel=3)
        return
    _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=-reduce").strip()


_avoid_xla_cpu_reduce_fusion_bug()

from glocal.generation import generate  # noqa: E402

__all__ = ["generate"]
