"""Mask families, analytic block classification and block schedules (pure NumPy).

The reference for every classification is the block reduction of the dense mask."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from glocal.kernels import masks as M
from glocal.kernels.schedule import build_schedule, segment_states


def brute(pred, T, S):
    return np.array([[pred(i, j) for j in range(S)] for i in range(T)], dtype=bool)


def reduce_blocks(dense, bq, bkv):
    """EMPTY/PARTIAL/FULL per tile of a dense mask (short edge tiles count only real cells)."""
    T, S = dense.shape
    nq, nk = -(-T // bq), -(-S // bkv)
    out = np.zeros((nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            tile = dense[i * bq:(i + 1) * bq, j * bkv:(j + 1) * bkv]
            out[i, j] = M.FULL if tile.all() else M.PARTIAL if tile.any() else M.EMPTY
    return out


leaf = st.one_of(
    st.just(M.Full()),
    st.builds(M.Causal, st.integers(-6, 6)),
    st.builds(M.SlidingWindow, st.integers(1, 20), st.booleans()),
    st.builds(M.BlockDiagonal, st.integers(1, 12)),
    st.builds(M.BlockCausal, st.integers(1, 12)),
    st.builds(M.ChunkCausal, st.integers(1, 12)),
    st.builds(M.GlobalTokens, st.integers(1, 6)),
    st.builds(M.Sinks, st.integers(1, 6)),
    st.builds(M.PrefixLM, st.integers(0, 15)),
)
mask_strategy = st.recursive(leaf, lambda inner: st.one_of(st.builds(M.And, inner, inner),
                                                           st.builds(M.Or, inner, inner)), max_leaves=3)


@settings(max_examples=300, deadline=None)
@given(mask=mask_strategy, T=st.integers(1, 40), S=st.integers(1, 40), bq=st.integers(1, 9),
       bkv=st.integers(1, 9))
def test_analytic_block_states_equal_dense_reduction(mask, T, S, bq, bkv):
    np.testing.assert_array_equal(mask.block_states(T, S, bq, bkv), reduce_blocks(mask.dense(T, S), bq, bkv))


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 30), S=st.integers(1, 30), bq=st.integers(1, 8), bkv=st.integers(1, 8),
       seed=st.integers(0, 10**6), density=st.floats(0, 1))
def test_explicit_mask_states_and_predicate(T, S, bq, bkv, seed, density):
    a = np.random.default_rng(seed).random((T, S)) < density
    m = M.Explicit(a)
    np.testing.assert_array_equal(m.dense(T, S), a)
    np.testing.assert_array_equal(m.block_states(T, S, bq, bkv), reduce_blocks(a, bq, bkv))
    assert m == M.Explicit(a.copy()) and hash(m) == hash(M.Explicit(a.copy()))
    assert not m.dense(T + 3, S + 2)[T:].any()  # outside the array: disallowed


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 30), S=st.integers(1, 30), n=st.integers(1, 12))
def test_new_families_match_their_definitions(T, S, n):
    np.testing.assert_array_equal(M.BlockDiagonal(n).dense(T, S), brute(lambda i, j: i // n == j // n, T, S))
    np.testing.assert_array_equal(M.BlockCausal(n).dense(T, S), brute(lambda i, j: i // n == j // n and j <= i, T, S))
    np.testing.assert_array_equal(M.ChunkCausal(n).dense(T, S), brute(lambda i, j: j // n <= i // n, T, S))
    np.testing.assert_array_equal(M.GlobalTokens(n).dense(T, S), brute(lambda i, j: i < n or j < n, T, S))
    np.testing.assert_array_equal(M.PrefixLM(n).dense(T, S), brute(lambda i, j: j <= i or j < n, T, S))
    np.testing.assert_array_equal(M.Sinks(n).dense(T, S), brute(lambda i, j: j < n and j <= i, T, S))


def test_sink_window_recognises_a_causal_window_with_sinks_and_nothing_else():
    assert (M.SlidingWindow(8) | M.Sinks(4)).sink_window == (4, 8)
    assert (M.Sinks(2) | M.SlidingWindow(5)).sink_window == (2, 5)
    assert (M.SlidingWindow(8) | (M.GlobalTokens(3) & M.Causal())).sink_window == (3, 8)
    assert (M.SlidingWindow(8) | (M.Causal() & M.GlobalTokens(3))).sink_window == (3, 8)
    for other in (M.SlidingWindow(8), M.SlidingWindow(8) | M.GlobalTokens(3), M.Causal() | M.Sinks(2),
                  M.SlidingWindow(8, causal=False) | M.Sinks(2), M.Sinks(2) & M.SlidingWindow(8)):
        assert other.sink_window is None, other


def test_mask_argument_errors():
    for cls in (M.BlockDiagonal, M.BlockCausal, M.ChunkCausal, M.GlobalTokens, M.Sinks):
        with pytest.raises(ValueError, match="must be >= 1"):
            cls(0)
    with pytest.raises(ValueError, match="2-D"):
        M.Explicit(np.ones(3, bool))


@settings(max_examples=80, deadline=None)
@given(mask=mask_strategy, T=st.integers(1, 48), S=st.integers(1, 48), bq=st.integers(1, 10),
       bkv=st.integers(1, 10))
def test_schedule_round_trips_and_transposes(mask, T, S, bq, bkv):
    sch = build_schedule(mask, T, S, bq, bkv)
    states = mask.block_states(T, S, bq, bkv)
    np.testing.assert_array_equal(sch.states(), states)
    for i, c in enumerate(sch.kv_count):  # ascending, padded with the last index
        idx = sch.kv_index[i]
        assert (np.diff(idx[:c]) > 0).all()
        if c:
            assert (idx[c:] == idx[c - 1]).all()
    # the transposed lists (for dK/dV) hold exactly the same tiles
    visit = np.zeros_like(states, bool)
    for j, c in enumerate(sch.q_count):
        visit[sch.q_index[j, :c], j] = True
        np.testing.assert_array_equal(sch.q_full[j, :c], states[sch.q_index[j, :c], j] == M.FULL)
    np.testing.assert_array_equal(visit, states != M.EMPTY)
    st_ = sch.stats
    assert st_["visited"] == (states != 0).sum() and st_["full"] == (states == 2).sum()
    assert st_["density"] == pytest.approx((states != 0).mean())


def test_schedule_is_cached_and_density_of_a_window():
    a = build_schedule(M.SlidingWindow(512), 8192, 8192, 128, 128)
    assert build_schedule(M.SlidingWindow(512), 8192, 8192, 128, 128) is a
    # a 512-token window at 128-blocks touches 5 kv tiles per q tile (4 + the diagonal)
    assert a.kv_count.max() == 5 and a.stats["density"] == pytest.approx((64 * 5 - 10) / 64**2)


def test_segment_ids_skip_cross_document_tiles():
    rng = np.random.default_rng(0)
    for _ in range(20):
        B, T, bq = 2, 37, 5
        q = np.sort(rng.integers(0, 4, (B, T)), axis=1)  # packed documents are contiguous
        got = segment_states(q, q, bq, bq)
        eq = q[:, :, None] == q[:, None, :]
        want_any = reduce_blocks(eq.any(0), bq, bq) != M.EMPTY
        want_full = reduce_blocks(eq.all(0), bq, bq) == M.FULL
        np.testing.assert_array_equal(got != M.EMPTY, want_any)
        np.testing.assert_array_equal(got == M.FULL, want_full)
        sch = build_schedule(M.Causal(), T, T, bq, bq, segment_ids=(q, q))
        visited = sch.states() != M.EMPTY
        dense = (eq & M.Causal().dense(T, T)[None]).any(0)
        # never skips a tile that has an allowed pair; skips tiles with no shared document
        assert (visited | (reduce_blocks(dense, bq, bq) == M.EMPTY)).all()
        assert sch.stats["visited"] <= build_schedule(M.Causal(), T, T, bq, bq).stats["visited"]
