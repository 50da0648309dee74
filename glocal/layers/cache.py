"""Decoding caches as explicit pytrees (passed in, returned updated; never hidden state).

Every cache type derives from ``Cache``: a frozen dataclass registered as a pytree, so a
stack of layers can hold one per layer with a leading ``layers`` axis (``stack_cache``) and
each layer reads and writes its own slice through a ``LayerView``. A mixer that needs
another kind of state (a recurrent state, a convolution window) defines its own ``Cache``
subclass; the stack runner handles it unchanged.

Key/value caches: each slot stores one token's key and value plus the token's absolute position
(``-1`` = empty). Attention evaluates its mask on those positions, so a cache can hold
tokens in any slot order:

* ``KVCache``      preallocated, slot = position; memory grows with the longest sequence.
* ``RingKVCache``  ``size`` slots, slot = position % size; for sliding-window layers whose
                   look-back is at most ``size``, memory stays constant however long the
                   sequence grows.
* ``SinkRingKVCache`` the first ``num_sinks`` positions in fixed slots plus a ring of the
                   window (StreamingLLM's sinks + recent tokens): constant memory too.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp


class Cache(abc.ABC):
    """Base of every decoding cache (a frozen, pytree-registered dataclass).

    Subclasses write new entries through methods that take a ``layer=`` index, so the same
    method updates one layer of a cache stacked over layers in place (see ``LayerView``),
    and implement ``clear_rows`` (forget everything a row holds).
    """

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)

    @abc.abstractmethod
    def clear_rows(self, rows_B, layer=None) -> "Cache":
        """Forget what the rows where ``rows_B`` is true hold (one layer of a stack if given)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache(Cache):
    k_BKSE: jax.Array
    v_BKSE: jax.Array
    pos_BS: jax.Array  # int32 absolute position of each slot's token, -1 if empty

    wraps = False  # class attribute: does slot = position % size?

    @classmethod
    def create(cls, batch_size: int, size: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        # Heads-major [B, K, S, E]: decode attention is then a batched matmul over (B, K)
        # reading the cache in order, ~3x faster on CPU than [B, S, K, E] (which needs a
        # transpose of the whole cache per step).
        shape = (batch_size, num_kv_heads, size, head_dim)
        return cls(
            k_BKSE=jnp.zeros(shape, dtype),
            v_BKSE=jnp.zeros(shape, dtype),
            pos_BS=jnp.full((batch_size, size), -1, jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.k_BKSE.shape[-2]  # also right for caches stacked over layers

    def update(self, k_BTKE, v_BTKE, positions_BT, valid_BT=None, layer=None) -> "KVCache":
        """Write a chunk of new tokens (positions contiguous per row) into their slots.

        ``valid_BT`` marks real tokens; padding is not written. In a ring, a chunk longer
        than the ring keeps only its newest ``size`` tokens per row. In a plain cache a
        position ``>= size`` is dropped (callers check lengths up front). For a cache
        stacked over layers, ``layer`` selects the layer written.
        """
        if valid_BT is None:
            valid_BT = jnp.ones(positions_BT.shape, bool)
        slot_BT = self._slots(positions_BT, valid_BT, layer)
        # Scatter only the new tokens: inside a decode loop XLA then updates the buffers in
        # place instead of copying the whole cache every step. Kept writes have distinct
        # slots; dropped ones are out of range (slot ``size``) and mode="drop" discards them,
        # so the scatter is deterministic.
        row_BT = jnp.broadcast_to(jnp.arange(slot_BT.shape[0])[:, None], slot_BT.shape)
        lead = () if layer is None else (layer,)
        # Advanced indices around a slice put the indexed (B, T) dims first: the update
        # operand is [B, T, K, E], exactly the new keys' layout.
        kv_idx = lead + (row_BT, slice(None), slot_BT)
        pos_idx = lead + (row_BT, slot_BT)
        write = lambda buf, idx, new: buf.at[idx].set(new.astype(buf.dtype), mode="drop")
        return dataclasses.replace(
            self,
            k_BKSE=write(self.k_BKSE, kv_idx, k_BTKE),
            v_BKSE=write(self.v_BKSE, kv_idx, v_BTKE),
            pos_BS=write(self.pos_BS, pos_idx, positions_BT.astype(jnp.int32)),
        )

    def _slots(self, positions_BT, valid_BT, layer):
        """Where each new token goes: its position, or (ring) its position modulo the size;
        ``size`` (out of range) for tokens not kept."""
        S = self.size
        if self.wraps:
            newest_B1 = jnp.max(jnp.where(valid_BT, positions_BT, -1), axis=1, keepdims=True)
            keep_BT = valid_BT & (positions_BT > newest_B1 - S)
            return jnp.where(keep_BT, positions_BT % S, S)
        return jnp.where(valid_BT, positions_BT, S)

    def clear_rows(self, rows_B, layer=None) -> "KVCache":
        """Mark every slot of the rows where ``rows_B`` is true empty."""
        pos = self.pos_BS if layer is None else self.pos_BS[layer]
        pos = jnp.where(rows_B[:, None], -1, pos)
        return dataclasses.replace(self, pos_BS=pos if layer is None else self.pos_BS.at[layer].set(pos))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingKVCache(KVCache):
    """A ``KVCache`` of ``size`` slots reused round-robin (sliding-window layers)."""

    wraps = True


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SinkRingKVCache(KVCache):
    """``num_sinks`` fixed slots for positions ``0 .. num_sinks - 1`` followed by a ring of
    ``size - num_sinks`` slots for every later position (slot ``n + (p - n) % ring``): a
    window-plus-sinks layer (mask ``SlidingWindow(w) | Sinks(n)``, ring = w) keeps exactly the
    keys it can still see, so memory is ``n + w`` slots however long the sequence grows."""

    num_sinks: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def create(cls, batch_size: int, size: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32, *,
               num_sinks: int = 0) -> "SinkRingKVCache":
        if not 0 <= num_sinks < size:
            raise ValueError(f"num_sinks={num_sinks} must leave ring slots in a cache of {size} slots.")
        base = KVCache.create(batch_size, size, num_kv_heads, head_dim, dtype)
        return cls(base.k_BKSE, base.v_BKSE, base.pos_BS, num_sinks=num_sinks)

    def _slots(self, positions_BT, valid_BT, layer):
        n, ring = self.num_sinks, self.size - self.num_sinks
        newest_B1 = jnp.max(jnp.where(valid_BT, positions_BT, -1), axis=1, keepdims=True)
        sink_BT = positions_BT < n
        keep_BT = valid_BT & (sink_BT | (positions_BT > newest_B1 - ring))
        slot_BT = jnp.where(sink_BT, positions_BT, n + (positions_BT - n) % ring)
        return jnp.where(keep_BT, slot_BT, self.size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompactKVCache(KVCache):
    """A ``KVCache`` whose slots fill in arrival order, not by position: a layer that sees only
    some tokens (mixture-of-recursions' deeper steps) stores just those, so ``size`` can be a
    fraction of the sequence. ``count_B`` says how many slots each row holds; positions stay in
    ``pos_BS`` (masks and RoPE use the original positions). Tokens that arrive when a row is
    full are not stored (callers size caches so that this cannot happen)."""

    count_B: jax.Array  # int32 slots used per row

    @classmethod
    def create(cls, batch_size: int, size: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "CompactKVCache":
        base = KVCache.create(batch_size, size, num_kv_heads, head_dim, dtype)
        return cls(base.k_BKSE, base.v_BKSE, base.pos_BS, jnp.zeros((batch_size,), jnp.int32))

    def update(self, k_BTKE, v_BTKE, positions_BT, valid_BT=None, layer=None) -> "CompactKVCache":
        if valid_BT is None:
            valid_BT = jnp.ones(positions_BT.shape, bool)
        out = super().update(k_BTKE, v_BTKE, positions_BT, valid_BT, layer)
        count_B = self.count_B if layer is None else self.count_B[layer]
        count_B = jnp.minimum(count_B + jnp.sum(valid_BT, axis=1, dtype=jnp.int32), self.size)
        return dataclasses.replace(out, count_B=count_B if layer is None else self.count_B.at[layer].set(count_B))

    def _slots(self, positions_BT, valid_BT, layer):
        """The next free slots of each row, in arrival order."""
        count_B = self.count_B if layer is None else self.count_B[layer]
        slot_BT = count_B[:, None] + jnp.cumsum(valid_BT, axis=1, dtype=jnp.int32) - 1
        return jnp.where(valid_BT & (slot_BT < self.size), slot_BT, self.size)  # out of range: dropped

    def clear_rows(self, rows_B, layer=None) -> "CompactKVCache":
        out = super().clear_rows(rows_B, layer)
        count = self.count_B if layer is None else self.count_B[layer]
        count = jnp.where(rows_B, 0, count)
        return dataclasses.replace(out, count_B=count if layer is None else self.count_B.at[layer].set(count))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerView:
    """One layer of a cache stacked over layers, read and written through the stack.

    A scan over layers carries the whole stack and hands each layer a view; writes go
    straight into the stacked buffers (in place), which a per-layer copy would not allow.
    It quacks like the cache it views: array fields read as this layer's slice, and a
    method call runs the stack's method with ``layer=`` this layer and returns a new view.
    Works for every ``Cache`` subclass whose writing methods take ``layer=``.
    """

    stack: Cache
    layer: jax.Array  # int32 scalar

    def __getattr__(self, name):
        if name in ("stack", "layer"):  # not yet set (dataclass construction, unpickling)
            raise AttributeError(name)
        value = getattr(self.stack, name)
        if isinstance(value, jax.Array):
            return value[self.layer]
        if callable(value):
            def method(*args, **kwargs):
                out = value(*args, layer=self.layer, **kwargs)
                return LayerView(out, self.layer) if isinstance(out, type(self.stack)) else out
            return method
        return value  # static properties (sizes) are the same for every layer


def stack_cache(cache: Cache, n: int) -> Cache:
    """``n`` copies of an empty cache stacked on a leading ``layers`` axis (one per layer of
    a scanned stack); read and written through ``LayerView``."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), cache)


def clear_rows(caches, rows_B):
    """Forget what the rows where ``rows_B`` is true hold, in every ``Cache`` of a pytree
    (stacked caches included: their per-layer leading axis broadcasts)."""
    return jax.tree.map(lambda c: _clear_all_layers(c, rows_B), caches, is_leaf=lambda c: isinstance(c, Cache))


def _clear_all_layers(cache: Cache, rows_B):
    if not isinstance(cache, Cache):
        return cache
    return cache.clear_rows(rows_B)


def tree_nbytes(tree) -> int:
    """Bytes held by every array leaf of a pytree (works on ``jax.eval_shape`` results)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
