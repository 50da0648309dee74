"""Attention kernels and the mask language that drives them.

``glocal.kernels.attention`` is the single entry point; ``glocal.kernels.masks`` holds the
mask objects (``Full``, ``Causal``, ``SlidingWindow``, ``BlockDiagonal``, ``BlockCausal``,
``ChunkCausal``, ``GlobalTokens``, ``Sinks``, ``PrefixLM``, ``Explicit``; combine with ``&`` / ``|``),
each with an analytic block classifier; ``glocal.kernels.schedule`` compiles a mask into the
per-tile visit lists that block-sparse kernels follow.
"""

from glocal.kernels import masks
from glocal.kernels.api import IMPLEMENTATIONS, attention, auto_impl
from glocal.kernels.delta import DELTA_IMPLEMENTATIONS, gated_delta_rule, gated_delta_step
from glocal.kernels.linear import linear_attention, linear_attention_step
from glocal.kernels.reference import attention_reference
from glocal.kernels.schedule import BlockSchedule, build_schedule

__all__ = ["DELTA_IMPLEMENTATIONS", "gated_delta_rule", "gated_delta_step", "linear_attention", "linear_attention_step", "IMPLEMENTATIONS", "BlockSchedule", "attention", "auto_impl", "attention_reference", "build_schedule", "masks"]
