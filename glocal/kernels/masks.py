"""Attention masks as small, frozen, hashable objects.

A mask answers one question: may query position ``q`` attend to key position ``k``?
``mask(q_idx, k_idx)`` evaluates that predicate element-wise on broadcastable integer
arrays (NumPy or jnp), so the same object serves three consumers:

* the dense reference and the einsum/XLA paths (``mask(q_pos[:, None], k_pos[None, :])``),
* cached decoding, where keys live in cache slots with their own absolute positions,
* the block-sparse kernels, which classify whole tiles without materialising them.

Masks are static (hashable) so they can live on NNX modules and key jit caches.
Combine with ``&`` and ``|``. ``mask.block_states(T, S, bq, bkv)`` classifies every
``bq x bkv`` tile as EMPTY / PARTIAL / FULL analytically (interval arithmetic on the tile's
corners), without materialising the ``T x S`` mask; combinators stay exact by evaluating
only the tiles both operands call partial. Positions are absolute token indices; a cache slot that holds
no token carries position ``-1`` and is excluded by the attention code, not by the mask.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

Array = Any  # np.ndarray or jax.Array: masks only use operators both support

EMPTY, PARTIAL, FULL = 0, 1, 2  # block states


class _Tiles:
    """Tile bounds of a ``T x S`` grid cut into ``bq x bkv`` tiles (the last ones may be short):
    first/last query row ``q0``/``q1`` as ``[nq, 1]`` and first/last key ``k0``/``k1`` as
    ``[1, nk]`` (inclusive ends)."""

    def __init__(self, T: int, S: int, bq: int, bkv: int):
        if min(T, S, bq, bkv) < 1:
            raise ValueError(f"sizes must be positive, got T={T} S={S} block_q={bq} block_kv={bkv}.")
        self.T, self.S, self.bq, self.bkv = T, S, bq, bkv
        self.nq, self.nk = -(-T // bq), -(-S // bkv)
        qs, ks = np.arange(self.nq) * bq, np.arange(self.nk) * bkv
        self.q0, self.q1 = qs[:, None], np.minimum(qs + bq, T)[:, None] - 1
        self.k0, self.k1 = ks[None, :], np.minimum(ks + bkv, S)[None, :] - 1

    def states(self, full, empty) -> np.ndarray:
        full, empty = np.broadcast_arrays(np.asarray(full), np.asarray(empty))
        out = np.full((self.nq, self.nk), PARTIAL, np.int8)
        out[np.broadcast_to(full, out.shape)] = FULL
        out[np.broadcast_to(empty, out.shape)] = EMPTY
        return out

    def exact(self, mask: "Mask", which: np.ndarray) -> np.ndarray:
        """States of the tiles where ``which`` is True, by evaluating the mask on them."""
        out = np.zeros((self.nq, self.nk), np.int8)
        for i, j in zip(*np.nonzero(which)):
            q = np.arange(self.q0[i, 0], self.q1[i, 0] + 1)[:, None]
            k = np.arange(self.k0[0, j], self.k1[0, j] + 1)[None, :]
            tile = np.broadcast_to(np.asarray(mask(q, k), bool), (q.shape[0], k.shape[1]))
            out[i, j] = FULL if tile.all() else PARTIAL if tile.any() else EMPTY
        return out


def _interval_states(tiles: _Tiles, lo, hi) -> np.ndarray:
    """States for masks of the form ``lo <= q - k <= hi`` (None = unbounded): every
    difference between a tile's extremes occurs in a rectangle, so this is exact."""
    dmin, dmax = tiles.q0 - tiles.k1, tiles.q1 - tiles.k0
    full = np.ones_like(dmin, bool)
    empty = np.zeros_like(dmin, bool)
    if lo is not None:
        full &= dmin >= lo
        empty |= dmax < lo
    if hi is not None:
        full &= dmax <= hi
        empty |= dmin > hi
    return tiles.states(full, empty)


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

    def block_states(self, T: int, S: int, block_q: int, block_kv: int) -> np.ndarray:
        """``int8 [ceil(T/bq), ceil(S/bkv)]``: EMPTY (0), PARTIAL (1) or FULL (2) per tile."""
        return self._states(_Tiles(T, S, block_q, block_kv))

    def _states(self, tiles: _Tiles) -> np.ndarray:
        # Fallback for masks without an analytic rule: evaluate every tile.
        return tiles.exact(self, np.ones((tiles.nq, tiles.nk), bool))

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

    @property
    def sink_window(self) -> tuple[int, int] | None:
        """``(num_sinks, window)`` when the mask is a causal sliding window plus the first
        ``num_sinks`` positions (``SlidingWindow(w) | Sinks(n)``, either order, or the same with
        ``GlobalTokens(n) & Causal()``): decoding then keeps those keys plus a ring of the
        window (``glocal.layers.cache.SinkRingKVCache``). None for every other mask."""
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

    def _states(self, tiles):
        return tiles.states(True, False)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Query ``q`` sees keys ``k <= q + offset``.

    ``offset`` shifts the diagonal, e.g. queries that are the last T of S keys use ``S - T``.
    """

    offset: int = 0

    def __call__(self, q_idx, k_idx):
        return k_idx <= q_idx + self.offset

    def _states(self, tiles):
        return _interval_states(tiles, -self.offset, None)

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

    def _states(self, tiles):
        return _interval_states(tiles, 0 if self.causal else 1 - self.size, self.size - 1)

    @property
    def is_causal(self) -> bool:
        return self.causal

    @property
    def lookback(self) -> int | None:
        return self.size


def _positive(name: str, value: int) -> None:
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")


@dataclasses.dataclass(frozen=True)
class BlockDiagonal(Mask):
    """Full attention inside each block of ``size`` tokens, none across (what FIT's
    encoder-form local layers compute, though FIT runs each group as its own row with
    ``Full()`` instead): query ``q`` sees key ``k`` iff ``q // size == k // size``."""

    size: int

    def __post_init__(self):
        _positive("BlockDiagonal size", self.size)

    def __call__(self, q_idx, k_idx):
        return q_idx // self.size == k_idx // self.size

    def _states(self, tiles):
        b = self.size
        gq0, gq1, gk0, gk1 = tiles.q0 // b, tiles.q1 // b, tiles.k0 // b, tiles.k1 // b
        return tiles.states((gq0 == gq1) & (gk0 == gk1) & (gq0 == gk0), (gq1 < gk0) | (gk1 < gq0))


@dataclasses.dataclass(frozen=True)
class BlockCausal(Mask):
    """Causal inside each block of ``size`` tokens and blind across blocks (what FIT's local
    layers and the Block Transformer's token decoder compute over a flat sequence; both
    models instead run each group or block as its own row with ``Causal()``):
    ``q // size == k // size and k <= q``."""

    size: int

    def __post_init__(self):
        _positive("BlockCausal size", self.size)

    def __call__(self, q_idx, k_idx):
        return (q_idx // self.size == k_idx // self.size) & (k_idx <= q_idx)

    def _states(self, tiles):
        return And(BlockDiagonal(self.size), Causal())._states(tiles)

    @property
    def is_causal(self) -> bool:
        return True

    @property
    def lookback(self) -> int | None:
        return self.size


@dataclasses.dataclass(frozen=True)
class ChunkCausal(Mask):
    """Full inside a chunk of ``size`` tokens and every earlier chunk visible: query ``q``
    sees ``k`` iff ``k // size <= q // size`` (FIT's global layers over latent groups)."""

    size: int

    def __post_init__(self):
        _positive("ChunkCausal size", self.size)

    def __call__(self, q_idx, k_idx):
        return k_idx // self.size <= q_idx // self.size

    def _states(self, tiles):
        b = self.size
        return tiles.states(tiles.k1 // b <= tiles.q0 // b, tiles.k0 // b > tiles.q1 // b)


@dataclasses.dataclass(frozen=True)
class GlobalTokens(Mask):
    """The first ``n`` positions see every key and are seen by every query (attention sinks,
    global latents). Alone it allows only those rows and columns; OR it with a local mask:
    ``SlidingWindow(w) | (GlobalTokens(4) & Causal())`` is StreamingLLM's pattern."""

    n: int

    def __post_init__(self):
        _positive("GlobalTokens n", self.n)

    def __call__(self, q_idx, k_idx):
        return (q_idx < self.n) | (k_idx < self.n)

    def _states(self, tiles):
        return tiles.states((tiles.q1 < self.n) | (tiles.k1 < self.n), (tiles.q0 >= self.n) & (tiles.k0 >= self.n))


@dataclasses.dataclass(frozen=True)
class Sinks(Mask):
    """The first ``n`` positions, seen by every query at or after them: ``k < n and k <= q``
    (StreamingLLM's attention sinks). OR it with a window: ``SlidingWindow(w) | Sinks(4)``."""

    n: int

    def __post_init__(self):
        _positive("Sinks n", self.n)

    def __call__(self, q_idx, k_idx):
        return (k_idx < self.n) & (k_idx <= q_idx)

    def _states(self, tiles):
        full = (tiles.k1 < self.n) & (tiles.k1 <= tiles.q0)
        return tiles.states(full, (tiles.k0 >= self.n) | (tiles.k0 > tiles.q1))

    @property
    def is_causal(self) -> bool:
        return True


def _sink_count(mask: Mask) -> int | None:
    """``n`` for ``Sinks(n)`` or ``GlobalTokens(n) & Causal()`` (either order), else None."""
    if isinstance(mask, Sinks):
        return mask.n
    if isinstance(mask, And):
        for a, b in ((mask.a, mask.b), (mask.b, mask.a)):
            if isinstance(a, GlobalTokens) and b == Causal():
                return a.n
    return None


@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
    """Bidirectional over the first ``prefix`` tokens, causal after: ``k <= q or k < prefix``."""

    prefix: int

    def __post_init__(self):
        if int(self.prefix) < 0:
            raise ValueError(f"PrefixLM prefix must be >= 0, got {self.prefix}.")

    def __call__(self, q_idx, k_idx):
        return (k_idx <= q_idx) | (k_idx < self.prefix)

    def _states(self, tiles):
        full = tiles.k1 <= np.maximum(self.prefix - 1, tiles.q0)
        return tiles.states(full, (tiles.k0 >= self.prefix) & (tiles.k0 > tiles.q1))


@dataclasses.dataclass(frozen=True, eq=False)
class Explicit(Mask):
    """An arbitrary boolean ``[T, S]`` array (tests, one-off patterns). Hashable by content;
    indices outside the array are disallowed."""

    array: np.ndarray

    def __post_init__(self):
        a = np.asarray(self.array, bool)
        if a.ndim != 2:
            raise ValueError(f"Explicit mask must be a 2-D [T, S] boolean array, got shape {a.shape}.")
        a = a.copy()
        a.flags.writeable = False
        object.__setattr__(self, "array", a)
        object.__setattr__(self, "_key", (a.shape, hash(a.tobytes())))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return (isinstance(other, Explicit) and self._key == other._key
                and np.array_equal(self.array, other.array))

    def __call__(self, q_idx, k_idx):
        T, S = self.array.shape
        inside = (q_idx >= 0) & (q_idx < T) & (k_idx >= 0) & (k_idx < S)
        if isinstance(q_idx, np.ndarray) or isinstance(k_idx, np.ndarray) or np.isscalar(q_idx):
            q, k = np.broadcast_arrays(np.clip(q_idx, 0, T - 1), np.clip(k_idx, 0, S - 1))
            return inside & self.array[q, k]
        import jax.numpy as jnp

        table = jnp.asarray(self.array)
        return inside & table[jnp.clip(q_idx, 0, T - 1), jnp.clip(k_idx, 0, S - 1)]

    def _states(self, tiles):
        a = np.zeros((tiles.nq * tiles.bq, tiles.nk * tiles.bkv), bool)
        valid = np.zeros_like(a)
        T, S = min(tiles.T, self.array.shape[0]), min(tiles.S, self.array.shape[1])
        a[:T, :S] = self.array[:T, :S]
        valid[:tiles.T, :tiles.S] = True
        a = a.reshape(tiles.nq, tiles.bq, tiles.nk, tiles.bkv)
        valid = valid.reshape(a.shape)
        any_ = a.any(axis=(1, 3))
        all_ = (a | ~valid).all(axis=(1, 3))
        return tiles.states(all_, ~any_)


@dataclasses.dataclass(frozen=True)
class And(Mask):
    """Both masks allow the pair."""

    a: Mask
    b: Mask

    def __call__(self, q_idx, k_idx):
        return self.a(q_idx, k_idx) & self.b(q_idx, k_idx)

    def _states(self, tiles):
        sa, sb = self.a._states(tiles), self.b._states(tiles)
        out = np.minimum(sa, sb)  # EMPTY wins; FULL only if both are; else the partial one
        both_partial = (sa == PARTIAL) & (sb == PARTIAL)  # could be empty or partial: look
        return np.where(both_partial, tiles.exact(self, both_partial), out).astype(np.int8)

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

    def _states(self, tiles):
        sa, sb = self.a._states(tiles), self.b._states(tiles)
        out = np.maximum(sa, sb)  # FULL wins; EMPTY only if both are
        both_partial = (sa == PARTIAL) & (sb == PARTIAL)  # could be full or partial: look
        return np.where(both_partial, tiles.exact(self, both_partial), out).astype(np.int8)

    @property
    def is_causal(self) -> bool:
        return self.a.is_causal and self.b.is_causal

    @property
    def sink_window(self) -> tuple[int, int] | None:
        for a, b in ((self.a, self.b), (self.b, self.a)):
            if isinstance(a, SlidingWindow) and a.causal and _sink_count(b) is not None:
                return _sink_count(b), a.size
        return None

    @property
    def lookback(self) -> int | None:
        if self.a.lookback is None or self.b.lookback is None:
            return None
        return max(self.a.lookback, self.b.lookback)


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array) -> Array:
    """Element-wise document mask for packed sequences: ``[B, T] x [B, S] -> [B, T, S]``."""
    return q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
