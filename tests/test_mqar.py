"""MQAR generator: keys and values from disjoint halves of the vocabulary, each key queried
exactly once (after its pair, followed by its value), only those positions scored."""

import numpy as np
import pytest

from glocal.train.mqar import IGNORE, mqar


@pytest.mark.parametrize("L,D", [(64, 4), (128, 16), (256, 64)])
def test_mqar_rows_follow_the_specification(L, D):
    V = 512
    data = mqar(20, L, D, vocab_size=V, seed=3)
    x, y = data["inputs"], data["targets"]
    assert x.shape == y.shape == (20, L) and x.dtype == np.int32
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:2 * D:2], row_x[1:2 * D:2]
        assert len(set(keys)) == D and len(set(values)) == D
        assert keys.min() >= 1 and keys.max() < V // 2 <= values.min() and values.max() < V
        scored = np.flatnonzero(row_y != IGNORE)
        assert len(scored) == D and scored.min() >= 2 * D and np.all((scored - 2 * D) % 2 == 0)
        # each scored position holds a key, once each, and its target is that key's value
        assert sorted(row_x[scored]) == sorted(keys)
        answer = dict(zip(keys, values))
        assert all(row_y[t] == answer[row_x[t]] for t in scored)
        # the value also follows its key in the sequence (when inside the window)
        assert all(row_x[t + 1] == row_y[t] for t in scored if t + 1 < L)


def test_queries_follow_a_power_law_and_bad_shapes_are_explained():
    data = mqar(400, 256, 16, vocab_size=1024, seed=0)
    offsets = np.concatenate([np.flatnonzero(r != IGNORE) - 32 for r in data["targets"]]) // 2
    assert np.mean(offsets < 16) > 0.2 > np.mean(offsets >= 100)  # most queries come early
    with pytest.raises(ValueError, match="4 \\* num_pairs <= seq_len"):
        mqar(1, 60, 16)
    with pytest.raises(ValueError, match="vocab_size to at least 258"):
        mqar(1, 512, 128, vocab_size=256)
