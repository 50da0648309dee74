"""Attention masks as small, frozen, hashable objects.

A mask answers one question: may query position ``q`` attend to key position ``k``?
``mask(q_idx, k_idx)`` evaluates that predicate element-wise on broadcastable integer
arrays (NumPy or jnp), so the same object serves three consumers:

* the dense reference and the einsum/XLA paths (``mask(q_pos[:, None], k_pos[None, :])``),
* cached decoding, where keys live in cache slots with their own absolute positions,
* the block-sparse kernels, which classify whole tiles without materialising them.

Masks are static (hashable) so they can live on NNX modules and key jit caches.
Combine with ``&`` and ``|``. Positions are absolute token indices; a cache slot that holds
no token carries position ``-1`` and is excluded by the attention code, not by the mask.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

Array = Any  # np.ndarray or jax.Array: masks only use operators both support


class Mask(abc.ABC):
    """Base class: subclasses implement ``__call__(q_idx, k_idx) -> bool array``."""

    @abc.abstractmethod
    def __call__(self, q_idx: Array, k_idx: Array) -> Array:
        """Element-wise: may query position ``q_idx`` attend to key position ``k_idx``?"""

    def dense(self, T: int, S: int | None = None) -> np.ndarray:
        """Materialise the ``[T, S]`` boolean mask for queries 0..T-1 and keys 0..S-1."""
        S = T if S is None else S
        q = np.arange(T)[:, None]
        k = np.arange(S)[None, :]
        return np.broadcast_to(np.asarray(self(q, k), dtype=bool), (T, S)).copy()

    @property
    def is_causal(self) -> bool:
        """True when the mask never lets a query see a later key (safe for decoding)."""
        return False

    @property
    def lookback(self) -> int | None:
        """Largest ``q - k + 1`` a query can see, or None if unbounded.

        A finite look-back lets decoding keep a ring buffer of that many keys.
        """
        return None

    def __and__(self, other: "Mask") -> "Mask":
        return And(self, other)

    def __or__(self, other: "Mask") -> "Mask":
        return Or(self, other)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every query sees every key (encoders, cross-attention)."""

    def __call__(self, q_idx, k_idx):
        return (q_idx == q_idx) & (k_idx == k_idx)  # all-True, broadcast shape


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Query ``q`` sees keys ``k <= q + offset``.

    ``offset`` shifts the diagonal, e.g. queries that are the last T of S keys use ``S - T``.
    """

    offset: int = 0

    def __call__(self, q_idx, k_idx):
        return k_idx <= q_idx + self.offset

    @property
    def is_causal(self) -> bool:
        return self.offset <= 0


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
    """Causal window of ``size`` tokens *including the query itself*.

    ``SlidingWindow(w)`` lets query ``i`` see keys ``i-w+1 .. i``; ``SlidingWindow(1)`` sees
    only itself. With ``causal=False`` the window is symmetric: ``|i - k| < size``.
    """

    size: int
    causal: bool = True

    def __post_init__(self):
        if int(self.size) < 1:
            raise ValueError(
                f"SlidingWindow size must be >= 1 (it counts the query itself), got {self.size}."
            )

    def __call__(self, q_idx, k_idx):
        near = k_idx > q_idx - self.size
        if self.causal:
            return near & (k_idx <= q_idx)
        return near & (k_idx < q_idx + self.size)

    @property
    def is_causal(self) -> bool:
        return self.causal

    @property
    def lookback(self) -> int | None:
        return self.size


@dataclasses.dataclass(frozen=True)
class And(Mask):
    """Both masks allow the pair."""

    a: Mask
    b: Mask

    def __call__(self, q_idx, k_idx):
        return self.a(q_idx, k_idx) & self.b(q_idx, k_idx)

    @property
    def is_causal(self) -> bool:
        return self.a.is_causal or self.b.is_causal

    @property
    def lookback(self) -> int | None:
        bounds = [m.lookback for m in (self.a, self.b) if m.lookback is not None]
        return min(bounds) if bounds else None


@dataclasses.dataclass(frozen=True)
class Or(Mask):
    """Either mask allows the pair."""

    a: Mask
    b: Mask

    def __call__(self, q_idx, k_idx):
        return self.a(q_idx, k_idx) | self.b(q_idx, k_idx)

    @property
    def is_causal(self) -> bool:
        return self.a.is_causal and self.b.is_causal

    @property
    def lookback(self) -> int | None:
        if self.a.lookback is None or self.b.lookback is None:
            return None
        return max(self.a.lookback, self.b.lookback)


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array) -> Array:
    """Element-wise document mask for packed sequences: ``[B, T] x [B, S] -> [B, T, S]``."""
    return q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
