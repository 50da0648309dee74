"""Attention kernels and the mask language that drives them.

``glocal.kernels.attention`` is the single entry point; ``glocal.kernels.masks`` holds the
mask objects (``Full``, ``Causal``, ``SlidingWindow``, combinators with ``&`` / ``|``).
"""

from glocal.kernels import masks
from glocal.kernels.api import IMPLEMENTATIONS, attention
from glocal.kernels.reference import attention_reference

__all__ = ["IMPLEMENTATIONS", "attention", "attention_reference", "masks"]
