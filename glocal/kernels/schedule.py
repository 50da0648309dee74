"""Block schedules: which key/value tiles each query tile visits (and the transpose for dK/dV).

A schedule is compiled once per (mask, T, S, block sizes) with NumPy at trace time and
cached; kernels read it as small integer tables:

    kv_count[i]        number of kv tiles query tile i visits
    kv_index[i, j]     their indices, ascending; padding repeats the last valid index so a
                       pipelined kernel issues no extra copy for padded steps
    kv_full[i, j]      True when that tile is fully allowed (no element mask needed)
    q_count / q_index / q_full    the same per kv tile, over query tiles (for dK/dV)

Segment ids (packed documents), when known as concrete arrays, remove tiles whose query and
key rows share no document in any batch row.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from glocal.kernels.masks import EMPTY, FULL, PARTIAL, Mask


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSchedule:
    T: int
    S: int
    block_q: int
    block_kv: int
    kv_count: np.ndarray  # int32 [nq]
    kv_index: np.ndarray  # int32 [nq, W]
    kv_full: np.ndarray  # bool  [nq, W]
    q_count: np.ndarray  # int32 [nk]
    q_index: np.ndarray  # int32 [nk, Wt]
    q_full: np.ndarray  # bool  [nk, Wt]

    @property
    def num_q_blocks(self) -> int:
        return len(self.kv_count)

    @property
    def num_kv_blocks(self) -> int:
        return len(self.q_count)

    @property
    def stats(self) -> dict:
        total = self.num_q_blocks * self.num_kv_blocks
        visited = int(self.kv_count.sum())
        full = int(sum(self.kv_full[i, :c].sum() for i, c in enumerate(self.kv_count)))
        return {"blocks": total, "visited": visited, "full": full, "partial": visited - full,
                "density": visited / total if total else 0.0}

    def states(self) -> np.ndarray:
        """The block-state matrix this schedule encodes (for validation)."""
        out = np.zeros((self.num_q_blocks, self.num_kv_blocks), np.int8)
        for i, c in enumerate(self.kv_count):
            out[i, self.kv_index[i, :c]] = np.where(self.kv_full[i, :c], FULL, PARTIAL)
        return out


def _csr(states: np.ndarray):
    """Row-wise visit lists of a state matrix: (count, index, full), padded to the widest row."""
    visit = states != EMPTY
    count = visit.sum(axis=1).astype(np.int32)
    width = max(int(count.max(initial=0)), 1)
    index = np.zeros((states.shape[0], width), np.int32)
    full = np.zeros((states.shape[0], width), bool)
    for i in range(states.shape[0]):
        cols = np.nonzero(visit[i])[0]
        if len(cols):
            index[i, :len(cols)] = cols
            index[i, len(cols):] = cols[-1]
            full[i, :len(cols)] = states[i, cols] == FULL
    return count, index, full


def from_states(states: np.ndarray, T: int, S: int, block_q: int, block_kv: int) -> BlockSchedule:
    kv = _csr(states)
    q = _csr(states.T)
    return BlockSchedule(T, S, block_q, block_kv, *kv, *q)


def segment_states(q_segment_ids: np.ndarray, kv_segment_ids: np.ndarray, block_q: int,
                   block_kv: int) -> np.ndarray:
    """Block states of the document mask ``q_seg == kv_seg`` over all batch rows: EMPTY if no
    row has a shared id in the tile, FULL if every row's tile is one single shared id."""
    q = np.atleast_2d(np.asarray(q_segment_ids))
    k = np.atleast_2d(np.asarray(kv_segment_ids))
    T, S = q.shape[1], k.shape[1]
    nq, nk = -(-T // block_q), -(-S // block_kv)
    out = np.full((nq, nk), EMPTY, np.int8)
    for i in range(nq):
        qs = q[:, i * block_q:(i + 1) * block_q]
        for j in range(nk):
            ks = k[:, j * block_kv:(j + 1) * block_kv]
            eq = qs[:, :, None] == ks[:, None, :]
            out[i, j] = FULL if eq.all() else PARTIAL if eq.any() else EMPTY
    return out


@functools.lru_cache(maxsize=256)
def _cached(mask: Mask, T: int, S: int, block_q: int, block_kv: int) -> BlockSchedule:
    return from_states(mask.block_states(T, S, block_q, block_kv), T, S, block_q, block_kv)


def build_schedule(mask: Mask, T: int, S: int, block_q: int, block_kv: int, *,
                   segment_ids: tuple[np.ndarray, np.ndarray] | None = None) -> BlockSchedule:
    """The schedule of ``mask`` (cached), narrowed by concrete ``(q_ids, kv_ids)`` if given."""
    if segment_ids is None:
        return _cached(mask, T, S, block_q, block_kv)
    base = mask.block_states(T, S, block_q, block_kv)
    seg = segment_states(*segment_ids, block_q, block_kv)
    states = np.minimum(base, seg)  # a tile is full only if both are; empty if either is
    return from_states(states.astype(np.int8), T, S, block_q, block_kv)
