import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from glocal.kernels import masks


def brute(pred, T, S):
    return np.array([[pred(i, j) for j in range(S)] for i in range(T)], dtype=bool)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), S=st.integers(1, 40), w=st.integers(1, 45), off=st.integers(-5, 5))
def test_masks_match_definitions(T, S, w, off):
    np.testing.assert_array_equal(masks.Full().dense(T, S), np.ones((T, S), bool))
    np.testing.assert_array_equal(masks.Causal().dense(T, S), brute(lambda i, j: j <= i, T, S))
    np.testing.assert_array_equal(masks.Causal(off).dense(T, S), brute(lambda i, j: j <= i + off, T, S))
    np.testing.assert_array_equal(
        masks.SlidingWindow(w).dense(T, S), brute(lambda i, j: i - w + 1 <= j <= i, T, S))
    np.testing.assert_array_equal(
        masks.SlidingWindow(w, causal=False).dense(T, S), brute(lambda i, j: abs(i - j) < w, T, S))
    both = masks.Causal() & masks.SlidingWindow(w, causal=False)
    np.testing.assert_array_equal(both.dense(T, S), masks.SlidingWindow(w).dense(T, S))
    either = masks.SlidingWindow(w) | masks.Causal(off)
    np.testing.assert_array_equal(
        either.dense(T, S), masks.SlidingWindow(w).dense(T, S) | masks.Causal(off).dense(T, S))


def test_window_semantics_counts_self():
    # Query 5 with a window of 3 sees keys 3, 4, 5: "size tokens including self".
    assert np.flatnonzero(masks.SlidingWindow(3).dense(8)[5]).tolist() == [3, 4, 5]
    assert np.flatnonzero(masks.SlidingWindow(1).dense(8)[5]).tolist() == [5]
    with pytest.raises(ValueError, match="size must be >= 1"):
        masks.SlidingWindow(0)


def test_masks_are_hashable_static_and_report_lookback():
    assert hash(masks.SlidingWindow(4)) == hash(masks.SlidingWindow(4))
    assert masks.SlidingWindow(4) != masks.SlidingWindow(5)
    assert masks.SlidingWindow(4).lookback == 4 and masks.Causal().lookback is None
    assert (masks.Causal() & masks.SlidingWindow(7, causal=False)).lookback == 7
    assert masks.Causal().is_causal and not masks.Full().is_causal


def test_masks_evaluate_on_jnp_positions():
    import jax.numpy as jnp
    q = jnp.array([[10], [11]])
    k = jnp.array([[8, 9, 10, 11, -1]])
    got = masks.SlidingWindow(2)(q, k)
    np.testing.assert_array_equal(np.asarray(got), [[False, True, True, False, False],
                                                    [False, False, True, True, False]])


def test_segment_mask():
    q = np.array([[0, 0, 1]])
    np.testing.assert_array_equal(masks.segment_mask(q, q)[0], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
