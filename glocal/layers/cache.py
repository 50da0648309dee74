"""Key/value caches as explicit pytrees (passed in, returned updated; never hidden state).

Each slot stores one token's key and value plus the token's absolute position
(``-1`` = empty). Attention evaluates its mask on those positions, so a cache can hold
tokens in any slot order:

* ``KVCache``      preallocated, slot = position; memory grows with the longest sequence.
* ``RingKVCache``  ``size`` slots, slot = position % size; for sliding-window layers whose
                   look-back is at most ``size``, memory stays constant however long the
                   sequence grows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k_BSKE: jax.Array
    v_BSKE: jax.Array
    pos_BS: jax.Array  # int32 absolute position of each slot's token, -1 if empty

    wraps = False  # class attribute: does slot = position % size?

    @classmethod
    def create(cls, batch_size: int, size: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        shape = (batch_size, size, num_kv_heads, head_dim)
        return cls(
            k_BSKE=jnp.zeros(shape, dtype),
            v_BSKE=jnp.zeros(shape, dtype),
            pos_BS=jnp.full((batch_size, size), -1, jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.k_BSKE.shape[-3]  # also right for caches stacked over layers

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (self.k_BSKE, self.v_BSKE, self.pos_BS))

    def update(self, k_BTKE, v_BTKE, positions_BT, valid_BT=None) -> "KVCache":
        """Write a chunk of new tokens (positions contiguous per row) into their slots.

        ``valid_BT`` marks real tokens; padding is not written. In a ring, a chunk longer
        than the ring keeps only its newest ``size`` tokens per row. In a plain cache a
        position ``>= size`` is dropped (callers check lengths up front).
        """
        S = self.size
        if valid_BT is None:
            valid_BT = jnp.ones(positions_BT.shape, bool)
        if self.wraps:
            newest_B1 = jnp.max(jnp.where(valid_BT, positions_BT, -1), axis=1, keepdims=True)
            keep_BT = valid_BT & (positions_BT > newest_B1 - S)
            slot_BT = positions_BT % S
        else:
            keep_BT = valid_BT
            slot_BT = positions_BT
        # Kept writes have distinct slots; dropped ones go out of range and mode="drop"
        # discards them, so the scatter is deterministic.
        slot_BT = jnp.where(keep_BT, slot_BT, S)

        def write_row(buf, slots, new):
            return buf.at[slots].set(new.astype(buf.dtype), mode="drop")

        write = jax.vmap(write_row)
        return dataclasses.replace(
            self,
            k_BSKE=write(self.k_BSKE, slot_BT, k_BTKE),
            v_BSKE=write(self.v_BSKE, slot_BT, v_BTKE),
            pos_BS=write(self.pos_BS, slot_BT, positions_BT.astype(jnp.int32)),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingKVCache(KVCache):
    """A ``KVCache`` of ``size`` slots reused round-robin (sliding-window layers)."""

    wraps = True
